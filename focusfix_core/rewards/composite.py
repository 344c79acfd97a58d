"""Rewards built from rewards: a weighted sum, and a reward that only sees a mask region."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .base import Reward
from .image import fit_region

__all__ = ["MaskedReward", "WeightedSum"]


class WeightedSum(Reward):
    """`sum_i w_i * r_i(I)`. I: [B,3,H,W] -> [B].

    Args:
        terms: a non-empty sequence of `(reward, weight)` pairs, not all weights 0. A term of weight 0 is left
            out (never moved to a device nor run).

    Heatmap (only when every member has one and every weight is >= 0, since a negative weight
    turns a member's "bad" region into a good one): `sum_i w_i h_i / sum_i w_i`, [B,1,H,W].

    Examples:
        >>> from focusfix_core.rewards.image import BrightnessReward, SharpnessReward
        >>> r = WeightedSum([(SharpnessReward(), 1.0), (BrightnessReward(), 0.5)])
        >>> r(torch.rand(2, 3, 16, 16)).shape, r.has_heatmap
        (torch.Size([2]), True)
    """

    name = "weighted_sum"

    def __init__(self, terms: Sequence[tuple[Reward, float]]):
        super().__init__()
        if not isinstance(terms, (list, tuple)):
            raise TypeError(f"terms must be a list of (reward, weight) pairs, got {type(terms).__name__}")
        if not terms:
            raise ValueError("terms must be a non-empty list of (reward, weight) pairs, got []")
        for i, t in enumerate(terms):
            if not (isinstance(t, tuple) and len(t) == 2):
                raise TypeError(f"terms[{i}] must be a (reward, weight) pair, got {type(t).__name__}")
            if not isinstance(t[0], Reward):
                raise TypeError(f"terms[{i}][0] must be a Reward, got {type(t[0]).__name__}")
            if not isinstance(t[1], (int, float)) or isinstance(t[1], bool) or not math.isfinite(t[1]):
                raise TypeError(f"terms[{i}][1] (weight) must be a finite number, got {t[1]!r}")
        if all(w == 0 for _, w in terms):  # the sum would be 0 for every image: no gradient, an empty mask
            raise ValueError(f"terms' weights must not all be 0, got {[w for _, w in terms]}")
        kept = [(r, float(w)) for r, w in terms if w != 0]
        self.rewards = nn.ModuleList([r for r, _ in kept])
        self.weights = [w for _, w in kept]
        total = sum(self.weights)
        self.has_heatmap = all(r.has_heatmap for r in self.rewards) and min(self.weights) >= 0 and total > 0

    def score(self, I: torch.Tensor) -> torch.Tensor:
        return sum(w * r.score(I) for r, w in zip(self.rewards, self.weights))

    def heatmap(self, I: torch.Tensor) -> torch.Tensor:
        if not self.has_heatmap:
            return super().heatmap(I)
        return sum(w * r.heatmap(I) for r, w in zip(self.rewards, self.weights)) / sum(self.weights)

    def describe(self) -> dict:
        return {"name": self.name, "terms": [[r.describe(), w] for r, w in zip(self.rewards, self.weights)]}


class MaskedReward(Reward):
    """A reward that sees only the region M: `r(M * I + (1 - M) * fill)`. I: [B,3,H,W] -> [B].

    Outside M the member reward sees the constant `fill` (a grey level, or a fixed image such as
    I0), so the score and its gradient depend on the pixels inside M only.

    Args:
        reward: the member reward.
        M: mask [1|B,1,h,w] in [0,1] (1 = the region scored), resized to the image.
        fill: grey level in [0,1] (default 0.5, neutral for most rewards) or an image
            [1|B,3,H,W] (e.g. I0, detached) shown outside M.

    Heatmap (when the member has one): the member's heatmap of the filled image times M.

    Examples:
        >>> from focusfix_core.rewards.image import SharpnessReward
        >>> M = torch.zeros(1, 1, 16, 16); M[..., 4:12, 4:12] = 1
        >>> MaskedReward(SharpnessReward(), M)(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2])
    """

    name = "masked"

    def __init__(self, reward: Reward, M: torch.Tensor, fill: float | torch.Tensor = 0.5):
        super().__init__()
        if not isinstance(reward, Reward):
            raise TypeError(f"reward must be a Reward, got {type(reward).__name__}")
        if not isinstance(M, torch.Tensor) or M.ndim != 4 or M.shape[1] != 1:
            got = tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__
            raise ValueError(f"mask M must be [1|B,1,h,w] in [0,1], got {got}")
        if isinstance(fill, torch.Tensor):
            if fill.ndim != 4 or fill.shape[1] != 3:
                raise ValueError(f"fill must be a grey level or an image [1|B,3,H,W], got {tuple(fill.shape)}")
            fill_t = fill.detach().float()
        elif isinstance(fill, (int, float)) and 0.0 <= float(fill) <= 1.0:
            fill_t = torch.tensor(float(fill)).view(1, 1, 1, 1)
        else:
            raise ValueError(f"fill must be a grey level in [0,1] or an image [1|B,3,H,W], got {fill!r}")
        self.reward = reward
        self.has_heatmap = reward.has_heatmap
        self.register_buffer("M", M.detach().float())
        self.register_buffer("fill", fill_t)

    def _fill(self, I: torch.Tensor) -> torch.Tensor:
        fill = self.fill.to(I)
        if fill.shape[-1] != 1 and (fill.shape[-2:] != I.shape[-2:] or fill.shape[0] not in (1, len(I))):
            raise ValueError(f"fill image must be [1|{len(I)},3,{I.shape[-2]},{I.shape[-1]}] "
                             f"like the images, got {tuple(fill.shape)}")
        return fill

    def masked_image(self, I: torch.Tensor) -> torch.Tensor:
        """What the member reward sees. I: [B,3,H,W] -> [B,3,H,W]."""
        M = fit_region(self.M, I, "mask M")
        return M * I + (1 - M) * self._fill(I)

    def score(self, I: torch.Tensor) -> torch.Tensor:
        return self.reward.score(self.masked_image(I))

    def heatmap(self, I: torch.Tensor) -> torch.Tensor:
        if not self.has_heatmap:
            return super().heatmap(I)
        return self.reward.heatmap(self.masked_image(I)) * fit_region(self.M, I, "mask M")

    def describe(self) -> dict:
        return {"name": self.name, "reward": self.reward.describe(),
                "fill": "image" if self.fill.shape[-1] != 1 else float(self.fill)}
