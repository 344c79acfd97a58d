"""Where the reward looks: gradient saliency and heatmaps turned into Focus-N-Fix masks M(I0).

M: [B,1,H,W] in [0,1], 1 = the image may change there. A reward with a heatmap (RichHF-style artifact
maps) gives it directly; any other reward gets one from the gradient of its score w.r.t. the image. Maps are
[B,1,H,W] too (H, a reward's heatmap, the saliency S), so a map and its mask share one layout; functions that
read a map or a mask also take [B,H,W].

References:
    Simonyan et al. 2014 (gradient saliency), Smilkov et al. 2017 (SmoothGrad),
    Shrikumar et al. 2016 (gradient x input), Otsu 1979 (threshold selection).
"""
from __future__ import annotations

import math
import numbers

import kornia
import torch
from torch import nn

from .losses import _as_mask4, resize_mask

__all__ = [
    "gradient_saliency",
    "score_and_saliency",
    "heatmap_to_mask",
    "normalise_map",
    "mask_from_reward",
    "mask_noise",
    "mask_coverage",
    "check_mask",
    "MASK_ZERO",
    "MASK_KINDS",
    "mask_kind",
    "fit_mask",
    "SALIENCY_METHODS",
    "THRESHOLD_MODES",
    "check_threshold",
    "MAP_SOURCES",
]

SALIENCY_METHODS = ("grad", "smoothgrad", "grad_x_input")
THRESHOLD_MODES = ("value", "top_percent", "otsu")
MAP_SOURCES = ("auto", "heatmap", "saliency")  # where the Saliency Mask node takes its map from


def _check_images(I: object) -> None:
    if not isinstance(I, torch.Tensor):
        raise TypeError(f"images I must be a torch.Tensor [B,3,H,W], got {type(I).__name__}")
    if I.ndim != 4 or not I.is_floating_point():
        raise ValueError(f"images I must be a float [B,C,H,W] tensor, got {I.dtype} of shape {tuple(I.shape)}")
    if I.numel() == 0:
        raise ValueError(f"images I must hold at least one image of at least 1x1 pixels, got shape {tuple(I.shape)}")
    # checked here, not in the heatmap: a NaN image would otherwise be blamed on an internal map
    if not torch.isfinite(I).all():
        raise ValueError("images I must be finite, got NaN or inf values")


def _score_grad(reward: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(x) [B], d(sum_b r(x_b))/dx [B,C,H,W]), without touching the reward's parameters' .grad. x: [B,C,H,W]."""
    x = x.detach().clone().requires_grad_(True)
    scores = reward(x)
    if scores.shape != (x.shape[0],):
        raise ValueError(f"reward must return scores [B] = [{x.shape[0]}], got shape {tuple(scores.shape)}")
    (g,) = torch.autograd.grad(scores.sum(), x)  # samples are independent, so this is per-sample
    return scores.detach(), g


def score_and_saliency(reward: nn.Module, I: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores r(I) [B] and the "grad" saliency |dr/dI| [B,1,H,W] (`gradient_saliency`) of images I [B,3,H,W]
    in [0,1], from one forward and one backward: the scores come from the forward the gradient needs, not from
    another one.

    Example:
        >>> class Red(nn.Module):
        ...     def forward(self, I): return I[:, 0].mean((1, 2))
        >>> scores, S = score_and_saliency(Red(), torch.full((1, 3, 2, 2), 0.5))
        >>> scores.tolist(), S[0, 0].tolist()
        ([0.5], [[0.25, 0.25], [0.25, 0.25]])
    """
    _check_images(I)
    with torch.inference_mode(False), torch.enable_grad():
        scores, g = _score_grad(reward, I)  # it differentiates a plain copy, also of an inference tensor
    return scores, g.abs().sum(1, keepdim=True)  # [B,1,H,W]


