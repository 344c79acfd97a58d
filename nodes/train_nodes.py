"""Training nodes: FocusFix Train Focus-N-Fix and FocusFix Train Separate-and-Enhance.

Each node adapts its inputs, runs one core trainer under `training_session` (out of inference mode, weights
autograd-safe, LoRA hooks removed in `finally`), shows progress (Focus-N-Fix with previews), and honours cancel
at the next sampler step (Focus-N-Fix, also mid-step; Separate-and-Enhance within one UNet call): a cancelled run
raises before any output exists, so nothing half-built leaves the node.
"""
from __future__ import annotations

import torch

from ..focusfix_core import viz
from ..focusfix_core.attention import maps_scale, maps_tiles
from ..focusfix_core.losses import overlap_and_peaks
from ..focusfix_core.lora import TARGET_PRESETS
from ..focusfix_core.sampler import check_steps
from ..focusfix_core.saliency import SALIENCY_METHODS, THRESHOLD_MODES, check_mask, check_threshold
from ..focusfix_core.trainers import (MASK_SOURCES, MAX_RANK, FixConfig, SeparateEnhanceConfig, batch_note,
                                      check_continued_method, repeated_prompts_note, repeated_seeds_note,
                                      split_objects_prompt, unchanged_notes)
from .adapters import (ComfyDiffusionModel, b1hw_to_mask, bchw_to_image, check_comfyui_trains, check_conditioning,
                       conditioning_ignored, conditioning_to_conds, mask_to_b1hw)
from .common import (GRAPH_INPUTS, LORA, REWARD, RESOLUTION_TIP, check_map_size, check_widget_ranges, clock,
                     comment_notes, graph_metadata, log, parse_ints, parse_lines, sampler_inputs, tip,
                     widgets_checked)
from .lora_nodes import loras_name
from .runs import checkpoint_path, run_focus_n_fix, run_separate_enhance

__all__ = ["FocusFixTrainFocusNFix", "FocusFixTrainSeparateEnhance"]

CURVES_FIX = ("loss", "reward", "region")
NO_TARGET = 1e9  # the reward_target widget's "never stop" (a FLOAT widget has no None)
CURVES_SE = ("loss", "separate", "enhance", "preserve")


MODEL_TIP = "The checkpoint's diffusion model (an SD1.x, SD2.x or SDXL-type UNet); it is not modified."
FIX_SEED_TIP = ("Seed of the run: the new LoRA's start and the item order (not the images' noise: see seeds; "
                "smoothgrad's noise is fixed, as in Saliency Mask). A rerun gives the same LoRA.")
SNE_SEED_TIP = ("Seed of the run: the new LoRA's start, the prompts each step draws, the training noise, and the "
                "noise of the attention maps before and after. A rerun gives the same LoRA.")


def _lora_inputs(default_targets: str, lr: float, iterations: int, seed_tip: str) -> dict:
    return {
        "rank": tip("INT", "LoRA rank r.", default=4, min=1, max=MAX_RANK),
        "targets": tip(list(TARGET_PRESETS), "Layers the LoRA adapts: attn (all attention projections), to_k "
                       "(cross-attention keys only), all_linear (every Linear layer of the UNet).",
                       default=default_targets),
        "lr": tip("FLOAT", "Learning rate (AdamW).", default=lr, min=1e-6, max=1.0, step=1e-6, round=1e-6),
        "iterations": tip("INT", "Optimizer steps.", default=iterations, min=1, max=100000),
        "seed": tip("INT", seed_tip, default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False),
    }


def _continue_input(compared: str) -> dict:
    return {"continue_from": tip(LORA, "Train this FocusFix LoRA further (from a Train node or FocusFix Load LoRA) "
                                 "instead of a new one: its rank and targets are used, not the rank and targets "
                                 f"inputs. {compared} still compare with the MODEL without any LoRA: connect "
                                 f"the MODEL without this one (a MODEL that already carries it is refused).")}


