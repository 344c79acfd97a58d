"""One denoiser contract, `denoiser(x, sigma, cond) -> x0`, and the model protocol the trainers use.

k-diffusion convention (Karras et al. 2022): x = x0 + sigma * eps. eps- and v-prediction networks are
wrapped once here with the scalings c_skip, c_out, c_in (k-diffusion `external.py`).

A conditioning `Cond` is a dict of batch-first tensors (`{"context": [B,T,D]}` for SD1.5, plus
`{"y": [B,adm]}` for SDXL), so cond and uncond can be concatenated into one batched call. `CFGDenoiser`
marks that call's cond with `CFG_PAIR`, an empty [2B, 0] tensor (its presence is the message, static for
torch.compile): rows [:B] are the prompt's, rows [B:] the negative prompt's. Where the two contexts' lengths do
not batch cheaply (`batchable`) it runs them apart, and marks the negative prompt's call with `CFG_UNCOND`. A
model whose extensions treat the halves differently (ComfyUI's `cond_or_uncond`) reads them; the others ignore
them.
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

from .attention import not_recorded
from .schedules import sigma_to_t

__all__ = [
    "Cond",
    "Denoiser",
    "DiffusionModel",
    "MODEL_MEMBERS",
    "missing_members",
    "cat_cond",
    "index_cond",
    "repeat_cond",
    "cond_batch_size",
    "prepare_cond",
    "Guidance",
    "model_guidance",
    "initial_x",
    "CFG_PAIR",
    "CFG_UNCOND",
    "batchable",
    "EpsDenoiser",
    "VDenoiser",
    "CFGDenoiser",
]

Cond = dict[str, torch.Tensor]
Denoiser = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]
# guidance(x, sigma, x0_cond, x0_uncond or None (scale 1: not computed), scale) -> x0, all [B,C,h,w] (sigma [B]).
# A guidance with a true attribute `needs_uncond` gets the negative prompt's prediction at scale 1 too.
Guidance = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]
CFG_PAIR = "cfg_pair"
CFG_UNCOND = "cfg_uncond"


@runtime_checkable
class DiffusionModel(Protocol):
    """What a trainer needs from a text-to-image model (tiny test model, embedded model, ComfyUI adapter).

    Attributes:
        net: the module LoRA attaches to; its submodule paths become the LoRA key names.
        sigmas: [T] ascending training sigmas (from alphas_cumprod), for choosing N sampling steps.
        latent_channels: C of the sampler's state x: [B,C,h,w].
        latent_scale: image pixels per latent pixel (8 for SD's VAE, 1 for pixel-space models).
        name: a human-readable model name (goes into LoRA metadata).

    Optional: `checkpoint_modules() -> list[nn.Module]`, the network's residual/attention blocks. Training
    then gradient-checkpoints them one by one (`sampler.checkpointed_modules`) instead of whole calls.
    Optional: `prepare_cond(cond, latent_hw) -> Cond`, called once per encoded cond by the trainers (which
    know the latent size): whatever `denoise` would rebuild from the cond at every call (SDXL's size
    embeddings) is computed there once, so the sampler's calls stay on the device (no host sync, one graph).
    Optional: `guidance_function() -> Guidance | None`, how this model combines the prompt's and the negative
    prompt's predictions when it is not plain CFG (ComfyUI: a MODEL patched by RescaleCFG, CFGZeroStar, APG, ...).
    Optional: `noise_scaling(noise, sigma) -> x`, the sampler's start x from standard noise at sigma (a float);
    sigma * noise without it. (ComfyUI starts a full denoise at sqrt(1 + sigma^2) * noise, as KSampler does.)
    Optional: `sampling_sigmas(steps, scheduler) -> [steps + 1]`, the model's own schedulers by name (ComfyUI's
    list, as KSampler computes them); the core's `schedules.scheduler_sigmas` on `sigmas` without it.
    Optional: `family` ("sd1" | "sd2" | "sdxl" | "sdxl_refiner", `lora.BASE_FAMILIES`) and `v_prediction`: written
    into saved LoRAs so other UIs file them under the right base model.
    Optional: `attention_levels() -> list[int]`, the UNet levels (0 = the latents' size, each next one half as
    large) that hold cross-attention: an attention map size elsewhere is refused before any UNet pass.
    """

    net: nn.Module
    sigmas: torch.Tensor
    latent_channels: int
    latent_scale: int
    name: str

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """x: [B,C,h,w], sigma: [B], cond: batch B -> x0: [B,C,h,w]."""
        ...

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Differentiable decode. z: [B,C,h,w] -> images I: [B,3,H,W] in [0,1]."""
        ...

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Text conditioning for each prompt (batch = len(prompts)); "" gives the unconditional one."""
        ...

    def token_indices(self, prompt: str, words: list[str]) -> list[list[int]]:
        """For each word, the positions of its tokens in the encoded prompt (multi-token words -> several)."""
        ...

    def attention_capture(self, store) -> AbstractContextManager:
        """While active, feed every cross-attention layer's (q, k) to `store.add` (see attention.py)."""
        ...


