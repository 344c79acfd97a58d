"""Reward nodes: FocusFix Load Reward, Combine Rewards, Score Images, Saliency Mask, Compare."""
from __future__ import annotations

import math
from typing import Callable, TypeVar

import torch

from ..focusfix_core import saliency, viz
from ..focusfix_core.rewards.composite import WeightedSum
from ..focusfix_core.rewards.loading import TOWER_DTYPES
from .adapters import b1hw_to_mask, bchw_to_image, grad_mode, image_to_bchw, load_reward_by_name, mask_to_b1hw, \
    reward_choices, reward_device, reward_on
from .common import REWARD, check_widget_ranges, file_fingerprint, tip, widgets_checked

__all__ = ["FocusFixLoadReward", "FocusFixCombineRewards", "FocusFixScoreImages", "FocusFixSaliencyMask", "FocusFixCompare",
           "score_table", "weighted_sum_name"]


T = TypeVar("T")

# smallest image side the reward nodes take: the rewards' filters (sharpness: a 5x5 Laplacian with reflect
# border) need a few pixels, and a 1x1 image ended in a raw torch padding error
_MIN_SIDE = 8


def each_image(reward, I: torch.Tensor, fn: Callable[[torch.nn.Module, torch.Tensor], T]) -> list[T]:
    """[fn(r, x) for each image x: [1,3,H,W] of I: [B,3,H,W]], with the reward r on the compute device and x a
    plain copy there (call inside `grad_mode()`). One image at a time: the node's device memory is one image's
    (a gradient saliency map through a CLIP tower holds its activations), whatever the batch; a result
    depends on its image alone. ComfyUI's progress bar follows the images, and its cancel is checked between
    them."""
    try:
        import comfy.model_management as mm
        import comfy.utils
    except ImportError:  # the core's tests, without ComfyUI
        mm = pbar = None
    else:
        pbar = comfy.utils.ProgressBar(len(I))
    device, out = reward_device(reward), []
    with reward_on(reward) as (r,):
        for j in range(len(I)):
            if mm is not None:
                mm.throw_exception_if_processing_interrupted()
            out.append(fn(r, I[j:j + 1].to(device, copy=True)))
            if pbar is not None:
                pbar.update_absolute(j + 1, len(I))
    return out


def score_table(scores: list[float], name: str) -> str:
    return "\n".join([f"{name}: mean {sum(scores) / len(scores):.4f}"] + [f"  image {i}: {s:.4f}" for i, s in enumerate(scores)])


class FocusFixLoadReward:
    DESCRIPTION = ("Load a reward (higher = better image): a built-in weight-free reward, or a file from "
                   "models/focusfix_rewards (aesthetic head, safety checker, tiny-world rewards).")
    CATEGORY = "FocusFix/rewards"
    FUNCTION = "execute"
    RETURN_TYPES = (REWARD,)
    RETURN_NAMES = ("reward",)
    OUTPUT_TOOLTIPS = ("The reward r(I), for scoring, saliency masks and Focus-N-Fix training.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reward_name": tip(reward_choices(), "builtin:* need no file; others are files in models/focusfix_rewards."),
        }, "optional": {  # optional: API prompts saved before it existed stay valid
            "precision": tip(list(TOWER_DTYPES), "Precision of a CLIP reward's image tower: fp32 (1.14 GiB, most "
                             "exact gradients) or bf16 (0.57 GiB, for 8-12 GB cards). Heads stay fp32; rewards "
                             "without a tower ignore it.", default="fp32"),
            "clip_vision": tip("CLIP_VISION", "OpenAI CLIP ViT-L/14 image tower (224 px; Load CLIP Vision with "
                               "clip-vit-large-patch14.safetensors), for an aesthetic head stored without one. "
                               "Other rewards ignore it (a note in the log says so)."),
        }}

    @classmethod
    def IS_CHANGED(cls, reward_name, **_):
        # a reward file converted again under the same name is read again
        return reward_name if reward_name.startswith("builtin:") else file_fingerprint("focusfix_rewards", reward_name)

    def execute(self, reward_name, precision="fp32", clip_vision=None):
        return (load_reward_by_name(reward_name, clip_vision, precision),)