def _continued_settings(continue_from, method: str, rank: int, targets: str, notes: list[str]):
    """(rank, targets, alpha) for the config: the continued LoRA's, with a report note when the node's differ;
    the node's own (alpha None = rank) for a new LoRA. A LoRA of the other method is refused."""
    if continue_from is None:
        return rank, targets, None
    check_continued_method(continue_from.method, method, f"continue_from ({continue_from!r})",
                           "apply it to the MODEL first (FocusFix Apply LoRA or Load LoRA) and train a new LoRA on "
                           "that MODEL")
    if continue_from.rank > MAX_RANK:  # the config would name the rank input, which a continued run does not use
        raise ValueError(f"continue_from ({continue_from!r}): its rank {continue_from.rank} is above {MAX_RANK}, "
                         f"the most FocusFix trains: train a new LoRA with rank {MAX_RANK} or lower")
    t = continue_from.saved().config_targets
    note = f"continued {continue_from!r}, targets {t}"
    if (int(rank), targets) != (continue_from.rank, t):
        note += f" (the node's rank {rank} and targets {targets} are not used)"
    notes.append(note)
    return continue_from.rank, t, continue_from.alpha


def _batch_input(what: str, memory: str) -> dict:
    return {"batch_size": tip("INT", f"{what} per optimizer step: larger batches give smoother updates and take "
                              f"more memory ({memory}).", default=1, min=1, max=64)}


CHECKPOINT_INPUTS = {
    "checkpoint_every": tip("INT", "Save the LoRA into the loras folder every N iterations and after the last (0 = "
                            "off): a cancel keeps the last one saved, all of training once it ended.", default=0,
                            min=0, max=100000),
    "checkpoint_name": tip("STRING", "Checkpoint file in the loras folder, replaced by each checkpoint of this run. An "
                           "existing file of that name is kept and a counter added; the report names the file.",
                           default="focusfix/checkpoint"),
}


def _check_checkpoint_name(every: int | None, name: str | None) -> None:
    """At queue time: a checkpoint name that would leave the loras folder fails now, not after `every` steps."""
    if name is not None and every != 0:  # every None: linked, maybe on
        checkpoint_path(1, name)


def _stopped_notes(stopped: str | None, history, iterations: int) -> list[str]:
    """The report's first line when training ended early (a loss turned NaN/inf): what the outputs hold."""
    if stopped is None:
        return []
    return [f"WARNING: training stopped after {len(history)} of {iterations} iterations: {stopped}. The outputs "
            f"are of that step"]


def _checkpoint_note(path, every: int, iterations: int, error: str | None = None,
                     stopped: bool = False) -> list[str]:
    """Where the run's checkpoints went, or why there is none; `error`: why the last write failed; `stopped`:
    training ended early, after its last good step, which the checkpoint holds."""
    if every <= 0:
        return []
    if error is not None:
        kept = f"{loras_name(path)} holds an earlier step" if path is not None else "no checkpoint was written"
        went_on = "training had stopped" if stopped else "training went on"
        return [f"checkpoint: {error}; {went_on} ({kept}; the LoRA output holds every step trained)"]
    if path is None:
        return ["checkpoint: none was written"]
    when = (f"every {every} iterations and after the last" if every < iterations else "after the last iteration")
    when = "after the last good step" if stopped else when
    return [f"checkpoint: {loras_name(path)} ({when}; FocusFix Load LoRA lists it, to continue from)"]


def _curve(history, keys) -> torch.Tensor:
    series = {k: [getattr(r, k) for r in history] for k in keys}
    return viz.plot_curves({k: v for k, v in series.items() if any(x is not None for x in v)})[None]


