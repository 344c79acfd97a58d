"""A differentiable safety reward from the Stable Diffusion safety checker (higher = safer).

Reference: `CompVis/stable-diffusion-safety-checker` as run by diffusers' `safety_checker.py`. The
checker embeds the image with CLIP ViT-L/14 (`vision_model.vision_model.*`, `visual_projection.weight`),
takes cosine similarities to 17 concept embeddings (`concept_embeds` [17,768]) and 3 special-care
embeddings (`special_care_embeds` [3,768]), and subtracts per-embedding thresholds
(`concept_embeds_weights` [17], `special_care_embeds_weights` [3]). An image is flagged when some
`cos - threshold + adjustment > 0`; the adjustment grows by 0.01 once a special-care concept fires.

We replace the hard max and the hard "fires" test by smooth ones (temperature `tau`):

    s_special = cos(e, special) - t_special + adjustment                    [B,3]
    gate      = sigmoid(tau-logsumexp(s_special) / tau)                     [B]  (~1 when one fires)
    s_concept = cos(e, concept) - t_concept + adjustment + 0.01 * gate      [B,17]
    score     = -tau * logsumexp(s_concept / tau)                           [B]

Since `tau * logsumexp(x / tau) >= max(x)`, `score > 0` means every concept score is below zero, i.e.
the checker passes the image (up to the soft gate). No heatmap: masks come from gradient saliency.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from .base import Reward
from .clip_vision import CLIPVisionTower

__all__ = ["SAFETY_KEYS", "SafetyReward", "is_safety_checker", "safety_score"]

SAFETY_KEYS = ("concept_embeds", "special_care_embeds", "concept_embeds_weights", "special_care_embeds_weights")
_SPECIAL_BOOST = 0.01  # the checker's extra adjustment once a special-care concept fires


def is_safety_checker(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when `sd` holds the safety checker's concept embeddings and thresholds."""
    return all(k in sd for k in SAFETY_KEYS)


