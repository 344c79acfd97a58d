"""Noise schedules in sigma space (k-diffusion convention: x = x0 + sigma * eps).

References: Ho et al. 2020 (DDPM betas), Song et al. 2021 (DDIM), Karras et al. 2022 (sigma view).
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "scaled_linear_alphas_cumprod",
    "sigmas_from_alphas_cumprod",
    "sigma_to_t",
    "t_to_sigma",
    "get_sigmas_uniform",
    "get_sigmas_sgm_uniform",
    "get_sigmas_simple",
    "get_sigmas_karras",
    "get_sigmas_exponential",
    "SCHEDULERS",
    "scheduler_sigmas",
]

# the core's schedules, by ComfyUI's scheduler names (a ComfyUI MODEL uses ComfyUI's own list instead)
SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "simple")


def scaled_linear_alphas_cumprod(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's "scaled linear" DDPM schedule. -> alphas_cumprod: [n], float64."""
    if n < 2:
        raise ValueError(f"n must be >= 2 training timesteps, got {n}")
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) (VP -> VE). alphas_cumprod: [T] -> sigmas: [T] ascending."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if ac.ndim != 1 or len(ac) < 2:
        raise ValueError(f"alphas_cumprod must be a 1-D tensor of length >= 2, got shape {tuple(ac.shape)}")
    if not bool(((ac > 0) & (ac <= 1)).all()):
        raise ValueError("alphas_cumprod must lie in (0, 1]")
    return ((1 - ac) / ac).sqrt()


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Continuous timestep for sigma by linear interpolation of log-sigma (k-diffusion DiscreteSchedule).

    sigma: [B]; sigmas: [T] ascending training sigmas -> t: [B] in [0, T-1].
    """
    log_sigmas = sigmas.log().to(sigma.device, torch.float32)
    # no .item(): a host sync per call on a GPU, and a graph break under torch.compile
    log_sigma = torch.maximum(sigma.float(), sigmas[:1].to(sigma.device, torch.float32)).log()
    dists = log_sigma[:, None] - log_sigmas[None, :]                      # [B,T]
    low = dists.ge(0).cumsum(dim=1).argmax(dim=1).clamp(max=len(sigmas) - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return ((1 - w) * low + w * high).view(sigma.shape)


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Inverse of `sigma_to_t`: log-linear interpolation of the training sigmas. t: [N] -> [N]."""
    log_sigmas = sigmas.log().to(t.device, torch.float32)
    t = t.float().clamp(0, len(sigmas) - 1)
    low = t.floor().long().clamp(max=len(sigmas) - 2)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def get_sigmas_uniform(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` sigmas evenly spaced in timestep from sigma_max down, then 0 ("normal" scheduler).

    sigmas: [T] ascending training sigmas -> [steps + 1] descending, last = 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(len(sigmas) - 1, 0, steps)
    return torch.cat([t_to_sigma(t, sigmas), t.new_zeros(1)])


def get_sigmas_sgm_uniform(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """Like `get_sigmas_uniform` but `steps` of `steps + 1` even timesteps, the last (t = 0) dropped (SGM's
    "uniform", ComfyUI's sgm_uniform). sigmas: [T] ascending -> [steps + 1] descending, last = 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(len(sigmas) - 1, 0, steps + 1)[:-1]
    return torch.cat([t_to_sigma(t, sigmas), t.new_zeros(1)])


def get_sigmas_simple(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """Every (T / steps)-th training sigma from the top (ComfyUI's "simple").
    sigmas: [T] ascending -> [steps + 1] descending, last = 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    stride = len(sigmas) / steps
    idx = torch.tensor([len(sigmas) - 1 - int(i * stride) for i in range(steps)])
    return torch.cat([sigmas.float()[idx], torch.zeros(1)])


def get_sigmas_karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) noise schedule. -> [steps + 1] descending, last = 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1)])


def get_sigmas_exponential(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sigmas evenly spaced in log sigma. -> [steps + 1] descending, last = 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    return torch.cat([torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp(), torch.zeros(1)])


def scheduler_sigmas(scheduler: str, sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` sampling sigmas by scheduler name (one of SCHEDULERS) from a model's training sigmas.

    sigmas: [T] ascending -> [steps + 1] descending, last = 0.
    """
    if scheduler == "normal":
        return get_sigmas_uniform(sigmas, steps)
    if scheduler == "sgm_uniform":
        return get_sigmas_sgm_uniform(sigmas, steps)
    if scheduler == "simple":
        return get_sigmas_simple(sigmas, steps)
    if scheduler in ("karras", "exponential"):  # these read the model's sigma range only
        get = get_sigmas_karras if scheduler == "karras" else get_sigmas_exponential
        return get(steps, float(sigmas[0]), float(sigmas[-1]))
    raise ValueError(f"unknown scheduler {scheduler!r}: expected one of {list(SCHEDULERS)}")