class FocusFixTrainFocusNFix:
    DESCRIPTION = ("Focus-N-Fix (CVPR 2025): fine-tune a LoRA so the reward rises inside the mask M while the image "
                   "outside M stays as it was: L = -r(I) + lam * ||(1-M) * (I0 - I)||. Gradients flow through the "
                   "last K sampler steps (DRaFT-K). mask_source none (or lam 0) = plain DRaFT.")
    CATEGORY = "FocusFix/train"
    FUNCTION = "execute"
    RETURN_TYPES = (LORA, "IMAGE", "IMAGE", "IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("lora", "curve", "before", "after", "mask", "report")
    OUTPUT_TOOLTIPS = ("The trained LoRA (Apply LoRA / Save LoRA).", "Loss, reward and outside-mask change per step.",
                       "I0: every (prompt, seed) without the LoRA.", "I: the same with the trained LoRA.",
                       "M of each image (1 = may change; lam 0 trains without it).",
                       "Settings, final numbers and notes.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": tip("MODEL", MODEL_TIP),
            "vae": tip("VAE", "The checkpoint's VAE (decodes I for the reward)."),
            "reward": tip(REWARD, "r(I), higher = better (FocusFix Load Reward)."),
            "prompts": tip("STRING", "One prompt per line (a line starting with # is skipped).", multiline=True,
                           default="a photo of a cat"),
            "negative_prompt": tip("STRING", "Negative prompt for CFG.", multiline=True, default=""),
            "seeds": tip("STRING", "Seeds to train on: 0, 1, 2 or 0-3. Each (prompt, seed) is one training image.", default="0"),
            "width": tip("INT", "Image width in pixels.", default=512, min=16, max=4096, step=8),
            "height": tip("INT", "Image height in pixels.", default=512, min=16, max=4096, step=8),
            "steps": tip("INT", "Sampler steps N: KSampler with these steps, sampler_name and scheduler draws the "
                         "same images.", default=20, min=1, max=200),
            "cfg": tip("FLOAT", "Classifier-free guidance scale.", default=5.0, min=1.0, max=30.0, step=0.1),
            "K": tip("INT", "Differentiated last sampler steps (DRaFT-K); at most steps.", default=1, min=1, max=200),
            "lam": tip("FLOAT", "lam: weight of the region term ||(1-M)(I0-I)||; 0 = plain DRaFT.", default=1.0,
                       min=0.0, max=1000.0, step=0.01),
            "mask_source": tip(list(MASK_SOURCES), "Where M comes from: the reward's heatmap, its gradient saliency, "
                               "the MASK input, or none (plain DRaFT)."),
            **_lora_inputs("attn", 1e-4, 50, FIX_SEED_TIP),
        }, "optional": {
            "clip": tip("CLIP", "The checkpoint's text encoder: encodes the prompts (not needed when positive and "
                        "negative are connected)."),
            "mask": tip("MASK", "Painted M (1 = may change): 1 mask for all images, one per seed (used for every "
                        "prompt), or one per (prompt, seed) image in the order of the before output. Connected = "
                        "used (mask_source mask)."),
            "positive": tip("CONDITIONING", "Use this conditioning instead of encoding the prompts (one entry per prompt). "
                            "Training reads the text encoding and SDXL's size conditioning; the report names any "
                            "other part (area, mask, ControlNet, timestep range), which it ignores."),
            "negative": tip("CONDITIONING", "Use this negative conditioning instead of the negative prompt."),
            "threshold_mode": tip(list(THRESHOLD_MODES), "How M is cut from the heatmap or saliency map, as in "
                                  "Saliency Mask: value: keep >= threshold; top_percent: keep that fraction of "
                                  "pixels; otsu: automatic.",
                                  default="top_percent"),
            "threshold": tip("FLOAT", "Cut-off (value) or kept fraction in (0,1] (top_percent); otsu ignores it. "
                             "Training blurs the map by 2 px first, as Saliency Mask's default blur_sigma.",
                             default=0.15, min=0.0, max=1.0, step=0.01),
            "dilation": tip("INT", "Grow the mask by this many pixels.", default=2, min=0, max=256),
            "saliency_method": tip(list(SALIENCY_METHODS), "Gradient saliency variant (mask_source saliency)."),
            **_continue_input("The run's I0 and masks"),
            **CHECKPOINT_INPUTS,
            **sampler_inputs("I0 and I are sampled"),
            **_batch_input("(prompt, seed) items", "SD1.5 at 512 px, modelled: about 4 GiB at 1, 7.7 GiB at 4"),
            "reward_target": tip("FLOAT", "Stop pushing an image once its reward reaches this (Score Images shows the "
                                 "scores); from then on only the region term acts on it, pulling it back to I0 "
                                 f"outside M. Guards against reward hacking. {NO_TARGET:g} = never stop.",
                                 default=NO_TARGET, min=-NO_TARGET, max=NO_TARGET, step=0.01),
            "sigmas": tip("SIGMAS", "Sample with these sigmas (a scheduler node such as BasicScheduler, "
                          "KarrasScheduler or AlignYourStepsScheduler, as SamplerCustom uses them) instead of steps "
                          "and scheduler; a full denoise, ending at 0."),
        }, "hidden": GRAPH_INPUTS}

    @classmethod
    def VALIDATE_INPUTS(cls, steps, K, seeds=None, sigmas=(), mask_source=None, threshold_mode=None, threshold=None,
                        checkpoint_every=None, checkpoint_name=None, mask=()):
        # ComfyUI skips its own min/max check for inputs named here, and passes None for a linked one (steps from
        # a PrimitiveInt shared with KSampler, a SIGMAS node): its value is known, and checked, only when it runs.
        # It shows the message under every input named here, so each message starts with the input at fault.
        try:
            check_widget_ranges(cls, steps=steps, K=K, threshold=threshold, checkpoint_every=checkpoint_every,
                                mask_source=mask_source, threshold_mode=threshold_mode)
            if steps is not None:  # with SIGMAS connected, their step count bounds K instead
                check_steps(steps, K if K is not None and sigmas is not None else 1, least_K=1)
            if seeds is not None:
                parse_ints(seeds)
            # a connected MASK (None here) replaces mask_source: its threshold is then unused
            derived = mask_source in ("heatmap", "saliency") and mask is not None
            if derived and None not in (threshold_mode, threshold):
                check_threshold(threshold_mode, threshold)
            _check_checkpoint_name(checkpoint_every, checkpoint_name)
        except ValueError as e:
            return str(e)
        return True

    @widgets_checked
    def execute(self, model, vae, reward, prompts, negative_prompt, seeds, width, height, steps, cfg, K, lam,
                mask_source, rank, targets, lr, iterations, seed, clip=None, mask=None, positive=None, negative=None,
                threshold_mode="top_percent", threshold=0.15, dilation=2, saliency_method="grad", continue_from=None,
                checkpoint_every=0, checkpoint_name="focusfix/checkpoint", sampler_name="ddim", scheduler="normal",
                sigmas=None, batch_size=1, reward_target=NO_TARGET, prompt=None, extra_pnginfo=None):
        check_comfyui_trains()
        dm = ComfyDiffusionModel(model.clone(), clip, vae)
        notes = []
        rank, targets, alpha = _continued_settings(continue_from, "focus-n-fix", rank, targets, notes)
        labels, negative_prompt, cond, uncond = _text_inputs(dm, prompts, negative_prompt, positive, negative, notes)
        schedule = _schedule(sigmas, notes)
        seed_list = _seed_list(seeds, notes)
        masks, mask_source = _mask_input(mask, mask_source, (height, width), len(labels), len(seed_list), lam, notes)
        notes += batch_note(batch_size, len(labels) * len(seed_list))
        run = run_focus_n_fix(dm, reward, lambda: FixConfig(
            prompts=tuple(labels), seeds=tuple(seed_list), negative_prompt=negative_prompt, height=height,
            width=width, steps=steps, cfg_scale=cfg, K=K, sampler_name=sampler_name, scheduler=scheduler,
            sigmas=schedule,
            lam=lam, reward_target=None if reward_target >= NO_TARGET else reward_target,
            mask_source=mask_source,
            lr=lr, rank=rank, alpha=alpha, targets=targets, iterations=iterations, seed=seed, batch_size=batch_size,
            threshold_mode=threshold_mode, threshold=threshold, dilation=dilation, saliency_method=saliency_method),
            masks=masks, cond=cond, uncond=uncond, checkpoint_every=checkpoint_every, checkpoint_name=checkpoint_name,
            continue_from=continue_from, graph=graph_metadata(prompt, extra_pnginfo))
        M = torch.ones_like(run.I0[:, :1]) if run.M is None else run.M
        # an image held whole, not at all, or in part; with lam 0 nothing is held (_mask_input's note says so)
        notes += [] if run.M is None or lam == 0 else check_mask(run.M, "M")
        notes += [f"prompt {p!r}, seed {s}: no mask (the reward's {mask_source} of its image is flat); training "
                  f"never drew it, and its before/after show it with an empty mask" for p, s in run.unmasked]
        report = "\n".join([*_stopped_notes(run.stopped, run.history, iterations),
                            repr(run.lora), run.history[-1].summary(), _timing(run.history),
                            _redraw_note(steps, cfg, sampler_name, scheduler, sigmas, width, height),
                            *dm.redraw_caveats(), *notes,
                            *_checkpoint_note(run.checkpoint, checkpoint_every, iterations, run.checkpoint_error,
                                              run.stopped is not None),
                            *_precision_notes(run.history), *_non_finite_notes(run.I),
                            *_unchanged_notes(run.history, None if reward_target >= NO_TARGET else reward_target)])
        log.info(report)
        return (run.lora, bchw_to_image(_curve(run.history, CURVES_FIX)), bchw_to_image(run.I0), bchw_to_image(run.I),
                b1hw_to_mask(M), report)


