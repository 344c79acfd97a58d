"""Pictures for people: grids, mask and heatmap overlays, loss curves, PNG files. Images are [.., 3, H, W] in [0,1]."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw

from .io import atomic_write_bytes

__all__ = ["CHANGE_SCALE", "image_grid", "mask_overlay", "heat_overlay", "plot_curves", "to_pil", "save_png",
           "upscale", "weighted_mean"]

_CURVE_COLORS = [(230, 80, 60), (60, 140, 230), (70, 170, 90), (200, 150, 40), (150, 90, 200), (90, 90, 90)]


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """images: [N,3,H,W] -> [3, rows*(H+pad)+pad, nrow*(W+pad)+pad], row-major."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N,3,H,W], got {tuple(images.shape)}")
    N = images.shape[0]
    if N == 0:
        raise ValueError("images is empty: a grid needs at least one image")
    nrow = nrow or math.ceil(math.sqrt(N))
    rows = math.ceil(N / nrow)
    filler = images.new_full((rows * nrow - N, *images.shape[1:]), pad_value)
    x = F.pad(torch.cat([images, filler]), (pad, 0, pad, 0), value=pad_value)     # pad top/left of each tile
    x = rearrange(x, "(r c) ch h w -> ch (r h) (c w)", r=rows, c=nrow)
    return F.pad(x, (0, pad, 0, pad), value=pad_value)


def upscale(images: torch.Tensor, min_size: int = 128) -> torch.Tensor:
    """Nearest-neighbour upscale small images ([N,C,H,W]) by an integer factor so they are visible."""
    f = max(1, math.ceil(min_size / max(images.shape[-2:])))
    return images if f == 1 else images.repeat_interleave(f, -2).repeat_interleave(f, -1)


def mask_overlay(I: torch.Tensor, M: torch.Tensor, color=(1.0, 0.2, 0.2), alpha: float = 0.45) -> torch.Tensor:
    """Tint the masked region. I: [B,3,H,W]; M: [B,H,W] or [B,1,H,W] in [0,1] -> [B,3,H,W]."""
    M = M[:, None] if M.ndim == 3 else M
    c = torch.tensor(color, dtype=I.dtype, device=I.device)[None, :, None, None]
    return (I * (1 - alpha * M) + c * alpha * M).clamp(0, 1)


# |I - I0| (mean over RGB, in [0, 1]) is drawn on [0, CHANGE_SCALE]: red = a change of a quarter of the range
# or more, blue = none; one fixed scale, so a rounding-level change looks as small as it is
CHANGE_SCALE = 0.25


def heat_overlay(I: torch.Tensor, H: torch.Tensor, alpha: float = 0.5, vmax: float | None = None) -> torch.Tensor:
    """Blend a heatmap (blue -> red) over I. H: [B,H,W] or [B,1,H,W] -> [B,3,H,W]; a NaN or inf value of H draws
    as 0. Each image's map is scaled to its own range; with `vmax`, every map to the fixed range [0, vmax] (values
    above it draw red), so maps of different sizes compare."""
    H = H[:, None] if H.ndim == 3 else H
    # NaN/inf (the map of a run that diverged, drawn in its failure report) as 0, not NaN pixels; float64: a
    # finite map's range (hi - lo) can overflow float32
    H = torch.nan_to_num(H.double(), nan=0.0, posinf=0.0, neginf=0.0)
    if H.shape[-2:] != I.shape[-2:]:
        H = F.interpolate(H, size=I.shape[-2:], mode="bilinear", align_corners=False)
    if vmax is not None:
        h = (H / vmax).clamp(0, 1)
    else:
        lo = H.amin(dim=(1, 2, 3), keepdim=True)
        hi = H.amax(dim=(1, 2, 3), keepdim=True)
        h = (H - lo) / (hi - lo).clamp_min(1e-8)
    heat = torch.cat([h, 1 - (2 * h - 1).abs(), 1 - h], dim=1)  # red high, green mid, blue low
    return (I * (1 - alpha) + heat.to(I) * alpha).clamp(0, 1)


def plot_curves(series: Mapping[str, Sequence[float | None]], width: int = 512, height: int = 256) -> torch.Tensor:
    """A small multi-line plot, each series min-max scaled to its own panel row. -> [3,height,width] in [0,1]."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    items = [(k, [v for v in vals if v is not None and math.isfinite(v)]) for k, vals in series.items()]
    items = [(k, v) for k, v in items if v]
    if not items:
        draw.text((8, 8), "no data", fill=(0, 0, 0))
    band = height / max(len(items), 1)
    for j, (name, vals) in enumerate(items):
        top, bottom = j * band + 14, (j + 1) * band - 4
        lo, hi = min(vals), max(vals)
        span = hi - lo or 1.0
        color = _CURVE_COLORS[j % len(_CURVE_COLORS)]
        pts = [(8 + (width - 16) * i / max(len(vals) - 1, 1), bottom - (bottom - top) * (v - lo) / span)
               for i, v in enumerate(vals)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        else:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        draw.text((8, j * band + 1), f"{name}: {vals[0]:.4g} -> {vals[-1]:.4g}", fill=color)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def to_pil(img: torch.Tensor) -> Image.Image:
    """[3,H,W] or [H,W] in [0,1] -> PIL image."""
    if img.ndim == 2:
        img = img[None].expand(3, -1, -1)
    arr = (img.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def save_png(img: torch.Tensor, path, overwrite: bool = True) -> Path:
    """Atomically write [3,H,W] (or [H,W]) in [0,1] as a PNG (not `overwrite`: FileExistsError if `path` exists)."""
    buf = io.BytesIO()
    to_pil(img).save(buf, format="PNG")
    return atomic_write_bytes(buf.getvalue(), path, overwrite)


def weighted_mean(D: torch.Tensor, W: torch.Tensor) -> float:
    """Mean of D weighted by W (both [B,1,H,W]): the change inside a mask M (W = M) or outside it (W = 1 - M), a
    soft M weighed as the region term weighs it. NaN for a region of no weight (an empty or a full mask), where
    the mean is undefined (0 would claim "unchanged")."""
    total = W.float().sum()
    return float((D * W).sum() / total) if total > 0 else float("nan")
