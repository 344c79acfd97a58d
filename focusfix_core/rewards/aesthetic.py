"""LAION improved aesthetic predictor: an MLP on L2-normalised CLIP ViT-L/14 image embeddings.

Reference: C. Schuhmann, "CLIP+MLP Aesthetic Score Predictor" (github.com/christophschuhmann/
improved-aesthetic-predictor). Its state dicts are an `nn.Sequential` named `layers`, in two variants:
- `linear` (`sac+logos+ava1-l14-linearMSE.pth`, `ava+logos-l14-linearMSE.pth`): Linear(768,1024), Dropout,
  Linear(1024,128), Dropout, Linear(128,64), Dropout, Linear(64,16), Linear(16,1) -> keys
  `layers.{0,2,4,6,7}.{weight,bias}`; no activations;
- `relu` (`ava+logos-l14-reluMSE.pth`): a ReLU after each of the first four Linears, which shifts them to
  `layers.{0,3,6,9,11}` (Linear, ReLU, Dropout, ..., Linear(64,16), ReLU, Linear(16,1)).
Both score L2-normalised OpenAI CLIP ViT-L/14 (224 px) image embeddings. The dropouts are identities here,
so scores are deterministic.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward
from .clip_vision import CLIPVisionTower

__all__ = ["AESTHETIC_HEAD_KEYS", "HEAD_VARIANTS", "LAION_HEAD_WIDTHS", "AestheticHead", "AestheticReward",
           "head_variant", "is_aesthetic_head"]

# indices of the Linear layers in the original nn.Sequential, per variant (ReLUs shift them in "relu")
HEAD_VARIANTS = {"linear": (0, 2, 4, 6, 7), "relu": (0, 3, 6, 9, 11)}
AESTHETIC_HEAD_KEYS = tuple(f"layers.{i}.{p}" for i in HEAD_VARIANTS["linear"] for p in ("weight", "bias"))
LAION_HEAD_WIDTHS = (768, 1024, 128, 64, 16)  # every released head; they score CLIP ViT-L/14 embeddings


def _head_keys(variant: str) -> tuple[str, ...]:
    return tuple(f"layers.{i}.{p}" for i in HEAD_VARIANTS[variant] for p in ("weight", "bias"))


def head_variant(sd: Mapping[str, torch.Tensor]) -> str | None:
    """"linear" or "relu" when `sd` holds that head's keys (it may hold a CLIP tower too), else None."""
    return next((v for v in HEAD_VARIANTS if all(k in sd for k in _head_keys(v))), None)