def gradient_saliency(
    reward: nn.Module,
    I: torch.Tensor,
    method: str = "grad",
    n_samples: int = 8,
    noise_std: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Saliency of a reward: how much each pixel moves the score r(I).

    Methods: "grad" |dr/dI| summed over channels; "smoothgrad" the same averaged over `n_samples`
    copies of I + N(0, noise_std^2) (noise from `generator`); "grad_x_input" |dr/dI * I| summed over
    channels. Gradients are taken on a detached copy of I with `torch.autograd.grad`, so the reward's
    parameters get no `.grad`; runs with grad enabled (and outside inference mode) whatever the caller's mode.

    Args:
        reward: a module mapping I: [B,3,H,W] to scores [B].
        I: [B,3,H,W] images in [0,1].
        method: one of SALIENCY_METHODS.
        n_samples: noisy copies for "smoothgrad".
        noise_std: noise standard deviation for "smoothgrad", in image units.
        generator: randomness for "smoothgrad".

    Returns:
        S: [B,1,H,W] saliency >= 0 (detached).

    Raises:
        ValueError: a bad method, or empty or non-finite images I.

    Example:
        >>> class Red(nn.Module):
        ...     def forward(self, I): return I[:, 0].mean((1, 2))
        >>> gradient_saliency(Red(), torch.rand(2, 3, 8, 8)).shape
        torch.Size([2, 1, 8, 8])
    """
    _check_images(I)
    if method not in SALIENCY_METHODS:
        raise ValueError(f"method must be one of {SALIENCY_METHODS}, got {method!r}")
    if method == "smoothgrad" and (n_samples < 1 or not noise_std >= 0):
        raise ValueError(f"smoothgrad needs n_samples >= 1 and noise_std >= 0, got {n_samples} and {noise_std}")
    with torch.inference_mode(False), torch.enable_grad():
        x = I.detach().clone()  # a normal tensor even when I is an inference tensor
        if method == "grad":
            S = _score_grad(reward, x)[1].abs().sum(1, keepdim=True)
        elif method == "grad_x_input":
            S = (_score_grad(reward, x)[1] * x).abs().sum(1, keepdim=True)
        else:
            S = torch.zeros_like(x[:, :1])
            for _ in range(n_samples):
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                S = S + _score_grad(reward, x + noise_std * noise)[1].abs().sum(1, keepdim=True)
            S = S / n_samples
    return S.detach()  # [B,1,H,W]


def _as_map4(H: torch.Tensor, name: str) -> torch.Tensor:
    """A map or mask H: [B,H,W] or [B,1,H,W] of any real dtype (a bool mask too) -> float [B,1,H,W]."""
    if isinstance(H, torch.Tensor) and not H.is_floating_point():
        H = H.float()
    return _as_mask4(H, name)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of x: [B,1,H,W] (reflect border; kernel 2*ceil(3 sigma)+1, capped to fit the image)."""
    if sigma <= 0:
        return x
    k = 2 * math.ceil(3 * sigma) + 1
    kh, kw = (min(k, 2 * ((n - 1) // 2) + 1) for n in x.shape[-2:])  # reflect needs pad < size
    if kh < 3 or kw < 3:
        return x
    return kornia.filters.gaussian_blur2d(x, (kh, kw), (sigma, sigma), border_type="reflect")


def normalise_map(H: torch.Tensor) -> torch.Tensor:
    """Min-max per image to [0,1]; a constant image becomes zeros. H: [B,1,H,W] -> [B,1,H,W]. The map a mask is
    cut from, and the one Score Images shows (one rule: a map of ~1e-9 still spans [0,1] in both).

    Example:
        >>> normalise_map(torch.tensor([[[[1e-9, 3e-9]]], [[[5.0, 5.0]]]])).flatten().tolist()
        [0.0, 1.0, 0.0, 0.0]
    """
    lo = H.flatten(1).amin(1)[:, None, None, None]
    span = H.flatten(1).amax(1)[:, None, None, None] - lo
    # relative test: saliency of a large reward model can be ~1e-7 everywhere and still well structured
    scale = H.flatten(1).abs().amax(1)[:, None, None, None]
    flat = span <= torch.finfo(H.dtype).eps * scale
    return torch.where(flat, torch.zeros_like(H), (H - lo) / torch.where(flat, torch.ones_like(span), span))


def _disk(radius: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2 + 0.5).to(dtype)  # (2r+1, 2r+1)


def dilate(M: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary M [B,1,H,W] grown by a disk of `radius` pixels: a pixel is on when the disk around it holds an on
    pixel (zero outside the image). An FFT convolution with the disk, so memory stays O(HW) at any radius:
    kornia's dilation unfolds (2r+1)^2 values per pixel on CUDA (257 GiB at 512 px and r = 256).

    Examples:
        >>> M = torch.zeros(1, 1, 7, 7); M[0, 0, 3, 3] = 1
        >>> dilate(M, 1)[0, 0, 2:5, 2:5].tolist()
        [[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]
    """
    h, w = M.shape[-2:]
    r = min(int(radius), math.ceil(math.hypot(h, w)))  # a larger disk covers the image from any on pixel
    if r <= 0:
        return M
    size = (h + 2 * r, w + 2 * r)  # room for the full linear convolution: no wrap-around
    spectrum = torch.fft.rfft2(M.float(), s=size) * torch.fft.rfft2(_disk(r, M.device, torch.float32), s=size)
    count = torch.fft.irfft2(spectrum, s=size)[..., r:r + h, r:r + w]  # on pixels under each disk (+- rounding)
    return (count > 0.5).to(M.dtype)


def check_threshold(threshold_mode: str, threshold: float) -> None:
    """ValueError unless `threshold` fits `threshold_mode`: a cut-off in [0,1] ("value"), a kept fraction in
    (0,1] ("top_percent"); "otsu" reads none."""
    if threshold_mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")
    if threshold_mode == "value" and not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0,1] for 'value', got {threshold}")
    if threshold_mode == "top_percent" and not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a fraction in (0,1] for 'top_percent' (the share of pixels kept), "
                         f"got {threshold}")
    # requirements.txt asks for 0.8.2, but an installer that skips a package it finds (any version) leaves
    # ComfyUI's own kornia (it asks only for 0.7.1): say so when the mode is chosen, not in an AttributeError
    if threshold_mode == "otsu" and not hasattr(kornia.filters, "otsu_threshold"):
        raise ValueError(f"threshold_mode 'otsu' needs kornia 0.8.2 or newer, this Python has kornia "
                         f"{getattr(kornia, '__version__', '(unknown version)')}: update it (in ComfyUI's Python: "
                         f"python -m pip install -U kornia) and restart, or choose 'value' or 'top_percent'")


MAX_SIGMA = 1e4  # pixels: a blur or feather that wide flattens any image (and past ~1e19 kornia overflows)


def check_mask_settings(blur_sigma: float, dilation: int, feather: float) -> None:
    """ValueError naming the setting unless blur_sigma and feather are finite pixels in [0, MAX_SIGMA] and
    dilation a whole number of pixels >= 0."""
    for name, value in (("blur_sigma", blur_sigma), ("feather", feather)):
        if not (isinstance(value, numbers.Real) and 0 <= value <= MAX_SIGMA):  # NaN fails the comparison too
            raise ValueError(f"{name} must be a number of pixels from 0 to {MAX_SIGMA:g}, got {value!r}")
    if not (isinstance(dilation, numbers.Real) and math.isfinite(dilation) and dilation >= 0
            and int(dilation) == dilation):
        raise ValueError(f"dilation must be a whole number of pixels >= 0, got {dilation!r}")


def heatmap_to_mask(
    H: torch.Tensor,
    blur_sigma: float = 2.0,
    threshold_mode: str = "value",
    threshold: float = 0.5,
    dilation: int = 0,
    feather: float = 0.0,
) -> torch.Tensor:
    """Turn a heatmap (high = change here) into a Focus-N-Fix mask M.

    Steps: Gaussian blur (`blur_sigma`, pixels) -> min-max normalisation per image to [0,1] (so
    `threshold` is relative to each image's blurred range, lowest to highest value, not to its peak alone;
    a constant heatmap carries no location and gives an empty mask) -> threshold -> disk dilation by
    `dilation` pixels -> Gaussian feathering of the binary mask (`feather` sigma) -> clamp to [0,1].

    Threshold modes: "value" keeps H >= threshold; "top_percent" keeps the top `threshold` fraction
    of pixels (ties at the cut-off are kept; zeros never enter a mask below 100%); "otsu" picks the
    threshold per image (kornia's histogram Otsu; `threshold` unused).

    Args:
        H: [B,H,W] or [B,1,H,W] heatmap >= 0.
        blur_sigma: pre-threshold blur in pixels (0 = none).
        threshold_mode: one of THRESHOLD_MODES.
        threshold: the cut-off in [0,1] ("value") or the kept fraction in (0,1] ("top_percent").
        dilation: grow the mask by this many pixels (disk).
        feather: soften the mask edge with this Gaussian sigma in pixels (0 = hard mask).

    Returns:
        M: [B,1,H,W] float in [0,1], 1 = may change.

    Raises:
        ValueError: for a bad mode (listing the options), a negative heatmap or out-of-range numbers.

    Example:
        >>> heatmap_to_mask(torch.rand(2, 32, 32), threshold_mode="top_percent", threshold=0.1).shape
        torch.Size([2, 1, 32, 32])
    """
    H = _as_map4(H, "heatmap H")
    check_threshold(threshold_mode, threshold)
    check_mask_settings(blur_sigma, dilation, feather)
    if not torch.isfinite(H).all():
        raise ValueError(f"heatmap H must be finite, got NaN or inf values (shape {tuple(H.shape)})")
    if not H.numel():  # an empty batch (or image): an empty mask, without kornia's Otsu or an FFT, which fail on it
        return torch.zeros_like(H)  # (_as_map4 made H float)
    if H.min() < 0:
        raise ValueError(f"heatmap H must be >= 0, got a minimum of {float(H.min()):.4g}")
    device = H.device
    if device.type == "mps":  # kthvalue (before torch 2.9) and FFTs (pytorch#124096) fail there; a mask is small
        H = H.cpu()
    H = normalise_map(_blur(H.detach(), blur_sigma))  # [B,1,H,W] in [0,1]
    informative = (H.flatten(1).amax(1) > 0)[:, None, None, None]
    if threshold_mode == "value":
        M = H >= threshold
    elif threshold_mode == "top_percent":
        n = H.shape[-2] * H.shape[-1]  # not H[0]: an empty batch gives an empty mask
        keep = min(max(math.ceil(threshold * n - 1e-9), 1), n)  # pixels to keep per image
        q = H.flatten(1).kthvalue(n - keep + 1, dim=1).values  # (B,) the keep-th largest value
        if threshold < 1:  # never pick the background minimum (0 after normalisation) through ties
            q = q.clamp_min(torch.finfo(H.dtype).tiny)
        M = H >= q[:, None, None, None]
    else:
        M, _ = kornia.filters.otsu_threshold(H, return_mask=True)
    M = (M & informative).to(H.dtype)  # [B,1,H,W] binary
    if dilation > 0:
        M = dilate(M, int(dilation))
    return _blur(M, feather).clamp(0, 1).to(device)


def mask_noise(device: torch.device | str) -> torch.Generator:
    """The generator of smoothgrad's noise for one image's mask, seeded the same for every image: a mask depends
    on its image and settings alone, not on a run, a batch or a seed, so the Saliency Mask node shows the mask
    the Train node trains with."""
    return torch.Generator(device=device).manual_seed(0)


def mask_from_reward(
    reward: nn.Module,
    I: torch.Tensor,
    mask_source: str = "auto",
    *,
    saliency_method: str = "grad",
    generator: torch.Generator | None = None,
    **mask_kwargs,
) -> torch.Tensor:
    """M(I0) from a reward: its heatmap ("heatmap"), its gradient saliency ("saliency"), or "auto"
    (the heatmap when the reward has one, else saliency). The names are the Train node's and the Saliency Mask
    node's.

    Args:
        reward: the reward module; `has_heatmap`/`heatmap(I) -> [B,1,H,W]` when it localises.
        I: [B,3,H,W] the base image I0 in [0,1].
        mask_source: one of MAP_SOURCES.
        saliency_method: one of SALIENCY_METHODS, the `method` of `gradient_saliency` (saliency only).
        generator: passed to `gradient_saliency` (smoothgrad's noise).
        **mask_kwargs: passed to `heatmap_to_mask`.

    Returns:
        M: [B,1,H,W] in [0,1].

    Raises:
        ValueError: empty or non-finite images I, a bad mask_source (or saliency_method, when saliency is used), or a
            reward whose map is not finite.
    """
    _check_images(I)
    if mask_source not in MAP_SOURCES:
        raise ValueError(f"mask_source must be one of {MAP_SOURCES}, got {mask_source!r}")
    has_heatmap = bool(getattr(reward, "has_heatmap", False))
    if mask_source == "heatmap" and not has_heatmap:
        name = getattr(reward, "name", type(reward).__name__)
        raise ValueError(f"mask_source='heatmap' but reward {name!r} has no heatmap: use mask_source='saliency' "
                         f"or 'auto'")
    kind = "saliency" if mask_source == "saliency" or not has_heatmap else "heatmap"
    if kind == "saliency":
        if saliency_method not in SALIENCY_METHODS:  # named as the caller names it, not as gradient_saliency does
            raise ValueError(f"saliency_method must be one of {SALIENCY_METHODS}, got {saliency_method!r}")
        heat = gradient_saliency(reward, I, method=saliency_method, generator=generator)
    else:
        with torch.no_grad():
            heat = _as_map4(reward.heatmap(I), "reward heatmap")
        if heat.shape[-2:] != I.shape[-2:]:
            heat = torch.nn.functional.interpolate(heat, size=I.shape[-2:], mode="bilinear")
        heat = heat.clamp_min(0)
    if not torch.isfinite(heat).all():  # I is finite (checked above): the reward made the NaN
        name = getattr(reward, "name", type(reward).__name__)
        raise ValueError(f"reward {name!r} gave a non-finite {kind} (NaN or inf) for finite images I")
    return heatmap_to_mask(heat, **mask_kwargs)


def mask_coverage(M: torch.Tensor) -> torch.Tensor:
    """The share of each image that may change: the mean of M in [0,1], a soft pixel counting by its value, as the
    region term weighs it (1 - M of it is held); a NaN counts as 0. M: [B,H,W] or [B,1,H,W] -> [B] (never NaN; 0 for
    an image of no pixels)."""
    M = _as_map4(M, "mask M")
    if M.shape[-2] * M.shape[-1] == 0:
        return M.new_zeros(M.shape[0])
    return torch.nan_to_num(M, nan=0.0).clamp(0, 1).flatten(1).mean(1)


# Mask values below half an 8-bit level are a painted 0 (a PNG's 0, a JPEG's rounding): the region term holds
# such a pixel whole. Soft values above it let a pixel change in part, so only a mask with none is "empty".
MASK_ZERO = 0.5 / 255


def mask_kind(low: float, top: float) -> str | None:
    """What a mask whose values span low..top is to the region term: "empty" (every value 0: held whole), "full"
    (every value 1: nothing held), "faint" (no value reaches 0.5: its region changes only in part) or None. The
    one rule behind `check_mask` and the command line's `--mask` messages."""
    if top < MASK_ZERO:
        return "empty"
    if low > 1 - MASK_ZERO:
        return "full"
    return "faint" if top < 0.5 else None


MASK_KINDS = ("nonfinite", "empty", "full", "faint")  # what `check_mask` warns of


def check_mask(M: torch.Tensor, name: str = "mask M",
               kinds: tuple[str, ...] = MASK_KINDS) -> list[str]:
    """Human-readable warnings about a mask M [B,H,W] or [B,1,H,W] in [0,1]: empty (every value 0), full (every
    value 1), faint (no value reaches 0.5: a soft mask changes only in part) or non-finite images, only those of
    `kinds`. [] when all is well. The region term weighs each pixel by 1 - M, so a soft mask is judged by its
    values, not by a threshold.

    Example:
        >>> check_mask(torch.zeros(1, 4, 4))
        ['mask M[0] is empty (every value 0): the whole image is held fixed']
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)  # one kind by name, not its letters
    unknown = sorted(set(kinds) - set(MASK_KINDS))
    if unknown:  # a misspelt kind would silently pass every mask
        raise ValueError(f"kinds must be among {MASK_KINDS}, got {unknown}")
    M = _as_map4(M, name)
    warnings = []
    flat = M.flatten(1).float()
    finite = torch.isfinite(flat).all(1)
    hi = flat.nan_to_num(0.0).amax(1) if flat.shape[1] else torch.zeros(len(M))
    lo = flat.nan_to_num(1.0).amin(1) if flat.shape[1] else torch.zeros(len(M))
    for b, (ok, top, low) in enumerate(zip(finite.tolist(), hi.tolist(), lo.tolist())):
        kind = mask_kind(low, top) if ok else "nonfinite"
        if kind not in kinds:
            continue
        if kind == "nonfinite":
            warnings.append(f"{name}[{b}] has NaN or inf values")
        elif kind == "empty":
            warnings.append(f"{name}[{b}] is empty (every value 0): the whole image is held fixed")
        elif kind == "full":
            warnings.append(f"{name}[{b}] is full (every value 1): nothing is held: Focus-N-Fix becomes plain DRaFT")
        elif kind == "faint":
            warnings.append(f"{name}[{b}] is faint (at most {top:.3g}): even its strongest pixel is held {1 - top:.0%} "
                            f"to I0, so the region changes only in part (a wide feather on a small region, or a "
                            f"light brush?)")
    return warnings


def fit_mask(M: torch.Tensor, size: tuple[int, int], name: str = "mask") -> tuple[torch.Tensor, str]:
    """M: [B,1,h,w] float in [0,1] -> (M [B,1,H,W] with (H, W) = size, note), resized by `resize_mask` (a thin
    painted stroke stays "may change").

    The note ("" when the size already fits) says so, and warns when the aspect ratio differs by over 2 %:
    the mask is then stretched, likely painted on another (or a rotated) image."""
    h, w = M.shape[-2:]
    if (h, w) == tuple(size):
        return M, ""
    note = f"{name} resized from {h}x{w} to {size[0]}x{size[1]}"
    if abs(h * size[1] - w * size[0]) > 0.02 * w * size[0]:
        note += " (another aspect ratio: stretched; was it painted on another or a rotated image?)"
    return resize_mask(M, size), note
