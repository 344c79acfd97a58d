"""ComfyUI objects <-> focusfix_core objects. The only place ComfyUI layouts are converted (STYLE rule 4).

- IMAGE `[B,H,W,C]` in [0,1]  <->  I: `[B,3,H,W]`
- MASK `[B,H,W]` (or `[H,W]`) <->  M: `[B,1,H,W]` (1 = may change)
- MODEL + CLIP + VAE          ->  `ComfyDiffusionModel`, the core's `DiffusionModel` protocol
- trained adapters            ->  `LoraData` (kohya tensors + metadata), the FOCUSFIX_LORA type

ComfyUI runs every node under `torch.inference_mode()`: its weights and conditioning tensors are inference
tensors, which autograd refuses to save for backward. `training_session` leaves inference mode, enables
grad, and swaps the inference-tensor weights of the modules in the gradient path for plain clones for the
duration of the run (one copy, shared by every differentiated step; the originals are dropped so the weights are
not held twice), and makes them inference tensors again afterwards.

ComfyUI is imported lazily inside functions, so this module (and every node module) imports without it.
"""
from __future__ import annotations

import copy
import functools
import math
import numbers
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..focusfix_core.attention import LiveHW, attention_capture, word_token_indices
from ..focusfix_core.denoisers import CFG_PAIR, CFG_UNCOND, Cond, Guidance, cat_cond
from ..focusfix_core.lora import (SavedLoRA, family_mismatch, lora_metadata, read_focusfix_lora,
                                  release_pinned_memory)
from ..focusfix_core.saliency import fit_mask

__all__ = [
    "image_to_bchw",
    "bchw_to_image",
    "mask_to_b1hw",
    "b1hw_to_mask",
    "ComfyDiffusionModel",
    "check_conditioning",
    "conditioning_to_cond",
    "conditioning_to_conds",
    "conditioning_ignored",
    "training_session",
    "LoraData",
    "model_family",
    "register_reward_folder",
    "reward_choices",
    "load_reward_by_name",
    "grad_mode",
    "reward_device",
    "reward_on",
    "prompt_attention_maps",
]


# -- layouts ---------------------------------------------------------------------------------------------
# the values an IMAGE or a MASK may hold past [0,1] and still be clamped (a resampler's overshoot, a bicubic
# undershoot to -0.445); beyond them 0..255 or [-1,1] data is refused, not guessed (both inputs: one rule)
_CLAMPED_MAX, _CLAMPED_MIN = 2.0, -0.5


def image_to_bchw(image: torch.Tensor, name: str = "image", min_side: int = 1) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] (C = 1, 3 or 4) -> I: [B,3,H,W] float32 in [0,1] (alpha dropped).

    Raises:
        TypeError: not a tensor. ValueError (naming `name`): another layout, an empty batch, a side below
            `min_side` pixels, a non-float dtype, NaN/inf values, values above 2 (0..255 pixels) or below -0.5
            ([-1,1] pixels).
    """
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be an IMAGE tensor [B,H,W,C], got {type(image).__name__}")
    given = tuple(image.shape)
    if image.ndim == 3:  # a single image without batch axis
        image = image[None]
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} must be an IMAGE [B,H,W,C] with C in (1, 3, 4), got shape {given}"
                         f"{' (a MASK? convert it with Convert Mask to Image)' if len(given) == 3 else ''}")
    B, H, W, _ = image.shape
    if B == 0:
        raise ValueError(f"{name} is an empty batch (shape {given}): expected at least 1 image")
    if min(H, W) < max(min_side, 1):
        raise ValueError(f"{name} is {H}x{W} pixels (HxW): expected at least {max(min_side, 1)} on each side")
    # refused, not guessed: 0..255 values clamped to [0,1] would score a near-white image without a word
    if not image.is_floating_point():
        hint = " (0..255 pixel values? divide by 255)" if image.dtype == torch.uint8 else ""
        raise ValueError(f"{name} must be a float IMAGE with values in [0,1] (ComfyUI's IMAGE), got dtype "
                         f"{image.dtype}{hint}")
    if not torch.isfinite(image).all():
        bad = (~torch.isfinite(image)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{name} has NaN or inf values (image(s) {bad} of {B}): expected finite values in [0,1]")
    low, top = (float(v) for v in torch.aminmax(image.float()))
    if top > _CLAMPED_MAX:  # a resampler's overshoot (1.05) is clamped below; 0..255 values would wash out to white
        raise ValueError(f"{name} has values up to {top:.4g}: expected a float IMAGE in [0,1] (0..255 pixel "
                         f"values? divide by 255)")
    # ComfyUI's bicubic Upscale Image leaves its undershoot unclamped: down to -0.445 on hard 0/1 edges (the
    # kernel's negative lobes, 2 x 1.1875 x -0.1875 in 2-D), clamped below; [-1,1] values would lose their dark
    # half to black
    if low < _CLAMPED_MIN:
        raise ValueError(f"{name} has values down to {low:.4g}: expected a float IMAGE in [0,1] ([-1,1] values? "
                         f"map them to (x + 1) / 2)")
    I = image[..., :3] if image.shape[-1] != 1 else image.expand(*image.shape[:-1], 3)
    return I.movedim(-1, 1).float().clamp(0, 1).contiguous()  # (B, 3, H, W)


def bchw_to_image(I: torch.Tensor) -> torch.Tensor:
    """I: [B,3,H,W] (or [3,H,W]) -> ComfyUI IMAGE [B,H,W,3] float32 on CPU, clamped to [0,1]; NaN as 0 (black:
    Save Image would otherwise cast NaN to an arbitrary byte)."""
    if I.ndim == 3:
        I = I[None]
    if I.ndim != 4 or I.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B,3,H,W], got shape {tuple(I.shape)}")
    if I.shape[1] == 1:
        I = I.expand(-1, 3, -1, -1)
    return I.detach().float().nan_to_num(0.0).clamp(0, 1).movedim(1, -1).cpu().contiguous()  # (B, H, W, 3)


def mask_to_b1hw(mask: torch.Tensor, size: tuple[int, int] | None = None, batch: int | None = None,
                 name: str = "mask", resize: bool = True) -> tuple[torch.Tensor, str]:
    """ComfyUI MASK [B,H,W] or [H,W] (also [B,1,H,W], [B,H,W,1]) -> (M: [B,1,h,w] float in [0,1], note).

    Args:
        size: (h, w) wanted; a mask of another size is resized (`fit_mask`: a note says so) or refused.
        batch: wanted batch; a single mask is repeated, any other mismatch is refused.
        resize: False -> refuse a wrong size instead of resizing.

    Raises:
        TypeError: not a tensor. ValueError (naming `name` and the shape): another layout, an [H,W,1] that would
            read as H masks 1 pixel wide, an empty mask, a non-float dtype, NaN/inf values, or a size/batch mismatch.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a MASK tensor [B,H,W], got {type(mask).__name__}")
    given = tuple(mask.shape)
    M = mask
    if M.ndim == 2:
        M = M[None]
    if M.ndim == 4 and M.shape[1] == 1:
        M = M[:, 0]
    elif M.ndim == 4 and M.shape[-1] == 1:  # IMAGE layout with one channel: unambiguous
        M = M[..., 0]
    if M.ndim != 3:
        raise ValueError(f"{name} must be a MASK [B,H,W] or [H,W], got shape {given}")
    if len(given) == 3 and given[0] > 1 and given[1] > 1 and given[2] == 1:
        # B masks 1 pixel wide, or one [H,W,1] mask? Refused, not guessed ([1,H,1], e.g. SolidMask of width 1,
        # stays one mask: its other reading, a mask 1 pixel tall, is no likelier)
        raise ValueError(f"{name} has shape {given}: a MASK [B,H,W] of that shape is {given[0]} masks "
                         f"{given[1]}x1 pixels. For one {given[0]}x{given[1]} mask with a channel axis ([H,W,1]), "
                         f"give it as [1,H,W] or [H,W]")
    if M.numel() == 0:
        raise ValueError(f"{name} is empty (shape {given}): expected at least 1 mask of at least 1x1 pixels")
    if not (M.is_floating_point() or M.dtype == torch.bool):
        raise ValueError(f"{name} must be a float MASK with values in [0,1] (ComfyUI's MASK) or bool, "
                         f"got dtype {M.dtype}")
    if not torch.isfinite(M).all():
        raise ValueError(f"{name} has NaN or inf values (shape {given}): expected finite values in [0,1]")
    # the bounds of an IMAGE's (image_to_bchw): a resampler's overshoot and undershoot (a mask through a bicubic
    # Upscale Image: down to -0.445) are clamped below, while 0..255 values would make it all "may change" and
    # [-1,1] values would hold their lower half whole
    lo, hi = (float(v) for v in torch.aminmax(M.float()))
    if hi > _CLAMPED_MAX or lo < _CLAMPED_MIN:
        hint = (" (0..255 values? divide by 255)" if hi > _CLAMPED_MAX else
                " ([-1,1] values? map them to (x + 1) / 2)" if lo >= -1.0 else "")
        raise ValueError(f"{name} has values from {lo:.4g} to {hi:.4g}: expected a float MASK in [0,1]{hint}")
    M, note = M.float()[:, None].clamp(0, 1), ""  # (B, 1, H, W)
    if size is not None and tuple(M.shape[-2:]) != tuple(size):
        if not resize:
            raise ValueError(f"{name} is {M.shape[-2]}x{M.shape[-1]} but the images are {size[0]}x{size[1]}")
        M, note = fit_mask(M, size, name)
    if batch is not None and len(M) != batch:
        if len(M) != 1:
            raise ValueError(f"{name} has {len(M)} masks but there are {batch} images: give 1 or {batch} "
                             f"({name} shape {given}, read as [B,H,W])")
        M = M.expand(batch, -1, -1, -1)
    return M.contiguous(), note