def safety_score(e: torch.Tensor, concept: torch.Tensor, t_concept: torch.Tensor, special: torch.Tensor,
                 t_special: torch.Tensor, *, tau: float = 0.01, adjustment: float = 0.0) -> torch.Tensor:
    """Smooth SD-safety-checker margin (higher = safer; > 0 ~ passes). See the module docstring.

    Args:
        e: image embeddings [B,D] (any scale; cosine similarity is used).
        concept, t_concept: concept embeddings [C,D] and thresholds [C].
        special, t_special: special-care embeddings [S,D] and thresholds [S].
        tau: temperature of the smooth max (> 0); smaller = closer to the hard checker.
        adjustment: the checker's global adjustment (diffusers: 0.0; larger = stricter).

    Returns:
        [B]

    Examples:
        >>> safety_score(torch.randn(2, 8), torch.randn(5, 8), torch.zeros(5), torch.randn(3, 8), torch.zeros(3)).shape
        torch.Size([2])
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if e.ndim != 2 or concept.ndim != 2 or special.ndim != 2 or not e.shape[1] == concept.shape[1] == special.shape[1]:
        raise ValueError(f"e [B,D], concept [C,D], special [S,D] must share D, got {tuple(e.shape)}, "
                         f"{tuple(concept.shape)}, {tuple(special.shape)}")
    if t_concept.shape != concept.shape[:1] or t_special.shape != special.shape[:1]:
        raise ValueError(f"thresholds must be [C] and [S], got t_concept {tuple(t_concept.shape)} "
                         f"for C={len(concept)}, "
                         f"t_special {tuple(t_special.shape)} for S={len(special)}")
    e = F.normalize(e, dim=-1)
    s_special = e @ F.normalize(special, dim=-1).T - t_special + adjustment  # (B, S)
    gate = torch.sigmoid(torch.logsumexp(s_special / tau, dim=1))  # (B,) = sigmoid(smooth max / tau)
    s_concept = e @ F.normalize(concept, dim=-1).T - t_concept + adjustment + _SPECIAL_BOOST * gate[:, None]  # (B, C)
    return -tau * torch.logsumexp(s_concept / tau, dim=1)


def _check_tensor(name: str, t, shape: tuple[int, ...], want: str) -> None:
    """TypeError unless `t` is a tensor; ValueError (saying `want`) unless it has `shape` (-1: any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != len(shape) or any(s not in (-1, g) for s, g in zip(shape, t.shape)):
        raise ValueError(f"{name} must be {want}, got {tuple(t.shape)}")


class SafetyReward(Reward):
    """Smooth SD-safety-checker margin of images I: [B,3,H,W] in [0,1] -> [B] (higher = safer).

    Args:
        tower: the checker's CLIP ViT-L/14 tower (with its 768-d visual projection).
        concept_embeds [C,D], concept_thresholds [C], special_embeds [S,D], special_thresholds [S]:
            the checker's `concept_embeds`, `concept_embeds_weights`, `special_care_embeds`,
            `special_care_embeds_weights`.
        tau: smooth-max temperature; adjustment: the checker's adjustment (see `safety_score`).

    Examples:
        >>> from focusfix_core.rewards.clip_vision import CLIPVisionConfig
        >>> cfg = CLIPVisionConfig(width=64, layers=1, heads=1, patch=8, image_size=32, proj_dim=16, mlp_width=128)
        >>> C, S = torch.randn(17, 16), torch.randn(3, 16)
        >>> r = SafetyReward(CLIPVisionTower(cfg), C, torch.zeros(17), S, torch.zeros(3))
        >>> r(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2])
    """

    name = "safety"

    def __init__(self, tower: CLIPVisionTower, concept_embeds: torch.Tensor, concept_thresholds: torch.Tensor,
                 special_embeds: torch.Tensor, special_thresholds: torch.Tensor, *, tau: float = 0.01,
                 adjustment: float = 0.0):
        super().__init__()
        if not isinstance(tower, CLIPVisionTower):
            raise TypeError(f"tower must be a CLIPVisionTower, got {type(tower).__name__}")
        D = tower.cfg.embed_dim
        _check_tensor("concept_embeds", concept_embeds, (-1, D), f"[N,{D}] (D = the tower's embedding size)")
        _check_tensor("special_embeds", special_embeds, (-1, D), f"[N,{D}] (D = the tower's embedding size)")
        # the embeddings are [N,D] now: their lengths are the thresholds'
        _check_tensor("concept_thresholds", concept_thresholds, (len(concept_embeds),), f"[{len(concept_embeds)}]")
        _check_tensor("special_thresholds", special_thresholds, (len(special_embeds),), f"[{len(special_embeds)}]")
        if len(concept_embeds) == 0:  # the smooth max over no concept is -inf: every score would be +inf
            raise ValueError(f"concept_embeds must hold at least one concept, got {tuple(concept_embeds.shape)}: "
                             f"the safety checker file is damaged")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tower = tower.eval().requires_grad_(False)
        self.tau, self.adjustment = float(tau), float(adjustment)
        self.register_buffer("concept_embeds", concept_embeds.detach().float())
        self.register_buffer("concept_thresholds", concept_thresholds.detach().float())
        self.register_buffer("special_embeds", special_embeds.detach().float())
        self.register_buffer("special_thresholds", special_thresholds.detach().float())

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], **kwargs) -> "SafetyReward":
        """Build from the checker's state dict (`vision_model.vision_model.*`, `visual_projection.weight`,
        the four `SAFETY_KEYS`); `kwargs` go to `__init__` (tau, adjustment) and `heads`/`activation`/`dtype`
        to `CLIPVisionTower.from_state_dict` (the concept embeddings and thresholds stay fp32).

        Raises:
            ValueError: missing concept keys or a malformed tower.
        """
        missing = [k for k in SAFETY_KEYS if k not in sd]
        if missing:
            raise ValueError(f"safety checker state dict must have {list(SAFETY_KEYS)} and a CLIP tower "
                             f"('vision_model.vision_model.*', 'visual_projection.weight'); missing {missing}")
        tower_kw = {k: kwargs.pop(k) for k in ("heads", "activation", "dtype") if k in kwargs}
        tower = CLIPVisionTower.from_state_dict({k: v for k, v in sd.items() if k not in SAFETY_KEYS}, **tower_kw)
        return cls(tower, sd["concept_embeds"], sd["concept_embeds_weights"], sd["special_care_embeds"],
                   sd["special_care_embeds_weights"], **kwargs)

    def score_embeds(self, e: torch.Tensor) -> torch.Tensor:
        """The reward for image embeddings e: [B,D] -> [B]."""
        return safety_score(e.to(self.concept_embeds.dtype), self.concept_embeds, self.concept_thresholds,
                            self.special_embeds, self.special_thresholds, tau=self.tau, adjustment=self.adjustment)

    def score(self, I: torch.Tensor) -> torch.Tensor:
        return self.score_embeds(self.tower.image_embeds(I)).to(I.dtype)

    def describe(self) -> dict:
        return {"name": self.name, "tau": self.tau, "adjustment": self.adjustment,
                "concepts": len(self.concept_embeds), "special": len(self.special_embeds)}
