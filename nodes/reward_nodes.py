"""Reward nodes: FocusFix Load Reward, Combine Rewards, Score Images, Saliency Mask, Compare."""
from __future__ import annotations

import torch

from ..focusfix_core import saliency, viz
from ..focusfix_core.rewards.composite import WeightedSum
from ..focusfix_core.rewards.loading import TOWER_DTYPES
from .adapters import b1hw_to_mask, bchw_to_image, grad_mode, image_to_bchw, load_reward_by_name, mask_to_b1hw, \
    reward_choices, reward_on
from .common import REWARD, file_fingerprint, tip

__all__ = ["FocusFixLoadReward", "FocusFixCombineRewards", "FocusFixScoreImages", "FocusFixSaliencyMask", "FocusFixCompare", "score_table"]


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
            "precision": tip(list(TOWER_DTYPES), "Precision of a CLIP reward's image tower (aesthetic, safety), "
                             "which holds nearly all its weights: fp32 (1.14 GiB for ViT-L/14) gives the most exact "
                             "gradients; bf16 halves it (0.57 GiB), for 8-12 GB cards. Heads and thresholds stay "
                             "fp32; rewards without a tower ignore this.", default="fp32"),
            "clip_vision": tip("CLIP_VISION", "CLIP ViT-L/14 image tower, for an aesthetic head stored without one."),
        }}

    @classmethod
    def IS_CHANGED(cls, reward_name, **_):
        # a reward file converted again under the same name is read again
        return reward_name if reward_name.startswith("builtin:") else file_fingerprint("focusfix_rewards", reward_name)

    def execute(self, reward_name, precision="fp32", clip_vision=None):
        return (load_reward_by_name(reward_name, clip_vision, precision),)


class FocusFixCombineRewards:
    DESCRIPTION = ("One reward from two: weight_a * r_a(I) + weight_b * r_b(I), e.g. aesthetic + safety. Scales "
                   "differ (aesthetic about 1..10, the safety margin about -0.1..0.1): weight so both count.")
    CATEGORY = "FocusFix/rewards"
    FUNCTION = "execute"
    RETURN_TYPES = (REWARD,)
    RETURN_NAMES = ("reward",)
    OUTPUT_TOOLTIPS = ("The weighted sum, for scoring, saliency masks and Focus-N-Fix training.",)

    @classmethod
    def INPUT_TYPES(cls):
        weight = dict(default=1.0, min=-1000.0, max=1000.0, step=0.01)
        return {"required": {
            "reward_a": tip(REWARD, "r_a (FocusFix Load Reward)."),
            "weight_a": tip("FLOAT", "Weight of r_a (0 = ignore it, < 0 = push it down).", **weight),
            "reward_b": tip(REWARD, "r_b (FocusFix Load Reward)."),
            "weight_b": tip("FLOAT", "Weight of r_b (0 = ignore it, < 0 = push it down).", **weight),
        }}

    def execute(self, reward_a, weight_a, reward_b, weight_b):
        r = WeightedSum([(reward_a, float(weight_a)), (reward_b, float(weight_b))])
        r.name = f"{weight_a:g}*{reward_a.name} + {weight_b:g}*{reward_b.name}"  # shown in score tables
        return (r,)


class FocusFixScoreImages:
    DESCRIPTION = "Score images with a reward; show where the reward dislikes them (its heatmap, else gradient saliency)."
    CATEGORY = "FocusFix/rewards"
    FUNCTION = "execute"
    RETURN_TYPES = ("FLOAT", "STRING", "MASK", "IMAGE")
    RETURN_NAMES = ("scores", "text", "heatmap", "overlay")
    OUTPUT_IS_LIST = (True, False, False, False)
    OUTPUT_TOOLTIPS = ("One score per image (a list).", "The scores, readable.",
                       "Where the reward dislikes each image, [0,1] per image (1 = worst).",
                       "The heatmap over the images.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": tip("IMAGE", "Images to score."),
                             "reward": tip(REWARD, "The reward (FocusFix Load Reward).")}}

    def execute(self, image, reward):
        with grad_mode():
            r, I = reward_on(reward, image_to_bchw(image))
            with torch.no_grad():
                scores = r(I).float().cpu().tolist()
            heat = _heatmap(r, I)
        return (scores, score_table(scores, r.name), b1hw_to_mask(heat), bchw_to_image(viz.heat_overlay(I, heat)))


def _heatmap(reward, I):
    """[B,1,H,W] in [0,1]: the reward's heatmap if it has one, else gradient saliency, min-max normalised."""
    if getattr(reward, "has_heatmap", False):
        with torch.no_grad():
            H = reward.heatmap(I).float()
    else:
        H = saliency.gradient_saliency(reward, I)
    H = H if H.ndim == 4 else H[:, None]
    H = torch.nn.functional.interpolate(H, size=I.shape[-2:], mode="bilinear") if H.shape[-2:] != I.shape[-2:] else H
    lo, hi = H.amin((1, 2, 3), keepdim=True), H.amax((1, 2, 3), keepdim=True)
    return ((H - lo) / (hi - lo).clamp_min(1e-8)).detach()