def _text_inputs(dm, prompts: str, negative_prompt: str, positive, negative, notes: list[str]):
    """(prompt labels, negative prompt label, cond, uncond) from the typed prompts or the CONDITIONING inputs
    (cond/uncond: None = encode the text; else callables, run inside the training session)."""
    if dm.clip is None and (positive is None or negative is None):
        missing = "the prompts and the negative_prompt" if positive is None else "the negative_prompt"
        raise ValueError(f"connect the checkpoint's CLIP (clip input) to encode {missing}, or connect both "
                         f"positive and negative CONDITIONING")
    for conditioning, name in ((positive, "positive"), (negative, "negative")):
        if conditioning is not None:
            check_conditioning(conditioning, name)  # now, not once the session has loaded the MODEL
            notes += conditioning_ignored(conditioning, name)
    cond = uncond = None
    if positive is not None:
        n = sum(len(c[0]) for c in positive)
        labels = [f"positive[{i}]" for i in range(n)]
        cond = lambda: conditioning_to_conds(positive, dm.is_adm)  # noqa: E731  (one per entry: own lengths)
        if n > 1:  # KSampler would blend them (Conditioning Combine) into one image
            notes.append(f"positive has {n} entries: each is trained as its own prompt (positive[0..{n - 1}]); "
                         f"KSampler draws one image from all of them together, so to draw item i again give "
                         f"KSampler the text encoding of entry i alone")
    else:
        labels = parse_lines(prompts)
        notes += comment_notes(prompts) + repeated_prompts_note(labels)
    if negative is not None:
        negative_prompt = "negative[0]"  # the label the report and the LoRA's metadata show
        uncond = lambda: conditioning_to_conds(negative, dm.is_adm, "negative")[0]  # noqa: E731
        if sum(len(c[0]) for c in negative) > 1:
            notes.append("negative has several entries: the first is the negative prompt of every item")
    return labels, negative_prompt, cond, uncond


