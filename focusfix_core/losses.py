"""Training losses: Focus-N-Fix's region constraint and reward term, Separate-and-Enhance's attention terms.

References:
    Focus-N-Fix (CVPR 2025): loss = -r(I) + lam * ||(1 - M(I0)) * (I0 - I)||_F, DRaFT-style, where I0 is
        the base model's image, I the fine-tuned model's image from the same noise, and M(I0) = 1 where
        the image may change.
    Separate-and-Enhance (Bao et al., SIGGRAPH 2024): fine-tune cross-attention `to_k` with
        L_sep = max_p A_1(p) A_2(p) / (A_1(p) + A_2(p)) and L_en = 1 - min_i max_p (G * A_i)(p)
        on the 16x16 cross-attention maps A_i of the object tokens; plus a preservation term that keeps
        the adapted denoiser close to the base one (`--use_norm` in the reference code).

Every loss returns one value per sample ([B]); the trainer reduces.
"""
from __future__ import annotations

from typing import Sequence

import kornia
import torch
import torch.nn.functional as F

__all__ = [
    "NonFiniteScoreError",
    "region_loss",
    "resize_mask",
    "reward_loss",
    "separate_loss",
    "enhance_loss",
    "overlap_and_peaks",
    "preservation_loss",
    "key_change_loss",
]