def is_aesthetic_head(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when `sd` holds an aesthetic head's keys, either variant (it may hold a CLIP tower too)."""
    return head_variant(sd) is not None


def _mlp(widths: tuple[int, ...], relu: bool) -> list[nn.Module]:
    """The original nn.Sequential's modules, Identity where it has Dropout (same key indices, deterministic)."""
    d, h1, h2, h3, h4 = widths
    act = nn.ReLU if relu else None
    mods: list[nn.Module] = []
    for n, o, dropout in ((d, h1, True), (h1, h2, True), (h2, h3, True), (h3, h4, False)):
        mods += [nn.Linear(n, o)] + ([act()] if act else []) + ([nn.Identity()] if dropout else [])
    return mods + [nn.Linear(h4, 1)]


class AestheticHead(nn.Module):
    """The predictor's MLP: embeddings [B,D] -> scores [B,1]. Widths come from `widths`
    (default the released 768 -> 1024 -> 128 -> 64 -> 16 -> 1); `variant` "linear" or "relu" (HEAD_VARIANTS).

    Examples:
        >>> AestheticHead((16, 8, 8, 4, 4)).eval()(torch.rand(2, 16)).shape
        torch.Size([2, 1])
        >>> AestheticHead((16, 8, 8, 4, 4), variant="relu").layers[9]
        Linear(in_features=4, out_features=4, bias=True)
    """

    def __init__(self, widths: tuple[int, int, int, int, int] = LAION_HEAD_WIDTHS, variant: str = "linear"):
        super().__init__()
        if len(widths) != 5 or not all(isinstance(w, int) and w > 0 for w in widths):
            raise ValueError(f"widths must be 5 positive ints (input, hidden x4), got {widths!r}")
        if variant not in HEAD_VARIANTS:
            raise ValueError(f"variant must be one of {list(HEAD_VARIANTS)}, got {variant!r}")
        self.widths, self.variant = tuple(widths), variant
        self.layers = nn.Sequential(*_mlp(self.widths, variant == "relu"))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.layers(e)

    @property
    def in_dim(self) -> int:
        return self.widths[0]

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor],
                        dtype: torch.dtype | None = torch.float32) -> "AestheticHead":
        """Build the head from its keys, `layers.{0,2,4,6,7}.{weight,bias}` (linear) or
        `layers.{0,3,6,9,11}.{weight,bias}` (relu); other keys are ignored.

        Raises:
            ValueError: missing keys, or shapes that do not chain into a D -> ... -> 1 MLP.
        """
        variant = head_variant(sd)
        if variant is None:
            raise ValueError(f"aesthetic head must have keys {list(AESTHETIC_HEAD_KEYS)} (LAION improved-aesthetic-"
                             f"predictor, linearMSE) or {list(_head_keys('relu'))} (reluMSE); missing "
                             f"{[k for k in AESTHETIC_HEAD_KEYS if k not in sd][:5]}")
        linears, keys = HEAD_VARIANTS[variant], _head_keys(variant)
        W = [sd[f"layers.{i}.weight"] for i in linears]
        if any(w.ndim != 2 for w in W):
            raise ValueError(f"aesthetic head weights must be 2-D, got {[tuple(w.shape) for w in W]}")
        widths = (W[0].shape[1],) + tuple(w.shape[0] for w in W[:4])
        head_shapes = {f"layers.{i}.weight": (o, n) for i, n, o in zip(linears, widths, widths[1:] + (1,))}
        head_shapes.update({f"layers.{i}.bias": (o,) for i, o in zip(linears, widths[1:] + (1,))})
        for k, shape in head_shapes.items():
            if tuple(sd[k].shape) != shape:
                raise ValueError(f"aesthetic head weight {k!r} must have shape {shape} to chain "
                                 f"{' -> '.join(map(str, widths + (1,)))}, got {tuple(sd[k].shape)}")
        with torch.device("meta"):
            head = cls(widths, variant)
        head.load_state_dict({k: sd[k].to(dtype) if dtype else sd[k] for k in keys}, strict=True, assign=True)
        return head.eval()


class AestheticReward(Reward):
    """LAION aesthetic score (about 1..10) of images I: [B,3,H,W] in [0,1] -> [B].

    `head(normalize(tower.image_embeds(I)))`; both modules are frozen, gradients flow to I. No
    heatmap: masks come from gradient saliency.

    Examples:
        >>> from focusfix_core.rewards.clip_vision import CLIPVisionConfig
        >>> cfg = CLIPVisionConfig(width=64, layers=1, heads=1, patch=8, image_size=32, proj_dim=16, mlp_width=128)
        >>> AestheticReward(CLIPVisionTower(cfg), AestheticHead((16, 8, 8, 4, 4)))(torch.rand(2, 3, 40, 40)).shape
        torch.Size([2])
    """

    name = "aesthetic"

    def __init__(self, tower: CLIPVisionTower, head: AestheticHead):
        super().__init__()
        if not isinstance(tower, CLIPVisionTower):
            raise TypeError(f"tower must be a CLIPVisionTower, got {type(tower).__name__}")
        if not isinstance(head, AestheticHead):
            raise TypeError(f"head must be an AestheticHead, got {type(head).__name__}")
        if head.in_dim != tower.cfg.embed_dim:
            raise ValueError(f"aesthetic head takes {head.in_dim}-d embeddings but the CLIP tower gives "
                             f"{tower.cfg.embed_dim}-d ones (the released head needs CLIP ViT-L/14, 768-d)")
        self.tower, self.head = tower.eval().requires_grad_(False), head.eval().requires_grad_(False)

    def score(self, I: torch.Tensor) -> torch.Tensor:
        e = F.normalize(self.tower.image_embeds(I), dim=-1)  # (B, D), unit length as in training
        return self.head(e.to(self.head.layers[0].weight.dtype))[:, 0].to(I.dtype)

    def describe(self) -> dict:
        relu = {"head_variant": "relu"} if self.head.variant == "relu" else {}  # linear: as before the variants
        return {"name": self.name, "head": list(self.head.widths), **relu, "tower": self.tower.extra_repr()}