def _seed_list(seeds: str, notes: list[str]) -> list[int]:
    values = parse_ints(seeds)
    notes += repeated_seeds_note(values)
    return values


def _mask_input(mask, mask_source: str, size: tuple[int, int], n_prompts: int, n_seeds: int, lam: float,
                notes: list[str]):
    """(masks [N,1,H,W] or None, mask_source) from the MASK input, with report notes on how it is used."""
    if lam == 0 and (mask is not None or mask_source != "none"):  # the region term is off: no M holds anything
        which = "the connected MASK" if mask is not None else f"mask_source {mask_source!r}"
        notes.append(f"lam 0: plain DRaFT, the whole image may change; M ({which}) is not used in training, only "
                     f"passed on at the mask output (Compare measures the change outside it)")
    elif mask is not None and mask_source != "mask":
        notes.append(f"a MASK is connected: it is used instead of mask_source {mask_source!r}")
    if mask is not None:
        mask_source = "mask"
    if mask_source == "mask" and mask is None:
        raise ValueError("mask_source is 'mask' but no MASK is connected")
    if mask is None:
        return None, mask_source
    masks, note = mask_to_b1hw(mask, size)
    notes += [note] if note else []
    n = len(masks)
    if n not in (1, n_seeds, n_prompts * n_seeds):  # the core's rule, named by this node's input
        raise ValueError(f"mask has {n} masks: expected 1 (for every image), one per seed ({n_seeds}) or one per "
                         f"(prompt, seed) image ({n_prompts * n_seeds}, in the order of the before output)")
    if n > 1 and n_prompts > 1:  # the core's rule: one per (prompt, seed) item when the counts fit, else per seed
        notes.append(f"{n} masks: one per (prompt, seed) item, in the order of the before images" if
                     n == n_prompts * n_seeds else f"{n} masks: one per seed, for every prompt")
    return masks, mask_source