class FocusFixCombineRewards:
    DESCRIPTION = ("One reward from two: weight_a * r_a(I) + weight_b * r_b(I), e.g. aesthetic + safety. Scales "
                   "differ (aesthetic about 1..10, the safety margin about -0.1..0.1): weight so both count. A "
                   "reward of weight 0 is left out, and its Load Reward does not run for it.")
    CATEGORY = "FocusFix/rewards"
    FUNCTION = "execute"
    RETURN_TYPES = (REWARD,)
    RETURN_NAMES = ("reward",)
    OUTPUT_TOOLTIPS = ("The weighted sum, for scoring, saliency masks and Focus-N-Fix training.",)

    @classmethod
    def INPUT_TYPES(cls):
        weight = dict(default=1.0, min=-1000.0, max=1000.0, step=0.01)
        return {"required": {  # lazy: a reward of weight 0 is never asked for, so it is not loaded
            "reward_a": tip(REWARD, "r_a (FocusFix Load Reward).", lazy=True),
            "weight_a": tip("FLOAT", "Weight of r_a (0 = leave it out, < 0 = push it down).", **weight),
            "reward_b": tip(REWARD, "r_b (FocusFix Load Reward).", lazy=True),
            "weight_b": tip("FLOAT", "Weight of r_b (0 = leave it out, < 0 = push it down).", **weight),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, weight_a=None, weight_b=None):
        # None: a linked weight, checked when the node runs
        try:
            check_widget_ranges(cls, weight_a=weight_a, weight_b=weight_b)
            _check_weights(weight_a, weight_b)
        except ValueError as e:
            return str(e)
        return True

    def check_lazy_status(self, weight_a, weight_b, reward_a=None, reward_b=None):
        return [name for name, w in (("reward_a", weight_a), ("reward_b", weight_b)) if w != 0]

    @widgets_checked
    def execute(self, reward_a, weight_a, reward_b, weight_b):
        _check_weights(weight_a, weight_b)
        terms = [(r, float(w)) for r, w in ((reward_a, weight_a), (reward_b, weight_b)) if w != 0]
        r = WeightedSum(terms)
        r.name = weighted_sum_name(terms)  # shown in score tables and LoRA metadata
        return (r,)


def _check_weights(weight_a, weight_b) -> None:
    if weight_a == 0 and weight_b == 0:
        raise ValueError("weight_a and weight_b are both 0: the combined reward would score every image 0, with "
                         "nothing to train on. Give a reward a weight (for one reward alone, connect its Load Reward "
                         "straight to the other nodes).")


def weighted_sum_name(terms) -> str:
    """`1*aesthetic + 10*safety`, `1*sharpness - 0.5*brightness`, `-1*brightness`: (reward, weight) terms, readable;
    a term that is itself a sum (chained Combine Rewards) in parentheses: `-1*(1*sharpness + 0.5*brightness)`."""
    def name(r) -> str:
        return f"({r.name})" if " " in r.name else r.name
    (r0, w0), rest = terms[0], terms[1:]
    return " ".join([f"{w0:g}*{name(r0)}"] + [f"{'-' if w < 0 else '+'} {abs(w):g}*{name(r)}" for r, w in rest])


class FocusFixScoreImages:
    DESCRIPTION = ("Score images with a reward, and map them: the reward's own heatmap of what it dislikes, or, for a "
                   "reward without one, gradient sensitivity |dr/dI| (where a change moves the score most: not a "
                   "map of what is bad, it can light up the best parts).")
    CATEGORY = "FocusFix/rewards"
    FUNCTION = "execute"
    RETURN_TYPES = ("FLOAT", "STRING", "MASK", "IMAGE")
    RETURN_NAMES = ("scores", "text", "heatmap", "overlay")
    OUTPUT_IS_LIST = (True, False, False, False)
    OUTPUT_TOOLTIPS = ("One score per image (a list).", "The scores, readable.",
                       "[0,1] per image: the reward's heatmap (1 = worst) when it has one, else gradient sensitivity "
                       "|dr/dI| (1 = where a change moves the score most, which is not where the image is worst).",
                       "The heatmap over the images.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": tip("IMAGE", "Images to score."),
                             "reward": tip(REWARD, "The reward (FocusFix Load Reward).")}}

    def execute(self, image, reward):
        I = image_to_bchw(image, "image", _MIN_SIDE)
        with grad_mode():
            scores, heat = zip(*each_image(reward, I, _score_and_map))
        scores, heat = list(scores), torch.cat(heat)
        return (scores, score_table(scores, reward.name), b1hw_to_mask(heat), bchw_to_image(viz.heat_overlay(I, heat)))