def _check_tensor(x: object, name: str, shape: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor {shape}, got {x.dtype}")


def _as_mask4(M: torch.Tensor, name: str = "mask M") -> torch.Tensor:
    """M: [B,H,W] or [B,1,H,W] -> [B,1,H,W]."""
    _check_tensor(M, name, "[B,H,W] or [B,1,H,W]")
    if M.ndim == 3:
        return M.unsqueeze(1)
    if M.ndim == 4 and M.shape[1] == 1:
        return M
    raise ValueError(f"{name} must be [B,H,W] or [B,1,H,W], got shape {tuple(M.shape)}")


def _safe_norm(s: torch.Tensor) -> torch.Tensor:
    """sqrt(s) for s >= 0 whose gradient at s == 0 is 0 instead of inf/NaN (the 'double where' trick).
    A NaN in s stays NaN (`s != 0`, not `s > 0`), so the trainers' non-finite check sees it."""
    pos = s != 0
    return torch.where(pos, torch.where(pos, s, torch.ones_like(s)).sqrt(), torch.zeros_like(s))


def region_loss(I: torch.Tensor, I0: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Focus-N-Fix region constraint ||(1 - M) * (I0 - I)||_F per image (unsquared, as in the paper).

    Works on pixels or on latents. The gradient is finite everywhere: where I == I0 outside the mask
    (the norm of a zero vector) it is 0, not NaN. Where M == 1 the gradient w.r.t. I is exactly 0.

    Args:
        I: [B,C,H,W] the fine-tuned model's image (or latent).
        I0: [B,C,H,W] the base model's image (or latent), usually detached.
        M: [B,H,W] or [B,1,H,W] in [0,1], 1 = may change; batch 1 broadcasts over B.

    Returns:
        [B] the region loss per image (float32 or wider); 0 when I equals I0 wherever M < 1.

    Raises:
        TypeError: when an argument is not a tensor.
        ValueError: for mismatched shapes or a mask outside [0,1].

    Example:
        >>> I0 = torch.rand(2, 3, 8, 8)
        >>> region_loss(I0 + 1, I0, torch.ones(1, 8, 8))
        tensor([0., 0.])
    """
    _check_tensor(I, "image I", "[B,C,H,W]")
    _check_tensor(I0, "base image I0", "[B,C,H,W]")
    if I.ndim != 4:
        raise ValueError(f"image I must be [B,C,H,W], got shape {tuple(I.shape)}")
    if I0.shape != I.shape:
        raise ValueError(f"base image I0 must have the shape of I {tuple(I.shape)}, got {tuple(I0.shape)}")
    B, C, H, W = I.shape
    M = _as_mask4(M)
    if M.shape[-2:] != I.shape[-2:]:
        raise ValueError(
            f"mask M must have the image size {H}x{W}, got mask size {M.shape[-2]}x{M.shape[-1]} "
            f"(use resize_mask for latents)"
        )
    if M.shape[0] not in (1, B):
        raise ValueError(f"mask M must have batch 1 or {B} (the batch of I), got {M.shape[0]}")
    if M.numel() and (M.min() < 0 or M.max() > 1):
        raise ValueError(f"mask M must lie in [0,1], got values in [{M.min().item():.3g}, {M.max().item():.3g}]")
    dtype = torch.promote_types(I.dtype, torch.float32)  # a half-precision sum of squares overflows
    D = (1 - M.to(dtype)) * (I0.to(dtype) - I.to(dtype))  # (B, C, H, W); 0 where the image may change
    return _safe_norm(D.square().flatten(1).sum(1))  # (B,)


def resize_mask(M: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize a mask, e.g. from pixels [H,W] to latents [h,w]; values stay in [0,1]. Enlarged bilinearly;
    shrunk by the maximum over each output pixel's footprint, so a thin "may change" stroke stays 1 (an
    average would fade a 3-pixel stroke to 0.375 at 1/8 size, and the region term would still hold most of it).

    Args:
        M: [B,H,W] or [B,1,H,W] in [0,1].
        size: h (square) or (h, w).

    Returns:
        [B,1,h,w].

    Example:
        >>> resize_mask(torch.ones(2, 64, 48), (8, 6)).shape
        torch.Size([2, 1, 8, 6])
    """
    M = _as_mask4(M)
    if isinstance(size, int):
        size = (size, size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be a positive int or (h, w), got {size}")
    size = tuple(int(s) for s in size)
    h, w = M.shape[-2:]
    up = (max(h, size[0]), max(w, size[1]))  # enlarge first along a side that grows, then shrink the other
    if up != (h, w):
        M = F.interpolate(M, size=up, mode="bilinear", align_corners=False)
    if up != size:
        M = F.adaptive_max_pool2d(M, size)
    return M.clamp(0, 1)  # (B, 1, h, w)


class NonFiniteScoreError(ValueError):
    """A reward returned NaN or inf (a trainer stops as on a non-finite loss)."""


def reward_loss(scores: torch.Tensor, target: float | None = None) -> torch.Tensor:
    """DRaFT reward term -mean_b min(r(I_b), target). scores: [B] (higher is better) -> scalar.

    target: an image whose score is above it gets no more push (no gradient) and the region term alone holds
    it; None pushes without bound. Bounding the push is what kept the rest of the image on the tiny world's
    attribute fix (benchmarks/RESULTS.md, quality: outside change 4.6x smaller than DRaFT's).

    Raises:
        NonFiniteScoreError (a ValueError): when a score is NaN or inf (never let it reach the optimizer).

    Example:
        >>> reward_loss(torch.tensor([1.0, 3.0]))
        tensor(-2.)
        >>> reward_loss(torch.tensor([1.0, 3.0]), target=2.0)
        tensor(-1.5000)
    """
    _check_tensor(scores, "scores", "[B]")
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty [B] tensor, got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise NonFiniteScoreError(f"scores must be finite, got {scores.detach().flatten()[:8].tolist()}")
    return -(scores if target is None else scores.clamp(max=target)).mean()


def _check_maps(A: torch.Tensor, min_words: int) -> tuple[int, int, int, int]:
    _check_tensor(A, "attention maps A", "[B,N,h,w]")
    if A.ndim != 4:
        raise ValueError(f"attention maps A must be [B,N,h,w], got shape {tuple(A.shape)}")
    if A.shape[1] < min_words:
        raise ValueError(f"attention maps A need N >= {min_words} object tokens, got N = {A.shape[1]}")
    if A.shape[2] < 1 or A.shape[3] < 1:
        raise ValueError(f"attention maps A need at least one pixel, got shape {tuple(A.shape)}")
    return tuple(A.shape)


def separate_loss(A: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Separate-and-Enhance separation term, generalised to every pair of objects i < j.

    Per pair, L_ij = max_p A_i(p) A_j(p) / (A_i(p) + A_j(p)) (the overlap of two maps, 0 where both
    are 0); pairs are aggregated by `reduction`. For N = 2 both reductions give the paper's L_sep
    exactly. The maps are used as they come (raw cross-attention probabilities, no renormalisation),
    as in the reference code; they are averaged over heads (as Attend-and-Excite does), where the reference
    code takes the max over heads and pixels, so the values are lower than the reference's.

    Args:
        A: [B,N,h,w] cross-attention maps (>= 0) of N >= 2 object tokens.
        reduction: "mean" (default: every pair gets a gradient) or "max" (only the worst pair).

    Returns:
        [B] the separation loss per sample.

    Raises:
        ValueError: if N < 2 or `reduction` is unknown.

    Example:
        >>> separate_loss(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2])
    """
    B, N, h, w = _check_maps(A, 2)
    if reduction not in ("mean", "max"):
        raise ValueError(f"reduction must be 'mean' or 'max', got {reduction!r}")
    i, j = torch.triu_indices(N, N, offset=1, device=A.device)  # (P,), P = N (N - 1) / 2 pairs
    Ai, Aj = A[:, i], A[:, j]  # (B, P, h, w)
    s = Ai + Aj
    pos = s != 0  # not s > 0: a NaN map must give a NaN loss, not 0
    overlap = torch.where(pos, Ai * Aj / torch.where(pos, s, torch.ones_like(s)), torch.zeros_like(s))
    L = overlap.flatten(2).amax(2)  # (B, P)
    return L.mean(1) if reduction == "mean" else L.amax(1)


def enhance_loss(A: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """Separate-and-Enhance enhancement term L_en = 1 - min_i max_p (G * A_i)(p).

    G is a 3x3 Gaussian with reflect padding. The maps are NOT normalised (no division by their
    max, no softmax without the start token as in Attend-and-Excite): the reference code pushes the
    raw attention probability of the weakest object towards 1. FocusFix's maps are averaged over heads,
    whose peaks are lower than the reference's max over heads, so this term stays nearer 1. Note the released code's
    `GaussianSmoothing` computes exp(-(x / 2 sigma)^2), i.e. an effective sigma of 0.5 * sqrt(2); pass
    `sigma=0.5 * 2 ** 0.5` to reproduce it exactly.

    Args:
        A: [B,N,h,w] cross-attention maps (>= 0) of N >= 1 object tokens.
        sigma: standard deviation of G in pixels of the map.

    Returns:
        [B] the enhancement loss per sample.

    Example:
        >>> enhance_loss(torch.rand(2, 2, 16, 16)).shape
        torch.Size([2])
    """
    B, N, h, w = _check_maps(A, 1)
    if h < 2 or w < 2:
        raise ValueError(f"attention maps A must be at least 2x2 for the 3x3 blur, got {h}x{w}")
    if not 0 < sigma <= 1e4:  # a wider blur flattens any map (kornia overflows float32 far beyond)
        raise ValueError(f"sigma must be > 0 and at most 1e4 pixels, got {sigma}")
    GA = kornia.filters.gaussian_blur2d(A, (3, 3), (sigma, sigma), border_type="reflect")  # (B, N, h, w)
    return 1 - GA.flatten(2).amax(2).amin(1)  # (B,)


def overlap_and_peaks(A: torch.Tensor) -> tuple[float, list[float]]:
    """The numbers an artist reads off one prompt's maps: (overlap, each word's peak).

    Args:
        A: [1,n,h,w] the maps of one prompt's n >= 1 words (n >= 2 for an overlap; 0 with one word).

    Returns:
        overlap: `separate_loss` (0 = the words apart); peaks: per word, its strongest blurred attention
        (1 - `enhance_loss` of that map alone), which Enhance raises for the weakest word.

    Example:
        >>> overlap_and_peaks(torch.zeros(1, 2, 4, 4))
        (0.0, [0.0, 0.0])
    """
    n = _check_maps(A, 1)[1]
    overlap = float(separate_loss(A[:1])[0]) if n > 1 else 0.0
    return overlap, [1 - float(enhance_loss(A[:1, i:i + 1])[0]) for i in range(n)]


def preservation_loss(x0: torch.Tensor, x0_base: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE between the adapted denoiser's x0 and the base one's (LoRA disabled; detached here).

    Args:
        x0: [B,C,h,w] the adapted denoiser's output.
        x0_base: [B,C,h,w] the base denoiser's output on the same input.

    Returns:
        [B] mean squared difference per sample.

    Example:
        >>> preservation_loss(torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8))
        tensor([1., 1.])
    """
    _check_tensor(x0, "x0", "[B,C,h,w]")
    _check_tensor(x0_base, "x0_base", "[B,C,h,w]")
    if x0.shape != x0_base.shape or x0.ndim < 2:
        raise ValueError(f"x0_base must have the shape of x0 {tuple(x0.shape)}, got {tuple(x0_base.shape)}")
    return (x0 - x0_base.detach()).square().flatten(1).mean(1)  # (B,)


def key_change_loss(deltas: Sequence[torch.Tensor], base_energy: torch.Tensor, *,
                    check_energy: bool = True) -> torch.Tensor:
    """Per-prompt relative change of the adapted text-side projections: sum_l ||dK_l||^2 / sum_l ||K_l||^2.

    With a LoRA only on layers that read the text alone (cross-attention to_k / to_v), the model's output
    for a prompt changes only through these layers' outputs on that prompt's text: zero change means the
    prompt's prediction is exactly the base model's, at every noise and timestep, so preserving it needs no
    UNet pass. (Under CFG the image also reads the negative prompt's keys, which this does not hold.)

    Args:
        deltas: per adapted layer l, the LoRA's change of the layer's output on the prompts' text, [P,T,C_l].
        base_energy: [P] sum_l ||K_l||^2 of the same layers' base outputs per prompt (> 0).
        check_energy: check that base_energy is finite and > 0. The check reads the values on the host (a
            device sync); a caller that checked them once, as the trainer does, passes False on every step.

    Returns:
        [P] the relative change per prompt.

    Example:
        >>> key_change_loss([torch.ones(2, 2, 3)], torch.tensor([12.0, 6.0]))
        tensor([0.5000, 1.0000])
    """
    if len(deltas) == 0:
        raise ValueError("deltas is empty: key_change_loss needs at least one adapted layer")
    _check_tensor(base_energy, "base_energy", "[P]")
    if base_energy.ndim != 1:
        raise ValueError(f"base_energy must be [P] finite and > 0, got shape {tuple(base_energy.shape)}")
    P = base_energy.shape[0]
    if check_energy and not bool((torch.isfinite(base_energy) & (base_energy > 0)).all()):
        raise ValueError(f"base_energy must be [P] finite and > 0, got shape {tuple(base_energy.shape)}")
    for d in deltas:
        _check_tensor(d, "each of deltas", "[P,T,C]")
        if d.ndim < 2 or d.shape[0] != P:
            raise ValueError(f"each of deltas must be [P,...] with P = {P} rows (one per prompt), got shape "
                             f"{tuple(d.shape)}")
    num = sum(d.to(torch.promote_types(d.dtype, torch.float32)).square().flatten(1).sum(1) for d in deltas)  # (P,)
    return num / base_energy.to(num.device, num.dtype)