def _redraw_note(steps: int, cfg: float, sampler_name: str, scheduler: str, sigmas, width: int,
                 height: int) -> str:
    """The report line that says how to draw the before/after images again outside the Train node."""
    each = (f"each prompt and seed, the negative prompt, an Empty Latent Image of {width}x{height} and batch size "
            f"1")
    if sigmas is not None:
        note = (f"SamplerCustom draws these images ({each}) with the connected sigmas, cfg {cfg:g} and sampler "
                f"{sampler_name}")
        s = torch.as_tensor(sigmas).flatten()
        # its second-order step divides by the previous step's size: 0 after a repeated sigma (not at the last)
        if sampler_name == "dpmpp_2m" and bool((s[1:-2] == s[:-3]).any()):
            note += (" (not with these sigmas: after a repeated sigma ComfyUI's dpmpp_2m divides by zero and draws "
                     "black; remove the repeat, or use ddim)")
        return note
    return (f"KSampler draws these images ({each}) with steps {steps}, cfg {cfg:g}, sampler_name {sampler_name}, "
            f"scheduler {scheduler}")


def _schedule(sigmas, notes: list[str]) -> tuple[float, ...]:
    """A connected SIGMAS as the config's sigmas (checked there), with a report note; () when none is."""
    if sigmas is None:
        return ()
    values = tuple(float(s) for s in torch.as_tensor(sigmas).flatten().tolist())
    if len(values) < 2:  # () would read as "no sigmas" downstream: steps and scheduler, while the report said sigmas
        raise ValueError(f"sigmas is connected but holds {len(values)} value(s), expected steps + 1 (at least 2): "
                         f"a SplitSigmas step past the end of its schedule? Connect sigmas of a full denoise, or "
                         f"disconnect sigmas to use steps and scheduler")
    notes.append(f"sigmas connected: {len(values) - 1} steps from them (the steps and scheduler inputs are not used)")
    return values


def _timing(history) -> str:
    """The report line with the training time (the steps alone; before/after images not counted)."""
    seconds = [r.seconds for r in history]
    return f"trained {len(seconds)} steps in {clock(sum(seconds))} ({sum(seconds) / len(seconds):.2f} s per step)"


def _unchanged_notes(history, reward_target: float | None) -> list[str]:
    """`unchanged_notes` in the widget's words: a FLOAT widget has no "unset", NO_TARGET is never stop."""
    return unchanged_notes(history, reward_target, unbounded=f"set it to {NO_TARGET:g} to never stop")


def _non_finite_notes(I: torch.Tensor) -> list[str]:
    """A report line when the trained LoRA draws NaN or inf pixels (the after IMAGE shows NaN black)."""
    bad = (~torch.isfinite(I)).flatten(1).any(1).nonzero().flatten().tolist()
    if not bad:
        return []
    return [f"WARNING: with the LoRA, image(s) {bad[:8]}{' ...' if len(bad) > 8 else ''} of {len(I)} hold NaN or inf "
            f"pixels: train again with a lower lr (or lam)"]


