"""The Reward protocol: an nn.Module mapping images I: [B,3,H,W] in [0,1] to scores [B] (higher is better).

A reward may also localise what it dislikes: `heatmap(I) -> [B,1,H,W]` (>= 0, high = bad region, as in
RichHF-18K's artifact heatmaps). Rewards without a heatmap get their masks from gradient saliency.
"""
from __future__ import annotations

import torch
from torch import nn

from ..losses import NonFiniteScoreError

__all__ = ["Reward", "check_images", "check_scores"]


def check_images(I: torch.Tensor, name: str = "images") -> None:
    """TypeError unless I is a tensor; ValueError unless it is a float [B,3,H,W] one."""
    if not isinstance(I, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B,3,H,W], got {type(I).__name__}")
    if I.ndim != 4 or I.shape[1] != 3:
        raise ValueError(f"{name} must be [B,3,H,W] in [0,1], got shape {tuple(I.shape)}")
    if not I.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor in [0,1], got {I.dtype}")


def check_scores(scores: torch.Tensor, reward_name: str) -> torch.Tensor:
    """Raise NonFiniteScoreError (a ValueError) when a reward returns NaN/inf (never let it reach the optimizer)."""
    if not torch.isfinite(scores).all():
        raise NonFiniteScoreError(f"reward {reward_name!r} returned a non-finite score: {scores.detach().flatten()[:8].tolist()}")
    return scores


class Reward(nn.Module):
    """Base class. Subclasses implement `score(I) -> [B]`; set `has_heatmap = True` and implement
    `heatmap(I) -> [B,1,H,W]` when the reward can localise the problem.

    `forward` checks the input and the output, so a NaN from a reward is a clear error.
    """

    has_heatmap: bool = False
    name: str = "reward"

    def score(self, I: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def heatmap(self, I: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"reward {self.name!r} has no heatmap: use gradient saliency")

    def forward(self, I: torch.Tensor) -> torch.Tensor:
        check_images(I)
        return check_scores(self.score(I), self.name)

    def describe(self) -> dict:
        """Plain description for LoRA metadata and reports."""
        return {"name": self.name}