# what every trainer calls (Separate-and-Enhance also `token_indices` and `attention_capture`)
MODEL_MEMBERS = ("net", "sigmas", "latent_channels", "latent_scale", "denoise", "decode", "encode_prompts")


def missing_members(model: object, members: tuple[str, ...] = MODEL_MEMBERS) -> list[str]:
    """The `DiffusionModel` members `model` lacks, by `hasattr`: an nn.Module's submodules and buffers (the tiny
    model's `net`, `sigmas`) count. isinstance(model, DiffusionModel) does not see them on Python 3.12 and later,
    whose protocol check looks attributes up statically.

    Example:
        >>> missing_members(object(), ("net", "__class__"))
        ['net']
    """
    return [m for m in members if not hasattr(model, m)]


def cond_batch_size(cond: Cond) -> int:
    """B of a Cond: the batch of its tensors (`context` [B,T,D], ...), which must all share it."""
    sizes = {k: v.shape[0] for k, v in cond.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"cond tensors must share their batch size, got {sizes}")
    return next(iter(sizes.values()))


def prepare_cond(model, cond: Cond, latent_hw) -> Cond:
    """`model.prepare_cond(cond, latent_hw)` where the model has one, else cond itself. latent_hw: (h, w)."""
    prepare = getattr(model, "prepare_cond", None)
    return cond if prepare is None else prepare(cond, tuple(int(s) for s in latent_hw))


def model_guidance(model) -> Guidance | None:
    """`model.guidance_function()` where the model has one, else None (plain CFG)."""
    get = getattr(model, "guidance_function", None)
    return None if get is None else get()


def initial_x(model, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The sampler's start at sigma (sigmas[0]) from standard noise [B,C,h,w]: `model.noise_scaling` where the
    model has one, else x = sigma * noise (x = x0 + sigma * eps with nothing known of x0)."""
    scale = getattr(model, "noise_scaling", None)
    return noise * sigma if scale is None else scale(noise, sigma)


def cat_cond(*conds: Cond) -> Cond:
    """Concatenate conditionings along the batch. Keys must match.

    Contexts of different lengths (a prompt over 75 tokens has 154) are each repeated along the token axis up to
    the least common multiple of the lengths, as ComfyUI's `CONDCrossAttn.concat` does: attention over n copies of
    every token gives each copy 1/n of the probability, so every row's attention output is unchanged. An
    attention map of a row of length T_b then sums its tokens' copies at t + m * T_b (`AttentionStore`'s
    context_lengths).

    Example:
        >>> cat_cond({"context": torch.zeros(1, 77, 8)}, {"context": torch.zeros(1, 154, 8)})["context"].shape
        torch.Size([2, 154, 8])
    """
    keys = set(conds[0])
    for c in conds[1:]:
        if set(c) != keys:
            raise ValueError(f"cannot concatenate conds with different keys: {sorted(keys)} vs {sorted(c)}")
    out = {}
    for k in conds[0]:
        parts = [c[k] for c in conds]
        if k == "context" and len({p.shape[1] for p in parts}) > 1:
            n = math.lcm(*(p.shape[1] for p in parts))
            parts = [p if p.shape[1] == n else p.repeat(1, n // p.shape[1], 1) for p in parts]
        out[k] = torch.cat(parts)
    return out


def batchable(*conds: Cond) -> bool:
    """Whether `cat_cond` joins these into one call cheaply: their contexts' lengths have a least common multiple
    at most 4 times the shortest (ComfyUI's `CONDCrossAttn.can_concat`). Above it, repeating every row to that
    multiple costs more than separate calls: a style model's 8 extra tokens, 85 beside 77, make 6545.

    Example:
        >>> batchable({"context": torch.zeros(1, 154, 8)}, {"context": torch.zeros(1, 77, 8)})
        True
        >>> batchable({"context": torch.zeros(1, 85, 8)}, {"context": torch.zeros(1, 77, 8)})
        False
    """
    lengths = [c["context"].shape[1] for c in conds if "context" in c]
    return not lengths or math.lcm(*lengths) <= 4 * min(lengths)


def index_cond(cond: Cond, idx) -> Cond:
    """Select batch rows: idx is an int list, slice or LongTensor."""
    return {k: v[idx] for k, v in cond.items()}


def repeat_cond(cond: Cond, n: int) -> Cond:
    """Each row repeated n times consecutively ([a, b] -> [a, a, b, b])."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}


class EpsDenoiser(nn.Module):
    """x0 from an eps-prediction network `net(x_in, t, cond) -> eps` (DDPM/SD1.5/SDXL).

    c_in = 1/sqrt(sigma^2 + 1) maps the VE state to the network's VP input; x0 = x - sigma * eps.
    Called as `denoiser(x, sigma, cond) -> x0`: x [B,C,h,w], sigma [B], cond a `Cond` of batch B -> x0 [B,C,h,w].
    """

    def __init__(self, net: Callable, sigmas: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float32), persistent=False)

    def get_scalings(self, sigma):
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1) ** 0.5
        return c_out, c_in

    def forward(self, x, sigma, cond):
        c_out, c_in = (s[:, None, None, None] for s in self.get_scalings(sigma.to(x.dtype)))
        eps = self.net(x * c_in, sigma_to_t(sigma, self.sigmas), cond)
        return x + eps * c_out