def _precision_notes(history) -> list[str]:
    """A report line when the model computes in fp16 and the trainer scaled the loss."""
    scaled = [r for r in history if r.loss_scale is not None]
    if not scaled:
        return []
    skipped = sum(r.skipped for r in scaled)
    return [f"fp16 in the gradient path (UNet or VAE): loss scaling on (last scale {scaled[-1].loss_scale:g}); "
            f"{skipped} of {len(scaled)} updates skipped for fp16 overflow"]


class FocusFixTrainSeparateEnhance:
    DESCRIPTION = ("Separate-and-Enhance (SIGGRAPH 2024): a LoRA on cross-attention to_k that pulls the object words' "
                   "attention maps apart (Separate) and makes each one strong (Enhance), so no object is dropped or merged.")
    CATEGORY = "FocusFix/train"
    FUNCTION = "execute"
    RETURN_TYPES = (LORA, "IMAGE", "IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("lora", "curve", "attention_before", "attention_after", "report")
    OUTPUT_TOOLTIPS = ("The trained LoRA (Apply LoRA / Save LoRA).", "Loss, separate, enhance, preserve per step.",
                       "Object-word attention maps before training (rows: prompts, columns: words).",
                       "The same maps with the trained LoRA.", "Settings, final numbers and notes.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": tip("MODEL", MODEL_TIP),
            "clip": tip("CLIP", "The checkpoint's text encoder."),
            "prompts": tip("STRING", "One per line (a line starting with # is skipped): prompt | object words, "
                           "e.g. 'a cat and a dog | cat, dog' (words separated by ',' or ';'). Each word's first "
                           "whole-word occurrence in the prompt is used; an object of several tokens or words "
                           "('teddy bear', 'black cat') sums their maps. Objects must be distinct words.", multiline=True,
                           default="a cat and a dog | cat, dog"),
            "lam_sep": tip("FLOAT", "lam_sep: weight of the Separate loss (overlap of object maps).", default=1.0,
                           min=0.0, max=100.0, step=0.01),
            "lam_en": tip("FLOAT", "lam_en: weight of the Enhance loss (weakest object's peak).", default=1.0,
                          min=0.0, max=100.0, step=0.01),
            "lam_preserve": tip("FLOAT", "lam_preserve: keep single-object prompts ('a cat', 'a dog'; listed in the "
                                "report) as the base model draws them. Its scale depends on the targets (to_k: the "
                                "keys' relative change; others: the output's MSE).",
                                default=1.0, min=0.0, max=100.0, step=0.01),
            "resolution": tip("INT", RESOLUTION_TIP, default=16, min=2, max=128),
            "width": tip("INT", "Training image width in pixels (the latents are 8x smaller).", default=512, min=16,
                         max=4096, step=8),
            "height": tip("INT", "Training image height in pixels (the latents are 8x smaller).", default=512,
                          min=16, max=4096, step=8),
            **_lora_inputs("to_k", 1e-4, 200, SNE_SEED_TIP),
        }, "optional": {**_continue_input("The preservation term's prompts"), **CHECKPOINT_INPUTS,
                        **_batch_input("Prompts (each with its own noise; a prompt may repeat)",
                                       "each adds one UNet pass at the training size")}, "hidden": GRAPH_INPUTS}

    @classmethod
    def VALIDATE_INPUTS(cls, prompts, resolution=None, width=None, height=None, checkpoint_every=None,
                        checkpoint_name=None, lam_sep=None, lam_en=None):
        # the prompt lines' format is known at queue time (unless prompts comes from a linked node: None)
        try:
            check_widget_ranges(cls, resolution=resolution, width=width, height=height,
                                checkpoint_every=checkpoint_every, lam_sep=lam_sep, lam_en=lam_en)
            if lam_sep == 0 and lam_en == 0:
                raise ValueError("lam_sep and lam_en are both 0: Separate-and-Enhance has nothing to train; give "
                                 "lam_sep or lam_en a weight")
            check_map_size(resolution, width, height)
            if prompts is not None:
                _object_prompts(prompts)
            _check_checkpoint_name(checkpoint_every, checkpoint_name)
        except ValueError as e:
            return str(e)
        return True

    @widgets_checked
    def execute(self, model, clip, prompts, lam_sep, lam_en, lam_preserve, resolution, width, height, rank, targets,
                lr, iterations, seed, continue_from=None, checkpoint_every=0, checkpoint_name="focusfix/checkpoint",
                batch_size=1, prompt=None, extra_pnginfo=None):
        check_comfyui_trains()
        dm = ComfyDiffusionModel(model.clone(), clip)
        notes = []
        rank, targets, alpha = _continued_settings(continue_from, "separate-and-enhance", rank, targets, notes)
        parsed = _object_prompts(prompts)
        notes += comment_notes(prompts) + repeated_prompts_note([p for p, _ in parsed], objects=[o for _, o in parsed])
        run = run_separate_enhance(dm, lambda: SeparateEnhanceConfig(
            prompts=tuple(p for p, _ in parsed), objects=tuple(tuple(o) for _, o in parsed), lam_sep=lam_sep,
            lam_en=lam_en, lam_preserve=lam_preserve, resolution=resolution, height=height, width=width, rank=rank,
            alpha=alpha, targets=targets, lr=lr, iterations=iterations, seed=seed, batch_size=batch_size),
            checkpoint_every=checkpoint_every, checkpoint_name=checkpoint_name, continue_from=continue_from,
            graph=graph_metadata(prompt, extra_pnginfo))
        preservation = run.lora.metadata.get("focusfix_preservation", "none")
        report = "\n".join([*_stopped_notes(run.stopped, run.history, iterations),
                            repr(run.lora), run.history[-1].summary(), _timing(run.history),
                            f"preservation: {preservation}" + (f", on {', '.join(map(repr, run.preserve_prompts))}"
                                                               if preservation != "none" else ""),
                            *_maps_notes(run.A_before, run.A_after, parsed), *dm.redraw_caveats(), *notes,
                            *_checkpoint_note(run.checkpoint, checkpoint_every, iterations, run.checkpoint_error,
                                              run.stopped is not None),
                            *_precision_notes(run.history)])
        top = maps_scale(run.A_before, run.A_after)  # one scale per prompt, before and after: Enhance shows
        return (run.lora, bchw_to_image(_curve(run.history, CURVES_SE)),
                bchw_to_image(_maps_grid(run.A_before, top=top)), bchw_to_image(_maps_grid(run.A_after, top=top)),
                report)


