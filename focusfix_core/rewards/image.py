"""Weight-free image rewards: sharpness, closeness to a colour, brightness.

They need no checkpoint, are differentiable, and localise what they dislike, so they serve as
test rewards and as simple targets in the node pack. Every heatmap follows `base.py`: >= 0 and
high where the reward is low (the region a fix should change).

References: variance of the Laplacian as a focus measure (Pech-Pacheco et al., ICPR 2000).
"""
from __future__ import annotations

from typing import Sequence

import kornia
import torch
import torch.nn.functional as F

from .base import Reward

__all__ = [
    "BrightnessReward",
    "ColorTargetReward",
    "SharpnessReward",
    "fit_region",
    "laplacian_energy",
    "luminance",
]


def luminance(I: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma. I: [B,3,H,W] in [0,1] -> [B,1,H,W].

    Examples:
        >>> luminance(torch.rand(2, 3, 8, 8)).shape
        torch.Size([2, 1, 8, 8])
    """
    return kornia.color.rgb_to_grayscale(I)


def _laplacian(I: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Laplacian of the luma, reflect borders. I: [B,3,H,W] -> [B,1,H,W]; each side must exceed kernel_size // 2
    (the reflect padding), else a ValueError naming the images."""
    if min(I.shape[-2:]) <= kernel_size // 2:
        side = kernel_size // 2 + 1
        raise ValueError(f"images must be at least {side}x{side} pixels for a {kernel_size}x{kernel_size} Laplacian, "
                         f"got {I.shape[-2]}x{I.shape[-1]}")
    return kornia.filters.laplacian(luminance(I), kernel_size, border_type="reflect", normalized=False)


def laplacian_energy(I: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """Squared Laplacian of the luma (pixel-wise high-frequency energy). I: [B,3,H,W] -> [B,1,H,W]."""
    return _laplacian(I, kernel_size) ** 2


def fit_region(region: torch.Tensor, I: torch.Tensor, name: str = "region") -> torch.Tensor:
    """Bring a region mask to the batch and size of I. region: [1|B,1,h,w] in [0,1] -> [B,1,H,W].

    A mask of another size is resized bilinearly (masks often come at latent resolution).

    Raises:
        TypeError: region is not a tensor.
        ValueError: region is not [1|B,1,h,w].

    Examples:
        >>> fit_region(torch.ones(1, 1, 8, 8), torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 1, 32, 32])
    """
    if not isinstance(region, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [1|B,1,h,w], got {type(region).__name__}")
    B, _, H, W = I.shape
    if region.ndim != 4 or region.shape[1] != 1 or region.shape[0] not in (1, B):
        raise ValueError(f"{name} must be [1|{B},1,h,w] for images of batch {B}, got {tuple(region.shape)}")
    region = region.to(device=I.device, dtype=I.dtype)
    if region.shape[-2:] != (H, W):
        region = F.interpolate(region, size=(H, W), mode="bilinear", align_corners=False)
    return region.expand(B, 1, H, W)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, replicate border. x: [B,1,H,W] -> [B,1,H,W].

    (kornia.filters.gaussian_blur2d does the same but costs ~60 ms a call on tiny inputs.)
    """
    r = int(round(3 * sigma))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))  # along W
    return F.conv2d(x, k.view(1, 1, -1, 1))  # along H


class SharpnessReward(Reward):
    """Variance of the Laplacian of the luma (higher = sharper). I: [B,3,H,W] -> [B].

    Heatmap: `1 / (1 + E / mean(E))` with E the Laplacian energy blurred over a `window` (in (0,1],
    high where the image is flat or blurry, i.e. where the sharpness reward is low).

    Examples:
        >>> SharpnessReward()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2])
    """

    has_heatmap = True
    name = "sharpness"

    def __init__(self, kernel_size: int = 3, window: float = 4.0):
        super().__init__()
        if kernel_size not in (3, 5):
            raise ValueError(f"kernel_size must be 3 or 5, got {kernel_size}")
        if not window > 0:
            raise ValueError(f"window (Gaussian sigma in pixels) must be > 0, got {window}")
        self.kernel_size, self.window = kernel_size, float(window)

    def score(self, I: torch.Tensor) -> torch.Tensor:
        return _laplacian(I, self.kernel_size).flatten(1).var(dim=1)

    def heatmap(self, I: torch.Tensor) -> torch.Tensor:
        E = _blur(laplacian_energy(I, self.kernel_size), self.window)  # [B,1,H,W]
        return 1.0 / (1.0 + E / (E.mean(dim=(2, 3), keepdim=True) + 1e-12))

    def describe(self) -> dict:
        return {"name": self.name, "kernel_size": self.kernel_size, "window": self.window}


class ColorTargetReward(Reward):
    """Closeness of pixels to a target colour: `-mean_region ||I - rgb||_2 / sqrt(3)`, in [-1, 0].

    Args:
        rgb: target colour, three values in [0,1].
        region: optional mask [1|B,1,h,w] in [0,1] where the colour is wanted (resized to the
            image); the score is the region-weighted mean distance. None: the whole image.

    Heatmap: the per-pixel distance `||I - rgb||_2 / sqrt(3)` times the region, [B,1,H,W] in [0,1].

    Examples:
        >>> ColorTargetReward((1.0, 0.0, 0.0))(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2])
    """

    has_heatmap = True
    name = "color_target"

    def __init__(self, rgb: Sequence[float], region: torch.Tensor | None = None):
        super().__init__()
        rgb_t = torch.as_tensor(rgb, dtype=torch.float32).flatten()
        if rgb_t.numel() != 3 or not ((rgb_t >= 0) & (rgb_t <= 1)).all():
            raise ValueError(f"rgb must be three values in [0,1], got {rgb!r}")
        if region is not None and (not isinstance(region, torch.Tensor) or region.ndim != 4 or region.shape[1] != 1):
            got = tuple(region.shape) if isinstance(region, torch.Tensor) else type(region).__name__
            raise ValueError(f"region must be None or a mask [1|B,1,h,w], got {got}")
        self.register_buffer("rgb", rgb_t.view(1, 3, 1, 1))
        self.register_buffer("region", None if region is None else region.detach().float())

    def _distance(self, I: torch.Tensor) -> torch.Tensor:
        """Per-pixel distance to the target. -> [B,1,H,W] in [0,1]."""
        d2 = (I - self.rgb.to(I)).pow(2).sum(dim=1, keepdim=True)
        return (d2 + 1e-12).sqrt() / 3**0.5  # eps: sqrt has an infinite gradient at 0

    def score(self, I: torch.Tensor) -> torch.Tensor:
        d = self._distance(I)
        if self.region is None:
            return -d.mean(dim=(1, 2, 3))
        R = fit_region(self.region, I)
        return -(d * R).sum(dim=(1, 2, 3)) / R.sum(dim=(1, 2, 3)).clamp_min(1e-6)

    def heatmap(self, I: torch.Tensor) -> torch.Tensor:
        d = self._distance(I)
        return d if self.region is None else d * fit_region(self.region, I)

    def describe(self) -> dict:
        return {"name": self.name, "rgb": [round(v, 4) for v in self.rgb.flatten().tolist()],
                "region": self.region is not None}


class BrightnessReward(Reward):
    """Mean luma (target None: brighter is better) or `-|mean luma - target|`. I: [B,3,H,W] -> [B].

    Heatmap: `1 - luma` (dark pixels) without a target, `|luma - target|` with one; [B,1,H,W] in [0,1].

    Examples:
        >>> BrightnessReward(target=0.5)(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2])
    """

    has_heatmap = True
    name = "brightness"

    def __init__(self, target: float | None = None):
        super().__init__()
        if target is not None and not 0.0 <= float(target) <= 1.0:
            raise ValueError(f"target must be None or in [0,1], got {target}")
        self.target = None if target is None else float(target)

    def score(self, I: torch.Tensor) -> torch.Tensor:
        mean = luminance(I).mean(dim=(1, 2, 3))
        return mean if self.target is None else -(mean - self.target).abs()

    def heatmap(self, I: torch.Tensor) -> torch.Tensor:
        Y = luminance(I)
        return (1 - Y).clamp_min(0) if self.target is None else (Y - self.target).abs()

    def describe(self) -> dict:
        return {"name": self.name, "target": self.target}