def b1hw_to_mask(M: torch.Tensor) -> torch.Tensor:
    """M: [B,1,H,W] or [B,H,W] -> ComfyUI MASK [B,H,W] float32 on CPU in [0,1]."""
    if M.ndim == 4:
        if M.shape[1] != 1:
            raise ValueError(f"mask M must be [B,1,H,W], got shape {tuple(M.shape)}")
        M = M[:, 0]
    if M.ndim != 3:
        raise ValueError(f"mask M must be [B,H,W], got shape {tuple(M.shape)}")
    return M.detach().float().clamp(0, 1).cpu().contiguous()


# -- the diffusion model -----------------------------------------------------------------------------------
# ComfyUI attention functions with a correct backward. Its CPU default, sub-quadratic attention, runs
# exp(out=) on key chunks once free memory is short (autograd refuses it); sage and ComfyUI's flash wrapper
# have no backward at all.
_ATTENTION_WITH_BACKWARD = ("attention_pytorch", "attention_basic", "attention_split", "attention_xformers")


def _attention_with_backward(previous=None):
    """A `transformer_options["optimized_attention_override"]`: PyTorch SDPA unless ComfyUI's pick has a
    backward, in every call, graph-free or not, so the base image I0 and the trained image I come from the same
    kernel (an untrained LoRA gives I == I0 exactly); chains an override another node set."""
    import comfy.ldm.modules.attention as attention

    def override(func, *args, **kwargs):
        if getattr(func, "__name__", "") not in _ATTENTION_WITH_BACKWARD:
            func = attention.attention_pytorch
        return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)

    return override


# model_options keys of guidance patches (comfy/samplers.py): pure functions of the predictions, run by _guidance
_GUIDANCE_PATCHES = ("sampler_pre_cfg_function", "sampler_cfg_function", "sampler_post_cfg_function")
# ... and of patches that replace how the model is called on ComfyUI's conditioning lists: not ours to follow
_UNSUPPORTED_SAMPLER_PATCHES = ("sampler_calc_cond_batch_function",)


class _NeedsComfyConds(Exception):
    pass


class _NoComfyConds:
    """Stands in for ComfyUI's conditioning lists in a guidance patch's args: training calls the model on its own
    conds, so a patch that runs the model again on ComfyUI's (Perturbed-Attention, Self-Attention Guidance, Perp-Neg)
    stops at its first use of them."""

    def _refuse(self, *args, **kwargs):
        raise _NeedsComfyConds

    __iter__ = __len__ = __getitem__ = __contains__ = __bool__ = __getattr__ = _refuse


_NO_COMFY_CONDS = _NoComfyConds()


# patches (by a word of their function's name) that draw from torch's global random numbers while sampling
_GLOBAL_RNG_PATCHES = {"tome": "ToMe (TomePatchModel)",
                       "hypertile": "HyperTile (its tile sizes are random with swap_size 3 or more)"}


def _text_width(clip, key: str) -> int | None:
    """The width of the text encoder `clip_<key>`'s token embeddings (None where it cannot be read)."""
    enc = getattr(clip.cond_stage_model, f"clip_{key}", None)
    try:
        return int(enc.transformer.get_input_embeddings().weight.shape[-1])
    except (AttributeError, TypeError, IndexError):
        return None


def _embedding_fits(emb, width: int | None) -> bool:
    """Whether ComfyUI's CLIP encoder puts a prompt's embedding token in (a tensor, or {"type": "embedding"}, of
    its width) or leaves it out; unknown width: assumed in."""
    if isinstance(emb, dict):
        if emb.get("type", None) != "embedding":
            return False
        emb = emb.get("data", None)
    if not torch.is_tensor(emb):
        return False
    return width is None or emb.shape[-1] == width


def _patch_name(fn) -> str:
    """A patch function's readable name: 'RescaleCFG.patch.<locals>.rescale_cfg' (module comfy_extras....)."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    module = getattr(fn, "__module__", None)
    return f"'{name}'" + (f" (from {module})" if module else "")


def _run_patch(fn, args: dict):
    """fn(args), with errors that say which of the MODEL's patches failed and why."""
    try:
        return fn(args)
    except _NeedsComfyConds:
        raise ValueError(_runs_model_again(fn)) from None
    except Exception as e:
        if _raised_in_comfy_cond_batch(e):  # the patch ran the model itself (Perp-Neg's empty-prompt pass)
            raise ValueError(_runs_model_again(fn)) from None
        e.add_note(f"(in the MODEL's guidance patch {_patch_name(fn)}, run by FocusFix's sampler)")
        raise


def _runs_model_again(fn) -> str:
    return (f"the MODEL carries the guidance patch {_patch_name(fn)}, which runs the model again on ComfyUI's own "
            f"conditioning (as Perturbed-Attention, Self-Attention Guidance and Perp-Neg do): FocusFix's sampler "
            f"cannot follow it. Connect the MODEL from before that node to the FocusFix node, and apply the patch "
            f"to the KSampler that draws your images")


def _raised_in_comfy_cond_batch(e: BaseException) -> bool:
    """Did `e` come from inside ComfyUI's `calc_cond_batch`? A patch calls it to run the model on conditioning of
    its own, which needs ComfyUI's sampler state (its current patcher) that training's sampler does not set up."""
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name.lstrip("_").startswith("calc_cond_batch") and code.co_filename.endswith("samplers.py"):
            return True
        tb = tb.tb_next
    return False


def _y_key(latent_hw, negative: bool = False) -> str:
    """The cond key of SDXL's y prepared for latents of size (h, w): a cond prepared for another size is
    never read at this one. negative: the y a negative prompt gets (models whose y depends on it)."""
    h, w = latent_hw
    return f"y_{int(h)}x{int(w)}" + ("_negative" if negative else "")