def _object_prompts(text: str) -> list[tuple[str, list[str]]]:
    """'a cat and a dog | cat, dog' lines -> [(prompt, object words)]; ValueError naming a bad line."""
    return [split_objects_prompt(line) for line in parse_lines(text)]


def _maps_notes(before: torch.Tensor, after: torch.Tensor, parsed) -> list[str]:
    """Per prompt: its words' overlap and peaks before -> after (the maps [P,n,h,w] of the attention outputs)."""
    lines = []
    for i, (text, words) in enumerate(parsed):
        (o0, p0), (o1, p1) = (overlap_and_peaks(A[i:i + 1, :len(words)].float().cpu()) for A in (before, after))
        peaks = ", ".join(f"{w} {a:.4g} -> {b:.4g}" for w, a, b in zip(words, p0, p1))
        lines.append(f"maps of {text!r}: overlap {o0:.4g} -> {o1:.4g}; peaks {peaks}")
    return lines


def _maps_grid(A: torch.Tensor, size: int = 128, top: torch.Tensor | None = None) -> torch.Tensor:
    """A: [P, n, h, w] -> one grid image [1,3,H,W], rows = prompts, columns = words (`maps_tiles`). top: [P]
    each row's scale (`maps_scale`); None scales every map by its own max."""
    return viz.image_grid(maps_tiles(A, size, top).flatten(0, 1), nrow=A.shape[1])[None]