class FocusFixSaliencyMask:
    DESCRIPTION = ("Focus-N-Fix mask M(I0): where the reward says the image should change (1) and where it must "
                   "stay (0). A plain MASK: edit it with GrowMask, ThresholdMask, MaskComposite or the mask editor.")
    CATEGORY = "FocusFix/masks"
    FUNCTION = "execute"
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("mask", "overlay")
    OUTPUT_TOOLTIPS = ("M: [B,H,W] in [0,1], 1 = may change.", "The mask tinted red over the images.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": tip("IMAGE", "I0: the base model's images."),
            "reward": tip(REWARD, "The reward whose dislikes the mask marks."),
            "source": tip(list(saliency.MASK_SOURCES), "heatmap: the reward's own localisation; saliency: "
                          "|dr/dI|; auto: heatmap when the reward has one."),
            "method": tip(list(saliency.SALIENCY_METHODS), "Gradient saliency variant (saliency source only)."),
            "blur_sigma": tip("FLOAT", "Blur before thresholding, in pixels.", default=2.0, min=0.0, max=64.0, step=0.1),
            "threshold_mode": tip(list(saliency.THRESHOLD_MODES), "value: keep >= threshold; top_percent: keep "
                                  "that fraction of pixels; otsu: automatic.", default="top_percent"),
            "threshold": tip("FLOAT", "Cut-off (value) or kept fraction (top_percent).", default=0.15, min=0.0,
                             max=1.0, step=0.01),
            "dilation": tip("INT", "Grow the mask by this many pixels.", default=2, min=0, max=256),
            "feather": tip("FLOAT", "Soften the mask edge (Gaussian sigma, pixels).", default=0.0, min=0.0, max=64.0, step=0.1),
        }}

    def execute(self, image, reward, source, method, blur_sigma, threshold_mode, threshold, dilation, feather):
        with grad_mode():
            r, I = reward_on(reward, image_to_bchw(image))
            M = saliency.mask_from_reward(r, I, source, method=method, blur_sigma=blur_sigma, threshold_mode=threshold_mode,
                                          threshold=threshold, dilation=dilation, feather=feather)
        return (b1hw_to_mask(M), bchw_to_image(viz.mask_overlay(I, M)))


class FocusFixCompare:
    DESCRIPTION = "Before/after: side-by-side grid with the change map, reward before/after, change inside vs outside the mask."
    CATEGORY = "FocusFix/rewards"
    FUNCTION = "execute"
    RETURN_TYPES = ("IMAGE", "STRING", "FLOAT", "FLOAT", "FLOAT", "FLOAT")
    RETURN_NAMES = ("grid", "text", "reward_before", "reward_after", "change_inside", "change_outside")
    OUTPUT_TOOLTIPS = ("Rows: before | after | |after - before|.", "All numbers, readable.",
                       "Mean reward of the before images (0 without a reward).", "Mean reward of the after images.",
                       "Mean |after - before| inside the mask (1 = may change).", "Mean |after - before| outside the mask.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"before": tip("IMAGE", "I0: images without the fix."),
                             "after": tip("IMAGE", "I: the same seeds with the fix (same size and count).")},
                "optional": {"mask": tip("MASK", "M (1 = may change); resized to the images if needed."),
                             "reward": tip(REWARD, "Reward to score both batches with.")}}

    def execute(self, before, after, mask=None, reward=None):
        I0, I = image_to_bchw(before, "before"), image_to_bchw(after, "after")
        if I0.shape != I.shape:
            raise ValueError(f"before and after must have the same shape, got {tuple(before.shape)} and {tuple(after.shape)}")
        M, note = (torch.ones_like(I0[:, :1]), "") if mask is None else mask_to_b1hw(mask, I0.shape[-2:], len(I0))
        D = (I - I0).abs().mean(1, keepdim=True)                       # (B, 1, H, W)
        inside = float((D * M).sum() / M.sum().clamp_min(1e-8))
        outside = float((D * (1 - M)).sum() / (1 - M).sum().clamp_min(1e-8)) if mask is not None else 0.0
        rb = ra = 0.0
        if reward is not None:
            with grad_mode(), torch.no_grad():
                r, both = reward_on(reward, torch.cat([I0, I]))
                s = r(both).float().cpu()
            rb, ra = float(s[: len(I0)].mean()), float(s[len(I0):].mean())
        text = (f"reward before {rb:.4f} -> after {ra:.4f}\nchange inside mask {inside:.4f}, outside {outside:.4f}"
                + (f"\n{note}" if note else ""))
        heat = viz.heat_overlay(torch.zeros_like(I0), D, alpha=1.0)
        rows = torch.stack([I0, I, heat], 1).flatten(0, 1)             # (B*3, 3, H, W)
        return (bchw_to_image(viz.image_grid(rows, nrow=3)), text, rb, ra, inside, outside)