def _score_and_map(reward, I) -> tuple[float, torch.Tensor]:
    """(r(I), [1,1,H,W] map in [0,1] on the CPU) of one image I [1,3,H,W]: the reward's heatmap if it has one,
    else gradient sensitivity, whose forward gives the score too (one forward, not two)."""
    if getattr(reward, "has_heatmap", False):
        with torch.no_grad():
            score, H = reward(I), reward.heatmap(I).float()
    else:
        score, H = saliency.score_and_saliency(reward, I)
    return float(score.float()[0]), _map_01(H, I).cpu()


def _map_01(H: torch.Tensor, I: torch.Tensor) -> torch.Tensor:
    """A map H [B,H',W'] or [B,1,H',W'] at the size of images I [B,3,H,W], as the mask path reads it (negative
    values as 0, `saliency.normalise_map`): [B,1,H,W] in [0,1]. Its own min-max with an absolute floor showed a
    CLIP reward's ~1e-9 saliency as a dim map that Saliency Mask spans to 1."""
    H = H if H.ndim == 4 else H[:, None]
    H = torch.nn.functional.interpolate(H, size=I.shape[-2:], mode="bilinear") if H.shape[-2:] != I.shape[-2:] else H
    return saliency.normalise_map(H.clamp_min(0))


class FocusFixSaliencyMask:
    DESCRIPTION = ("Focus-N-Fix mask M(I0): where the image may change (1) and where it must stay (0), from the "
                   "reward's heatmap of what it dislikes or from gradient sensitivity. A plain MASK: edit it with "
                   "GrowMask, ThresholdMask, MaskComposite or the mask editor.")
    CATEGORY = "FocusFix/masks"
    FUNCTION = "execute"
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("mask", "overlay")
    OUTPUT_TOOLTIPS = ("M as a ComfyUI MASK [B,H,W] in [0,1], 1 = may change.", "The mask tinted red over the images.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": tip("IMAGE", "I0: the base model's images."),
            "reward": tip(REWARD, "The reward the mask comes from."),
            "mask_source": tip(list(saliency.MAP_SOURCES), "Where M comes from. heatmap: the reward's map of what it "
                               "dislikes; saliency: gradient sensitivity |dr/dI|, where a change moves the score most "
                               "(not what is bad), for rewards without a heatmap; auto: heatmap if it has one."),
            "saliency_method": tip(list(saliency.SALIENCY_METHODS), "Gradient saliency variant (used when M comes "
                                   "from saliency). smoothgrad's noise is fixed: an image always gives the same mask."),
            "blur_sigma": tip("FLOAT", "Blur before thresholding, in pixels.", default=2.0, min=0.0, max=64.0, step=0.1),
            "threshold_mode": tip(list(saliency.THRESHOLD_MODES), "value: keep >= threshold; top_percent: keep "
                                  "that fraction of pixels; otsu: automatic.", default="top_percent"),
            "threshold": tip("FLOAT", "Cut-off (value) or kept fraction (top_percent).", default=0.15, min=0.0,
                             max=1.0, step=0.01),
            "dilation": tip("INT", "Grow the mask by this many pixels.", default=2, min=0, max=256),
            "feather": tip("FLOAT", "Soften the mask edge (Gaussian sigma, pixels).", default=0.0, min=0.0, max=64.0, step=0.1),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, threshold_mode=None, threshold=None):
        # at queue time, as on the Train node (ComfyUI then skips its own range check of these: done here; a
        # linked value is None here and checked when the node runs)
        try:
            check_widget_ranges(cls, threshold=threshold, threshold_mode=threshold_mode)
            if None not in (threshold_mode, threshold):
                saliency.check_threshold(threshold_mode, threshold)
        except ValueError as e:
            return str(e)
        return True

    @widgets_checked
    def execute(self, image, reward, mask_source, saliency_method, blur_sigma, threshold_mode, threshold, dilation,
                feather):
        I = image_to_bchw(image, "image", _MIN_SIDE)

        def mask(r, x):  # smoothgrad's noise the same for each image, as for the Train node's masks
            return saliency.mask_from_reward(
                r, x, mask_source=mask_source, saliency_method=saliency_method,
                generator=saliency.mask_noise(x.device), blur_sigma=blur_sigma, threshold_mode=threshold_mode,
                threshold=threshold, dilation=dilation, feather=feather).cpu()
        with grad_mode():
            M = torch.cat(each_image(reward, I, mask))
        return (b1hw_to_mask(M), bchw_to_image(viz.mask_overlay(I, M)))