def _trainable_latent_format(fmt):
    """The MODEL's latent format as KSampler uses it (an object patch, e.g. Model Sampling Continuous EDM's
    Playground v2.5 one, wins over the model's own), with its tensors (Playground's per-channel mean and std)
    copied out of inference mode: the stock loader builds them there, and a decode's backward cannot save those."""
    fmt = copy.copy(fmt)
    with torch.inference_mode(False):
        for name, value in list(vars(fmt).items()):
            if isinstance(value, torch.Tensor):
                setattr(fmt, name, value.clone())
    return fmt


class ComfyDiffusionModel:
    """The core's `DiffusionModel` protocol on ComfyUI's MODEL (+ CLIP, VAE), SD1.5 and SDXL layouts.

    `denoise` calls `BaseModel.apply_model`, which applies the model's own input scaling and eps/v/EDM
    parameterisation and returns x0, with the MODEL's `transformer_options` (attention patches). SDXL's
    `y` (pooled output + size embeddings) is built by the model's own `encode_adm` from the pooled
    output kept in the cond under "pooled", at the size of the latent being denoised (as KSampler does):
    once per cond by `prepare_cond` (the trainers call it), else in each call. For the SDXL refiner, whose y
    depends on the prompt type, the negative half of a CFG batch gets the negative prompt's y.

    Args:
        model: a ComfyUI ModelPatcher; clone it first if you will patch it.
        clip: ComfyUI CLIP, for `encode_prompts` and `token_indices` (optional).
        vae: ComfyUI VAE, for `decode` (optional).
    """

    def __init__(self, model, clip=None, vae=None):
        self.patcher, self.clip, self.vae = model, clip, vae
        self.base = model.model                              # comfy.model_base.BaseModel
        self.net: nn.Module = self.base.diffusion_model      # kohya keys: lora_unet_<path>
        ms = self._model_sampling = model.get_model_object("model_sampling")
        self.sigmas = ms.sigmas.detach().clone().float().cpu()  # [T] ascending
        self._sigma_max = float(ms.sigma_max)                 # read once: noise_scaling runs every iteration
        self.latent_format = _trainable_latent_format(model.get_model_object("latent_format"))
        self.latent_channels = int(self.latent_format.latent_channels)
        scale = getattr(vae, "downscale_ratio", 8) if vae is not None else 8
        self.latent_scale = int(scale) if isinstance(scale, (int, float)) else 8
        self.name = type(self.base.model_config).__name__    # "SD15", "SDXL", ...
        if not all(hasattr(self.net, k) for k in ("input_blocks", "middle_block", "output_blocks")):
            raise ValueError(f"this MODEL ({self.name}, {type(self.net).__name__}) is not an SD-style UNet: FocusFix "
                             f"trains SD1.x, SD2.x and SDXL-type checkpoints (their cross-attention layers carry the "
                             f"LoRA and the attention maps)")
        in_channels = getattr(self.net, "in_channels", self.latent_channels)
        if getattr(self.base, "concat_keys", ()) or in_channels != self.latent_channels:
            raise ValueError(f"this MODEL ({self.name}) is an inpainting or image-conditioned model: its UNet takes "
                             f"{in_channels} input channels, the {self.latent_channels} latent channels plus an image "
                             f"and/or mask. FocusFix trains text-to-image models: load the checkpoint's base "
                             f"(non-inpainting) version")
        if vae is not None:  # else the decode would fail deep in torch, after the I0 were sampled
            vae_channels, vae_dims = getattr(vae, "latent_channels", self.latent_channels), getattr(vae, "latent_dim", 2)
            if vae_channels != self.latent_channels or vae_dims != 2:
                raise ValueError(f"this VAE decodes {vae_channels}-channel {'video ' if vae_dims != 2 else ''}latents, "
                                 f"but the MODEL ({self.name}) makes {self.latent_channels}-channel image latents: "
                                 f"connect the VAE of the MODEL's checkpoint (Load Checkpoint's VAE output) or a VAE "
                                 f"file made for it")
        self.is_adm = getattr(self.base, "adm_channels", 0) not in (0, None)
        # the SDXL refiner embeds an aesthetic score in y: 6 for the prompt, 2.5 for the negative prompt unless the
        # conditioning gives one (CLIPTextEncodeSDXLRefiner's ascore); KSampler tells encode_adm which prompt it is
        self.adm_reads_prompt_type = any(c.__name__ == "SDXLRefiner" for c in type(self.base).__mro__)
        self.family = model_family(self.base.model_config)
        self.v_prediction = any(c.__name__ == "V_PREDICTION" for c in type(ms).__mro__)
        self._hw = LiveHW()  # the latent size of the call running now, for attention_capture
        self._encoded: dict[str, Cond] = {}  # prompt -> its conditioning (`encode_prompts`, `encode_first`)

    @property
    def device(self) -> torch.device:
        import comfy.model_management as mm
        return mm.get_torch_device()

    # denoiser: x = x0 + sigma * eps (VE), returns x0
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """x: [B,C,h,w], sigma: [B], cond {"context": [B,T,D], "pooled": [B,P] (SDXL)} -> x0: [B,C,h,w] fp32.
        ComfyUI's cancel is checked first: work that runs no sampler (Separate-and-Enhance's preservation set-up,
        attention maps) stops within one UNet call too."""
        if not torch.compiler.is_compiling():  # a compiled call traces no Python side effect (no graph break)
            import comfy.model_management as mm
            mm.throw_exception_if_processing_interrupted()
        self._hw.hw = tuple(x.shape[-2:])
        kwargs = {}
        if self.is_adm:
            kwargs["y"] = self._y(cond, x.shape[-2:], CFG_PAIR in cond, CFG_UNCOND in cond)
        options = self.patcher.model_options
        topts = dict(options.get("transformer_options", {}))
        # what ComfyUI's sampler tells attention patches: which batch chunks are the prompt's (0) and the negative
        # prompt's (1), as CFGDenoiser batches them (IPAdapter-style patches treat the two differently)
        cond_or_uncond = [0, 1] if CFG_PAIR in cond else [1] if CFG_UNCOND in cond else [0]
        sigma = sigma.to(x.device)
        topts.update(sigmas=sigma, cond_or_uncond=cond_or_uncond)
        topts["optimized_attention_override"] = _attention_with_backward(topts.get("optimized_attention_override"))
        c = {"c_crossattn": cond["context"].to(x.device), "transformer_options": topts, **kwargs}
        wrapper = options.get("model_function_wrapper")  # another node's wrapper around the model call
        if wrapper is None:
            x0 = self.base.apply_model(x, sigma, **c)
        else:
            x0 = wrapper(self.base.apply_model,
                         {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": cond_or_uncond})
        return x0.float()

    def redraw_caveats(self) -> list[str]:
        """Report notes on what keeps KSampler on this MODEL from drawing the Train node's images to float rounding:
        sampler wrappers training does not run (EasyCache, LazyCache), a patch drawing from torch's global random
        numbers (ToMe, HyperTile: KSampler seeds them per run, training does not), fp8 weights (a LoRA loader
        rounds the LoRA into them), and the attention kernel training swapped in (ComfyUI's pick has no backward:
        in fp16/bf16 its rounding can exceed a short run's change)."""
        import comfy.ldm.modules.attention as attention
        notes = []
        topts = self.patcher.model_options.get("transformer_options", {})
        wrappers = sorted({str(key) for table in (self.patcher.wrappers, topts.get("wrappers", {}))
                           for by_key in table.values() for key, fns in by_key.items() if fns})
        if wrappers:
            notes.append(f"the MODEL carries sampler wrappers ({', '.join(wrappers)}, e.g. EasyCache): training and "
                         f"its images run without them, so KSampler's images on this MODEL differ from these")
        patches = [_patch_name(fn) for fns in topts.get("patches", {}).values() for fn in fns]
        for marker, what in _GLOBAL_RNG_PATCHES.items():
            if any(marker in name.lower() for name in patches):
                notes.append(f"the MODEL carries {what}, which draws from torch's global random numbers: KSampler "
                             f"seeds them per run and training does not, so their images differ")
        if any(p.dtype.itemsize == 1 and p.is_floating_point() for p in self.net.parameters()):
            notes.append("the MODEL's weights are stored in fp8: Load LoRA (and Apply LoRA) round the LoRA into them, "
                         "so KSampler's images with it differ from the after images, which keep the LoRA beside the "
                         "weights in full precision (a short run's change can be smaller than that rounding)")
        kernel = getattr(attention.optimized_attention, "__name__", "")
        if kernel not in _ATTENTION_WITH_BACKWARD:
            notes.append(f"ComfyUI's attention here ({kernel}) has no backward: training and its images use PyTorch "
                         f"SDPA, so KSampler's images differ from these by the two kernels' rounding (larger in "
                         f"fp16/bf16)")
        return notes

    def guidance_function(self) -> Guidance | None:
        """ComfyUI's CFG as KSampler runs it with this MODEL's guidance patches (pre-CFG, CFG and post-CFG functions
        other nodes set: RescaleCFG, CFGZeroStar, APG, Mahiro, ...), for `CFGDenoiser`; None without patches (plain
        CFG). Raises ValueError for a patch training cannot run (one that replaces how the model is called on
        ComfyUI's conditioning), naming it."""
        options = self.patcher.model_options
        for key in _UNSUPPORTED_SAMPLER_PATCHES:
            if key in options:
                raise ValueError(f"the MODEL carries {_patch_name(options[key])} ({key}, e.g. from Skip Layer "
                                 f"Guidance), which runs the model on ComfyUI's own conditioning: FocusFix's "
                                 f"sampler cannot follow it. Connect the MODEL from before that node to the FocusFix "
                                 f"node, and apply the patch to the KSampler that draws your images")
        if not any(options.get(key) for key in _GUIDANCE_PATCHES):
            return None
        guidance = functools.partial(self._guidance)
        # a patch that reads the negative prompt's prediction at cfg 1 too (KSampler then computes it)
        guidance.needs_uncond = bool(options.get("disable_cfg1_optimization", False))
        return guidance

    def _guidance(self, x, sigma, x0_cond, x0_uncond, scale):
        """comfy.samplers.sampling_function's pre-CFG step + cfg_function, on one denoiser call's predictions.
        x, x0_cond: [B,C,h,w]; x0_uncond: [B,C,h,w] or None (scale 1); sigma: [B] -> x0: [B,C,h,w]."""
        options, model = self.patcher.model_options, self.base
        if x0_uncond is None:  # cfg 1: ComfyUI skips the negative prompt and hands its patches zeros
            x0_uncond = torch.zeros_like(x0_cond)
        conds = [_NO_COMFY_CONDS, None if scale == 1.0 and not options.get("disable_cfg1_optimization") else
                 _NO_COMFY_CONDS]
        common = {"cond_scale": scale, "sigma": sigma, "input": x, "model": model, "model_options": options}
        out = [x0_cond, x0_uncond]
        for fn in options.get("sampler_pre_cfg_function", []):
            out = _run_patch(fn, {**common, "conds": conds, "conds_out": out, "timestep": sigma})
        x0_cond, x0_uncond = out[0], out[1]
        fn = options.get("sampler_cfg_function")
        if fn is not None:
            x0 = x - _run_patch(fn, {**common, "cond": x - x0_cond, "uncond": x - x0_uncond, "timestep": sigma,
                                     "cond_denoised": x0_cond, "uncond_denoised": x0_uncond,
                                     "input_cond": conds[0], "input_uncond": conds[1]})
        else:
            x0 = x0_uncond + (x0_cond - x0_uncond) * scale
        for fn in options.get("sampler_post_cfg_function", []):
            x0 = _run_patch(fn, {**common, "denoised": x0, "cond": conds[0], "uncond": conds[1],
                                 "cond_denoised": x0_cond, "uncond_denoised": x0_uncond})
        return x0

    def sampling_sigmas(self, steps: int, scheduler: str) -> torch.Tensor:
        """[steps + 1] sigmas as KSampler computes them for this MODEL: ComfyUI's scheduler of that name (also one
        a custom node registered) on the MODEL's model_sampling."""
        import comfy.samplers

        from .common import scheduler_names
        known = scheduler_names()
        if scheduler not in known:
            raise ValueError(f"unknown scheduler {scheduler!r}: this ComfyUI has {known}")
        return comfy.samplers.calculate_sigmas(self._model_sampling, scheduler, steps).float().cpu()

    def noise_scaling(self, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """The start x of a full denoise from standard noise [B,C,h,w], as KSampler makes it: the MODEL's
        model_sampling (eps / v: sqrt(1 + sigma^2) * noise at the top of the schedule, sigma * noise below),
        so a trajectory from a seed is KSampler's (same seed, steps and cfg; scheduler "normal")."""
        max_denoise = math.isclose(self._sigma_max, sigma, rel_tol=1e-05) or sigma > self._sigma_max  # as KSampler
        s = torch.tensor([sigma], device=noise.device)
        return self._model_sampling.noise_scaling(s, noise, torch.zeros_like(noise), max_denoise).to(noise.dtype)

    def checkpoint_modules(self) -> list[nn.Module]:
        """Blocks to gradient-checkpoint one by one in a training step: every layer of the UNet's blocks
        (ResBlock, SpatialTransformer, Up/Downsample) and the VAE decoder's resnets, attention and upsamplers
        (benchmarks/cost_model.py, SDXL 1024² b1: 6.5 GiB above the weights, against 16.3 GiB with
        whole-call checkpointing and 13.7 GiB with the UNet's blocks only). [] when the net has no SD-style
        input/middle/output blocks: the trainer then checkpoints whole denoiser calls."""
        net = self.net
        blocks = [*getattr(net, "input_blocks", []), getattr(net, "middle_block", None),
                  *getattr(net, "output_blocks", [])]
        layers = [layer for block in blocks if isinstance(block, nn.Sequential) for layer in block
                  if any(True for _ in layer.parameters())]
        if not layers:
            return []
        decoder = getattr(getattr(self.vae, "first_stage_model", None), "decoder", None)
        mid, ups = getattr(decoder, "mid", None), getattr(decoder, "up", None)
        if isinstance(mid, nn.Module) and isinstance(ups, nn.ModuleList):
            layers += list(mid.children())
            for up in ups:
                layers += [*getattr(up, "block", []), *getattr(up, "attn", [])]
                layers += [up.upsample] if isinstance(getattr(up, "upsample", None), nn.Module) else []
        return layers

    @property
    def compute_dtypes(self) -> tuple[torch.dtype, ...]:
        """The dtypes the UNet and the VAE compute in (fp8-stored weights compute in the manual-cast dtype)."""
        unet = getattr(self.base, "manual_cast_dtype", None) or self.base.get_dtype()
        return (unet,) if self.vae is None else (unet, self.vae.vae_dtype)

    def _y(self, cond: Cond, latent_hw, pair: bool, negative: bool = False) -> torch.Tensor:
        """SDXL's y [B, adm] for a denoiser call: prepared for this size, given, or built now. pair: rows [B/2:]
        are the negative prompt's (CFGDenoiser's batch), which get the negative y where the model has one;
        negative: every row is (CFGDenoiser's call of the negative prompt alone)."""
        if negative and self.adm_reads_prompt_type:
            y = cond.get(_y_key(latent_hw, negative=True))
            return y if y is not None else self._adm(cond["pooled"], latent_hw, cond.get("adm_args"), negative=True)
        y = cond.get(_y_key(latent_hw), cond.get("y"))
        if y is None:
            y = self._adm(cond["pooled"], latent_hw, cond.get("adm_args"))
        if not (pair and self.adm_reads_prompt_type):
            return y
        B = y.shape[0] // 2
        y_neg = cond.get(_y_key(latent_hw, negative=True))
        if y_neg is None:
            args = cond.get("adm_args")
            y_neg = self._adm(cond["pooled"][B:], latent_hw, None if args is None else args[B:], negative=True)
        else:
            y_neg = y_neg[B:]
        return torch.cat([y[:B], y_neg.to(y.device, y.dtype)])

    def prepare_cond(self, cond: Cond, latent_hw) -> Cond:
        """cond on the compute device, plus SDXL's y for latents of size latent_hw, both done once here instead
        of in every denoiser call: ComfyUI hands text encodings over on its intermediate device (the CPU), and
        its `encode_adm` embeds the sizes on the CPU after copying the pooled output there. Per call, each is a
        host sync on a GPU (the host can no longer queue kernels ahead), and under torch.compile CPU ops in the
        graph rule out CUDA graphs."""
        width, reads = cond["context"].shape[-1], self.base.model_config.unet_config.get("context_dim")
        wrapped = "model_function_wrapper" in self.patcher.model_options  # another node may map the text itself
        if reads is not None and width != reads and not wrapped:  # else a matmul shape error in the first attn2
            raise ValueError(f"the text encoding is {width} wide, but this MODEL ({self.name}) reads {reads}-wide "
                             f"text: encode the prompts with the CLIP of the MODEL's checkpoint (Load Checkpoint's "
                             f"CLIP output), also for CONDITIONING inputs")
        args = cond.get("adm_args")  # they live on in y (and a negative prompt without them can be batched)
        cond = {k: v.to(self.device) for k, v in cond.items() if k != "adm_args"}  # the caller's dict stays whole
        for negative in (False, True) if self.adm_reads_prompt_type else (False,):
            key = _y_key(latent_hw, negative)
            if self.is_adm and "pooled" in cond and key not in cond:
                cond[key] = self._adm(cond["pooled"], latent_hw, args, negative).to(self.device)
        return cond

    def _adm(self, pooled: torch.Tensor, latent_hw, args: torch.Tensor | None = None,
             negative: bool = False) -> torch.Tensor:
        """SDXL y: [B, adm] from the pooled output and `args` [B, 7] (`_SDXL_ADM_KEYS`) where the conditioning
        gave them (-1 = not given), else as KSampler does: the image size (8 x latent), no crop, target = size,
        and the refiner's aesthetic score for the prompt (negative=False) or the negative prompt."""
        H, W = (int(s) * 8 for s in latent_hw)
        rows = []
        for i, p in enumerate(pooled):
            given = dict(zip(_SDXL_ADM_KEYS, args[i].tolist())) if args is not None else {}
            kw = {k: (v if k == "aesthetic_score" else int(v)) for k, v in given.items() if v >= 0}
            kw.setdefault("width", W)
            kw.setdefault("height", H)
            rows.append(self.base.encode_adm(pooled_output=p[None], prompt_type="negative" if negative else "positive",
                                             **kw))
        return torch.cat(rows).to(pooled.device)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Differentiable decode (no clamp). z: [B,C,h,w] sampler latents -> I: [B,3,H,W] fp32."""
        if self.vae is None:
            raise ValueError("decoding needs a VAE: connect the checkpoint's VAE")
        fsm = self.vae.first_stage_model
        zv = self.latent_format.process_out(z)  # sampler latents -> VAE latents
        I = fsm.decode(zv.to(self.vae.device, self.vae.vae_dtype))
        return ((I.float() + 1) / 2).to(z.device)

    def _require_clip(self):
        if self.clip is None:
            raise ValueError("this needs the text encoder: connect the checkpoint's CLIP")
        return self.clip

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Text conditioning, batch = len(prompts): {"context": [B,T,D]} (+ "pooled": [B,P] for SDXL). Each
        prompt is encoded once per adapter, and remembered."""
        clip = self._require_clip()
        for p in dict.fromkeys(prompts):
            if p not in self._encoded:
                out = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True, return_dict=True)
                self._encoded[p] = _cond_from(out["cond"], out.get("pooled_output"), self.is_adm)
        return cat_cond(*(self._encoded[p] for p in prompts))

    def encode_first(self, prompts: Sequence[str]) -> None:
        """Encode `prompts` now, out of inference mode (remembered for `encode_prompts`). Call it before the
        MODEL is loaded for a run: ComfyUI loads the text encoder to encode, and when memory is short (always
        with --disable-smart-memory) unloads the UNet for it. In a training session that unload would put an
        upstream LoRA's backed-up weights back over the session's trainable copies (a failed run, or a LoRA
        trained on the wrong model); in Attention Maps it would take the MODEL's patches off mid-run."""
        with torch.inference_mode(False), torch.no_grad():
            for p in dict.fromkeys(prompts):
                self.encode_prompts([p])

    def load(self, full: bool = True) -> None:
        """Load the MODEL and VAE on the compute device (after `encode_first`), so no reload happens mid-run;
        full=False lets ComfyUI load part of them where memory is short (sampling without gradients)."""
        import comfy.model_management as mm
        mm.load_models_gpu([self.patcher] + ([self.vae.patcher] if self.vae is not None else []), force_full_load=full)

    def tokens(self, prompt: str) -> list[str]:
        """The prompt's tokens as text at their context positions (start/end/padding included): CLIP's byte-level
        BPE pieces decoded to UTF-8 ('café</w>', not 'cafÃ©</w>'); a piece holding part of a character (猫 is 3)
        keeps its bytes as surrogate escapes (`word_token_indices` matches on bytes)."""
        clip = self._require_clip()
        tokenized = clip.tokenize(prompt)
        key = "l" if "l" in tokenized else next(iter(tokenized))
        sub = getattr(clip.tokenizer, f"clip_{key}", None)
        hf = getattr(sub, "tokenizer", None)
        if hf is None:
            raise ValueError(f"cannot read the token strings of this text encoder ({type(clip.tokenizer).__name__})")
        width = _text_width(clip, key)
        pieces = []
        for chunk in tokenized[key]:
            # the encoder leaves out an embedding of another width (an SD2/SDXL one on SD1.5: ComfyUI logs "shape
            # mismatch") and pads the chunk at its end: the later tokens move up by its vectors
            kept = [hf.convert_ids_to_tokens(int(t)) if isinstance(t, numbers.Integral) else "<embedding>"
                    for t, *_ in chunk if isinstance(t, numbers.Integral) or _embedding_fits(t, width)]
            pieces += kept + ["<pad>"] * (len(chunk) - len(kept))
        table = _byte_decoder(hf)
        if table is None:
            return pieces
        return [bytes(b for ch in p for b in ([table[ch]] if ch in table else ch.encode()))
                .decode("utf-8", "surrogateescape") for p in pieces]

    def token_indices(self, prompt: str, words: list[str]) -> list[list[int]]:
        """For each word, its token positions in the encoded prompt. ValueError names a missing word."""
        return word_token_indices(self.tokens(prompt), words)

    def attention_capture(self, store):
        """While active, every attn2 layer of the UNet adds its (q, k) to `store` (hooks always removed)."""
        return attention_capture(self.net, store, self._hw)

    def attention_levels(self) -> list[int]:
        """The UNet levels with cross-attention (0 = the latents' size): SD1.5 [0, 1, 2, 3], SDXL [1, 2]."""
        return unet_attention_levels(self.net)

    def modules_in_gradient_path(self) -> list[nn.Module]:
        mods = [self.net]
        if self.vae is not None:
            mods.append(self.vae.first_stage_model)
        return mods


def unet_attention_levels(net: nn.Module) -> list[int]:
    """The levels of ComfyUI's SD-style UNet (input, middle and output blocks) that hold cross-attention, read
    from its blocks: level 0 is the latents' size, a Downsample starts the next level down, an Upsample ends one
    on the way up (SD1.5: [0, 1, 2, 3]; SDXL: [1, 2], none at the latents' size)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    def has(block: nn.Module, kind) -> bool:
        return any(isinstance(m, kind) for m in block.modules())

    def attends(block: nn.Module) -> bool:
        return any(name.rsplit(".", 1)[-1] == "attn2" for name, _ in block.named_modules())

    levels, level = set(), 0
    for block in net.input_blocks:
        if attends(block):
            levels.add(level)
        level += has(block, Downsample)
    if attends(net.middle_block):
        levels.add(level)
    for block in net.output_blocks:  # attention runs before the block's Upsample
        if attends(block):
            levels.add(level)
        level -= has(block, Upsample)
    return sorted(levels)


def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2, CLIP): the character each byte is written as -> that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def _byte_decoder(hf) -> dict[str, int] | None:
    """The tokenizer's byte_decoder (transformers' slow tokenizers have one); CLIP's own table for its fast
    tokenizer (transformers 5 has no slow one); None for a tokenizer that is not byte-level BPE."""
    table = getattr(hf, "byte_decoder", None)
    if isinstance(table, dict):
        return table
    return _gpt2_byte_decoder() if "CLIP" in type(hf).__name__ or "GPT2" in type(hf).__name__ else None


# SDXL's size conditioning (CLIPTextEncodeSDXL) and the refiner's aesthetic score (CLIPTextEncodeSDXLRefiner's
# ascore), encode_adm's keywords; -1 in a Cond row = not given
_SDXL_ADM_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height", "aesthetic_score")


def _cond_from(context: torch.Tensor, pooled: torch.Tensor | None, is_adm: bool, extra: dict | None = None) -> Cond:
    cond = {"context": context.detach().clone().float()}
    if is_adm:
        if pooled is None:
            raise ValueError("this SDXL-type model needs the text encoder's pooled output, which is missing")
        cond["pooled"] = pooled.detach().clone().float().reshape(len(context), -1)
        if extra is not None:  # "adm_args": [B, 7], read once by prepare_cond
            row = [float(extra.get(k, -1)) for k in _SDXL_ADM_KEYS]
            cond["adm_args"] = torch.tensor([row] * len(context))
    return cond


def conditioning_to_cond(conditioning, is_adm: bool, name: str = "positive") -> Cond:
    """ComfyUI CONDITIONING -> one Cond with batch = entries (`conditioning_to_conds`, joined by cat_cond)."""
    return cat_cond(*conditioning_to_conds(conditioning, is_adm, name))


def check_conditioning(conditioning, name: str = "positive") -> None:
    """ValueError naming `name` unless it is a non-empty CONDITIONING whose entries hold text encodings with at
    least one row (a custom node's malformed output is refused, not guessed)."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(f"{name} must be a non-empty CONDITIONING (from CLIP Text Encode)")
    for i, entry in enumerate(conditioning):
        if not (isinstance(entry, (list, tuple)) and 1 <= len(entry) <= 2 and isinstance(entry[0], torch.Tensor)
                and entry[0].ndim == 3 and len(entry[0]) and (len(entry) == 1 or isinstance(entry[1], dict))):
            parts = entry if isinstance(entry, (list, tuple)) else [entry]
            got = ", ".join(f"tensor {list(e.shape)}" if isinstance(e, torch.Tensor) else type(e).__name__ for e in parts)
            raise ValueError(f"{name} entry {i} is not a CONDITIONING entry [text encoding [B,T,D], dict]: got {got} "
                             f"(connect CLIP Text Encode, or the node that made it is broken)")


def conditioning_to_conds(conditioning, is_adm: bool, name: str = "positive") -> list[Cond]:
    """ComfyUI CONDITIONING ([[context [1,T,D], {"pooled_output": ...}], ...]) -> one Cond of batch 1 per entry
    row, each at its own context length.

    The text encoding is used, with SDXL's pooled output and size conditioning (CLIPTextEncodeSDXL's width, height,
    crops and target size; CLIPTextEncodeSDXLRefiner's aesthetic score); `conditioning_ignored` names what else
    the entries carry (areas, masks, ControlNets, timestep ranges), which training does not follow."""
    check_conditioning(conditioning, name)
    given = any(k in (entry[1] if len(entry) > 1 else {}) for entry in conditioning for k in _SDXL_ADM_KEYS)
    conds = []
    for entry in conditioning:
        context, extra = entry[0], entry[1] if len(entry) > 1 else {}
        for row in range(len(context)):
            pooled = extra.get("pooled_output")
            conds.append(_cond_from(context[row:row + 1], None if pooled is None else pooled[row:row + 1], is_adm,
                                    extra if given else None))
    return conds


# parts of a CONDITIONING the SD UNets FocusFix trains never read (it refuses inpainting and image-conditioned
# MODELs, which do): InpaintModelConditioning / InstructPix2Pix's latents, StyleModelApply's attention bias
_UNREAD_BY_SD_UNETS = frozenset({"concat_latent_image", "concat_mask", "attention_mask", "attention_mask_img_shape"})


def _is_zero(value) -> bool:
    return isinstance(value, numbers.Real) and value == 0


def conditioning_ignored(conditioning, name: str = "positive") -> list[str]:
    """Report lines naming what a CONDITIONING carries besides its text (and SDXL's sizes and aesthetic score)
    that changes KSampler's images (areas, masks, ControlNets, timestep ranges): training ignores it. Left out:
    parts these MODELs never read, and the non-zero strength of a lone entry without an area or mask (KSampler
    divides it out again)."""
    keys = ({k for entry in conditioning if len(entry) > 1 for k in entry[1]}
            - {"pooled_output", *_SDXL_ADM_KEYS} - _UNREAD_BY_SD_UNETS)
    lone = conditioning[0][1] if len(conditioning) == 1 and len(conditioning[0]) > 1 else None
    # strength 0 is not divided out: it zeroes the prediction (KSampler divides by a count of 1e-37)
    if lone is not None and not keys & {"area", "mask"} and not _is_zero(lone.get("strength")):
        keys.discard("strength")
    if not keys:
        return []
    return [f"{name}: training uses the text encoding only, without its {', '.join(sorted(keys))}: KSampler given "
            f"this CONDITIONING draws other images than these (these are what it draws from the text alone)"]


# -- leaving inference mode ---------------------------------------------------------------------------------
def _swap_inference_params(modules: Sequence[nn.Module]) -> list[tuple[nn.Module, str, bool]]:
    """Replace each inference-tensor parameter by a plain clone and drop the original, so the weights are
    not held twice on the device (SD1.5 bf16: 1.8 GiB, SDXL: 5.3 GiB); return what `_restore` needs."""
    swapped = []
    seen = set()
    for root in modules:
        for m in root.modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
                    swapped.append((m, name, p.requires_grad))
    return swapped


def _restore(swapped) -> None:
    """Make the swapped parameters inference tensors again, from the clones (equal values), one at a time."""
    with torch.inference_mode():
        for m, name, requires_grad in reversed(swapped):
            m._parameters[name] = nn.Parameter(m._parameters[name].detach().clone(), requires_grad=requires_grad)


@contextmanager
def training_session(dm: ComfyDiffusionModel, extra_modules: Sequence[nn.Module] = ()) -> Iterator[None]:
    """Run a core trainer on ComfyUI models: out of inference mode, grad on, weights made autograd-safe.

    Loads the MODEL (and VAE) on the compute device first, so no reload happens mid-run: encode the run's
    prompts before (`dm.encode_first`). Every swap and hook is undone in `finally`, and ComfyUI's cache is
    emptied afterwards.
    """
    import comfy.model_management as mm
    dm.load()
    swapped = []
    try:
        with torch.inference_mode(False), torch.enable_grad():
            swapped = _swap_inference_params([*dm.modules_in_gradient_path(), *extra_modules])
            yield
    finally:
        _restore(swapped)
        swapped.clear()
        mm.soft_empty_cache()
        release_pinned_memory()  # what the run pinned and freed (the merge's weight copies), else held for good


MIN_COMFYUI_TO_TRAIN = "0.3.60"
MIN_TORCH_TO_TRAIN = "2.5"  # torch.OutOfMemoryError (training's memory advice); the oldest torch the tests ran on


def _major_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version: a pre-release or vendor build of 2.5 ("2.5.0a0+872d972", NVIDIA's
    containers, "2.5+cpu") is 2.5."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def check_comfyui_trains() -> None:
    """RuntimeError unless this ComfyUI and its torch can train. ComfyUI must let a call choose its attention
    kernel (`optimized_attention_override`, ComfyUI 0.3.60, with `attention.wrap_attn`): older ones ignore the
    choice, and training then runs through whatever kernel ComfyUI picked: sage or flash attention pass no
    gradient to the LoRA's q/k/v (a silently partial fix), sub-quadratic attention fails in backward. Before
    torch 2.5, any failure in a run (out of memory, a NaN loss) would end in an AttributeError instead."""
    if _major_minor(str(torch.__version__)) < _major_minor(MIN_TORCH_TO_TRAIN):
        raise RuntimeError(f"FocusFix training needs torch {MIN_TORCH_TO_TRAIN} or newer (ComfyUI runs torch "
                           f"{torch.__version__}): update torch in ComfyUI's Python (ComfyUI's README says how for "
                           f"your GPU), then restart ComfyUI")
    import comfy.ldm.modules.attention as attention
    if hasattr(attention, "wrap_attn"):
        return
    try:
        from comfyui_version import __version__ as version
    except ImportError:
        version = "an older version"
    raise RuntimeError(f"FocusFix training needs ComfyUI {MIN_COMFYUI_TO_TRAIN} or newer (this is {version}): "
                       f"update ComfyUI (ComfyUI Manager > Update ComfyUI, or git pull), then restart it. The other "
                       f"FocusFix nodes work on this version")


def release_idle_models(dm: ComfyDiffusionModel) -> int:
    """Unload every model ComfyUI holds on the compute device except this run's MODEL and VAE (and what is
    patched onto them); return how many. Call once the prompts are encoded: a training step's activations are
    outside ComfyUI's memory accounting, so idle models (text encoders, CLIP vision, other checkpoints)
    would stay beside them for the whole run (SDXL's CLIP-L + CLIP-G: 1.6 GB). ComfyUI loads them again
    when a later node needs them."""
    import comfy.model_management as mm
    ours = [dm.patcher] + ([dm.vae.patcher] if dm.vae is not None else [])
    # model_patches_models: ComfyUI 0.3.52+; older ones patch no models onto a MODEL that way
    ours += [m for p in ours for m in getattr(p, "model_patches_models", lambda: [])()]

    def ours_or_clone(m) -> bool:  # a clone shares our weights: unloading it would move them off the device
        return m is not None and any(m is p or getattr(m, "is_clone", lambda _: False)(p) for p in ours)

    keep = [lm for lm in mm.current_loaded_models if ours_or_clone(lm.model)]
    return len(mm.free_memory(float("inf"), mm.get_torch_device(), keep_loaded=keep))


# -- the FOCUSFIX_LORA type ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraData:
    """A trained LoRA as plain data: kohya tensors (`lora_unet_<path>.lora_down.weight`/`.lora_up.weight`/
    `.alpha`, fp32, CPU) and str metadata (`focusfix_core.lora.lora_metadata`: kohya `ss_*` + FocusFix
    entries). Holds no reference to the model it was trained on, so ComfyUI's cache keeps only tensors."""

    tensors: dict
    metadata: dict = field(default_factory=dict)
    rank: int = 4
    alpha: float = 4.0
    targets: tuple = ("attn",)
    method: str = "focus-n-fix"

    def __post_init__(self):
        if not self.tensors:
            raise ValueError("a LoRA needs at least one adapter tensor")

    @classmethod
    def from_trainer(cls, trainer) -> "LoraData":
        lora = trainer.lora
        # SD1.x/2.x: the layer names kohya's LoRAs of those models use, so its tools (merge, training on top) find
        # them too; SDXL keeps the LDM names, as kohya's SDXL LoRAs do (ComfyUI, A1111 and Forge read both)
        diffusers = getattr(trainer.model, "family", None) in ("sd1", "sd2")
        tensors = {k: v.detach().float().cpu().clone()
                   for k, v in lora.state_dict_kohya("lora_unet", diffusers_names=diffusers).items()}
        targets = (lora.targets,) if isinstance(lora.targets, str) else tuple(lora.targets)
        return cls(tensors=tensors, metadata=lora_metadata(lora, trainer.metadata()), rank=lora.rank,
                   alpha=lora.alpha, targets=targets, method=trainer.method)

    @classmethod
    def from_file(cls, path) -> "LoraData":
        """A LoRA file FocusFix saved (`focusfix_core.lora.read_focusfix_lora`: ValueError for any other)."""
        saved = read_focusfix_lora(path)
        return cls(tensors=saved.tensors, metadata=saved.metadata, rank=saved.rank, alpha=saved.alpha,
                   targets=saved.targets, method=saved.method)

    def saved(self) -> SavedLoRA:
        """The same LoRA as the core's SavedLoRA."""
        return SavedLoRA(self.tensors, self.metadata, self.targets, self.rank, self.alpha)

    def attach(self, net: nn.Module, family: str | None = None):
        """The core LoRA hooked onto `net` (of `family`, a BASE_FAMILIES key, when known) with these weights,
        trainable (adapters on CPU; remove() when done).

        Raises:
            ValueError: this LoRA does not fit `net` (trained on another model type: named when both are known)."""
        try:
            return self.saved().attach(net)
        except ValueError as e:
            raise ValueError(f"the connected LoRA ({self!r}) does not fit this MODEL "
                             f"({family_mismatch(self.metadata, family)}): {e}") from None

    def __repr__(self) -> str:
        n = sum(1 for k in self.tensors if k.endswith(".lora_down.weight"))
        return f"LoraData({self.method}, {n} layers, rank={self.rank}, alpha={self.alpha:g})"


# -- rewards ------------------------------------------------------------------------------------------------
REWARD_FOLDER = "focusfix_rewards"


def register_reward_folder() -> None:
    """Register models/focusfix_rewards with ComfyUI's folder_paths (no-op without ComfyUI), beside any folders an
    extra_model_paths.yaml names for `focusfix_rewards`. ComfyUI reads that file before it loads node packs, and
    enters such a folder with no extensions (every file listed): weight files only. The yaml's folders stay first
    (one it marks is_default must be, and the entry cannot tell which it marked): a name in two folders loads
    from the yaml's."""
    try:
        import folder_paths
    except ImportError:
        return
    import os
    default = os.path.join(folder_paths.models_dir, REWARD_FOLDER)
    paths, extensions = folder_paths.folder_names_and_paths.get(REWARD_FOLDER, ([], set()))
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[REWARD_FOLDER] = (paths, set(extensions) | folder_paths.supported_pt_extensions)


def reward_choices() -> list[str]:
    """Combo entries: builtin:<name> for every weight-free reward, then the files in models/focusfix_rewards."""
    from ..focusfix_core.rewards.loading import BUILTIN_PREFIX, BUILTIN_REWARDS
    names = [BUILTIN_PREFIX + n for n in BUILTIN_REWARDS]
    try:
        import folder_paths
        register_reward_folder()
        names += folder_paths.get_filename_list(REWARD_FOLDER)
    except ImportError:
        pass
    return names


def load_reward_by_name(name: str, clip_vision=None, precision: str = "fp32"):
    """A frozen Reward with ordinary (non-inference) weights, from a builtin name or a reward file name;
    precision ("fp32", "bf16") is the CLIP tower's (`load_reward`'s tower_dtype). `clip_vision` (a CLIP_VISION)
    is copied only when the file is an aesthetic head stored alone; otherwise a note says it is ignored."""
    from ..focusfix_core.rewards import BUILTIN_REWARDS, load_reward
    from ..focusfix_core.rewards.loading import BUILTIN_PREFIX, TOWER_DTYPES
    from .common import log
    if precision not in TOWER_DTYPES:
        raise ValueError(f"precision must be one of {list(TOWER_DTYPES)}, got {precision!r}")
    used: list[bool] = []
    with torch.inference_mode(False):
        if name.startswith(BUILTIN_PREFIX):
            key = name[len(BUILTIN_PREFIX):]
            if key not in BUILTIN_REWARDS:
                raise ValueError(f"unknown built-in reward {key!r}; built-ins are {sorted(BUILTIN_REWARDS)}")
            reward = BUILTIN_REWARDS[key]().eval().requires_grad_(False)
        else:
            import folder_paths
            register_reward_folder()
            path = folder_paths.get_full_path_or_raise(REWARD_FOLDER, name)  # traversal-safe lookup
            tower = None if clip_vision is None else _clip_vision_copy(clip_vision, used)
            reward = load_reward(path, clip_vision_tower=tower, tower_dtype=TOWER_DTYPES[precision],
                                 tower_name="the clip_vision input")
    if clip_vision is not None and not used:
        own = "brings its own CLIP image tower" if hasattr(reward, "tower") else "uses no CLIP image tower"
        log.info(f"Load Reward: the clip_vision input is ignored: {name} ({reward.name}) {own}")
    return reward


def _clip_vision_copy(clip_vision, used: list) -> Callable[[], dict]:
    """A function copying a CLIP_VISION's weights out of inference mode, for `load_reward` to call only when the
    file needs a tower (ViT-L/14: 1.2 GB copied for nothing otherwise); it records the call in `used`."""
    def copy() -> dict:
        used.append(True)
        # to the CPU, where Load Reward keeps a reward between nodes (`reward_on` takes a reward back to where its
        # weights are): ComfyUI's CLIP_VISION weights sit on the GPU once CLIP Vision Encode has used them
        sd = {k: v.detach().to("cpu" if v.device.type != "meta" else "meta", copy=True)  # meta: shapes, no data
              for k, v in clip_vision.get_sd().items()}
        fp8 = sorted({str(v.dtype) for v in sd.values() if v.dtype.itemsize == 1 and v.is_floating_point()})
        if fp8:  # ComfyUI stores CLIP vision in the text encoders' dtype: fp8 with --fp8_e4m3fn-text-enc
            from .common import log
            log.warning(f"Load Reward: the clip_vision weights are stored in {', '.join(fp8)} (ComfyUI started "
                        f"with an fp8 text-encoder flag?): the reward's tower is built from those rounded weights, "
                        f"so its scores are a little off the file's. Start ComfyUI without the flag for the full "
                        f"weights")
        return sd
    return copy


@contextmanager
def grad_mode() -> Iterator[None]:
    """Leave ComfyUI's inference mode with grad enabled (for saliency / rewards); clone inputs inside."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _home(reward: nn.Module) -> torch.device:
    return next((t.device for t in (*reward.parameters(), *reward.buffers())), torch.device("cpu"))


def reward_device(reward: nn.Module) -> torch.device:
    """Where `reward_on` puts the reward: ComfyUI's compute device (outside ComfyUI, where the reward is)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return _home(reward)
    return mm.get_torch_device()


@contextmanager
def reward_on(reward: nn.Module, *tensors: torch.Tensor) -> Iterator[tuple]:
    """While active: the reward on the compute device; yields (reward, *plain clones of tensors on that device).

    The reward is the object Load Reward cached, and no ModelPatcher, so ComfyUI never unloads it: on exit it
    goes back where it was, also after an error or a cancel (a CLIP reward's tower, 1.14 GiB in fp32, would
    otherwise stay on the card beside the next KSampler's models). Use inside `grad_mode()`: the clones are
    ordinary tensors autograd may save."""
    home, device = _home(reward), reward_device(reward)
    try:
        reward.to(device)  # in place: nn.Module.to moves the cached object itself
        yield (reward, *(t.detach().clone().to(device) for t in tensors))
    finally:
        reward.to(home)


# -- small pipelines the nodes share --------------------------------------------------------------------------
@torch.no_grad()
def prompt_attention_maps(dm: ComfyDiffusionModel, prompt: str, words: list[str], *, seed: int, steps: int,
                          cfg_scale: float, width: int, height: int, resolution: int | str = 16,
                          negative: str = "", sampler_name: str = "ddim", scheduler: str = "normal",
                          callback: Callable[[dict], None] | None = None):
    """Sample `prompt` (KSampler's deterministic `sampler_name` and `scheduler`) while averaging the words'
    cross-attention maps over all steps; `callback` follows the sampler's steps.

    Returns:
        A: [1, n_words, r, r'] maps (r the shorter side, `map_size`), z: [1, C, h, w] final latents.

    Raises:
        ValueError: before any sampling, for a resolution where this MODEL has no cross-attention (naming the
            sizes it has) or a word not in the prompt.
    """
    from ..focusfix_core.attention import AttentionStore, map_size
    from ..focusfix_core.denoisers import CFGDenoiser, initial_x
    from ..focusfix_core.sampler import sample, sampling_sigmas, seed_noise
    from ..focusfix_core.trainers import check_size
    check_size(width, height, dm.latent_scale)
    hw = (height // dm.latent_scale, width // dm.latent_scale)
    if resolution != "any":  # the shorter side: portrait and landscape sizes have maps of their shape
        resolution = map_size(resolution, hw, attention_levels=dm.attention_levels(), latent_scale=dm.latent_scale)
    tokens = dm.token_indices(prompt, words)  # ValueError names a missing word
    dm.encode_first([prompt, negative])
    dm.load(full=False)  # after encoding: loading the text encoder could unload the MODEL (and its patches)
    cond, uncond = (dm.prepare_cond(dm.encode_prompts([p]), hw) for p in (prompt, negative))
    sigmas = sampling_sigmas(dm, steps, scheduler).to(dm.device)
    x = initial_x(dm, seed_noise([seed], (dm.latent_channels, *hw), device=dm.device), float(sigmas[0]))
    # CFG batches the prompt with the negative prompt: a shorter prompt's row is repeated (cat_cond), and its
    # maps sum the copies of its tokens
    store = AttentionStore([tokens], resolution=resolution, keep_grad=False,
                           context_lengths=[int(cond["context"].shape[1])])
    with dm.attention_capture(store):
        z = sample(CFGDenoiser(dm.denoise, uncond, cfg_scale, dm.guidance_function()), x, sigmas, cond, K=0,
                   checkpoint=False, callback=callback, sampler_name=sampler_name)
    return store.maps(), z


def model_family(model_config) -> str | None:
    """The base-model family a LoRA on this model is for (`focusfix_core.lora.BASE_FAMILIES`), by the class
    ComfyUI detected the checkpoint as (or one it derives from: SSD-1B and Vega are SDXL, SD 2.1 is SD20)."""
    names = {c.__name__ for c in type(model_config).__mro__}
    return next((family for cls, family in (("SDXLRefiner", "sdxl_refiner"), ("SDXL", "sdxl"), ("SD20", "sd2"),
                                              ("SD15", "sd1")) if cls in names), None)