class VDenoiser(EpsDenoiser):
    """x0 from a v-prediction network (SD2-v, some fine-tunes): x0 = c_skip * x + c_out * v; shapes as
    `EpsDenoiser`."""

    def forward(self, x, sigma, cond):
        s = sigma.to(x.dtype)[:, None, None, None]
        c_skip, c_out, c_in = 1 / (s**2 + 1), -s / (s**2 + 1) ** 0.5, 1 / (s**2 + 1) ** 0.5
        v = self.net(x * c_in, sigma_to_t(sigma, self.sigmas), cond)
        return x * c_skip + v * c_out


class CFGDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022): x0 = x0_u + scale * (x0_c - x0_u), one batched call (two
    where the contexts do not batch cheaply: `batchable`).

    denoiser: the inner `denoiser(x, sigma, cond) -> x0`; uncond: Cond with batch 1 or B.
    guidance: replaces the formula above (`Guidance`; e.g. the MODEL's own in ComfyUI); called with
        x0_uncond None at scale 1, where the negative prompt is not evaluated, unless `guidance.needs_uncond`.
    """

    def __init__(self, denoiser: Denoiser, uncond: Cond, scale: float, guidance: Guidance | None = None):
        super().__init__()
        self.inner, self.uncond, self.scale, self.guidance = denoiser, uncond, float(scale), guidance

    def forward(self, x, sigma, cond):
        B = x.shape[0]
        if self.scale == 1.0 and not getattr(self.guidance, "needs_uncond", False):  # skip the unconditional half
            x0 = self.inner(x, sigma, cond)
            return x0 if self.guidance is None else self.guidance(x, sigma, x0, None, self.scale)
        n = cond_batch_size(self.uncond)
        if n not in (1, B):
            raise ValueError(f"uncond has batch {n}: expected 1 (one negative prompt for all) or the batch {B}")
        uncond = self.uncond if n == B else repeat_cond(self.uncond, B)
        if not batchable(cond, uncond):  # as ComfyUI's sampler then does
            x0_c = self.inner(x, sigma, cond)
            with not_recorded():  # attention stores keep the prompt's maps
                x0_u = self.inner(x, sigma, {**uncond, CFG_UNCOND: x.new_empty(B, 0)})
            return self._combine(x, sigma, x0_c, x0_u)
        pair = cat_cond(cond, uncond)
        pair[CFG_PAIR] = x.new_empty(2 * B, 0)
        x0 = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), pair)
        x0_c, x0_u = x0.chunk(2)  # cond first: attention stores read the first half
        return self._combine(x, sigma, x0_c, x0_u)

    def _combine(self, x, sigma, x0_c, x0_u):
        if self.guidance is not None:
            return self.guidance(x, sigma, x0_c, x0_u, self.scale)
        return x0_u + (x0_c - x0_u) * self.scale