class FocusFixCompare:
    DESCRIPTION = "Before/after: side-by-side grid with the change map, reward before/after, change inside vs outside the mask."
    CATEGORY = "FocusFix/rewards"
    FUNCTION = "execute"
    RETURN_TYPES = ("IMAGE", "STRING", "FLOAT", "FLOAT", "FLOAT", "FLOAT")
    RETURN_NAMES = ("grid", "text", "reward_before", "reward_after", "change_inside", "change_outside")
    OUTPUT_TOOLTIPS = ("One row per image; columns: before | after | |after - before| on one fixed scale for every "
                       "row (blue = no change, red = 0.25 or more).", "All numbers, readable.",
                       "Mean reward of the before images (0 without a reward).",
                       "Mean reward of the after images (0 without a reward).",
                       "Mean |after - before| inside the mask (1 = may change); NaN when nothing is inside.",
                       "Mean |after - before| outside the mask; NaN when nothing is outside (no mask, or a full one).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"before": tip("IMAGE", "I0: images without the fix."),
                             "after": tip("IMAGE", "I: the same seeds with the fix (same size and count).")},
                "optional": {"mask": tip("MASK", "M (1 = may change); resized to the images if needed."),
                             "reward": tip(REWARD, "Reward to score both batches with.")}}

    def execute(self, before, after, mask=None, reward=None):
        I0, I = image_to_bchw(before, "before", _MIN_SIDE), image_to_bchw(after, "after", _MIN_SIDE)
        if I0.shape != I.shape:
            raise ValueError(f"before and after must have the same shape, got {tuple(before.shape)} and {tuple(after.shape)}")
        M, note = (torch.ones_like(I0[:, :1]), "") if mask is None else mask_to_b1hw(mask, I0.shape[-2:], len(I0))
        D = (I - I0).abs().mean(1, keepdim=True)                       # (B, 1, H, W)
        inside, outside = viz.weighted_mean(D, M), viz.weighted_mean(D, 1 - M)
        rb = ra = 0.0
        if reward is not None:
            with grad_mode(), torch.no_grad():
                s = torch.tensor(each_image(reward, torch.cat([I0, I]), lambda r, x: float(r(x).float()[0])))
            rb, ra = float(s[: len(I0)].mean()), float(s[len(I0):].mean())
        scored = f"reward before {rb:.4f} -> after {ra:.4f}" if reward is not None else "reward: none connected"
        text = (f"{scored}\nchange inside mask {_fmt(inside, 'empty mask')}, "
                f"outside {_fmt(outside, 'no mask' if mask is None else 'full mask')}" + (f"\n{note}" if note else ""))
        heat = viz.heat_overlay(torch.zeros_like(I0), D, alpha=1.0, vmax=viz.CHANGE_SCALE)
        rows = torch.stack([I0, I, heat], 1).flatten(0, 1)             # (B*3, 3, H, W)
        return (bchw_to_image(viz.image_grid(rows, nrow=3)), text, rb, ra, inside, outside)


def _fmt(value: float, empty: str) -> str:
    return f"n/a ({empty})" if math.isnan(value) else f"{value:.4f}"
