"""Reward files: detect what a checkpoint holds and build the matching Reward, never running pickles.

Formats (metadata `focusfix_reward` names the family; without it the key layout decides):

| family        | keys                                                                               |
|---------------|------------------------------------------------------------------------------------|
| aesthetic     | `layers.{0,2,4,6,7}.{weight,bias}` (LAION head), optionally plus a CLIP tower       |
|               | (HF `vision_model.*` + `visual_projection.weight`, or OpenAI `visual.*`)             |
| safety        | SD safety checker: `vision_model.vision_model.*`, `visual_projection.weight`,       |
|               | `concept_embeds`, `special_care_embeds`, `*_embeds_weights`                          |
| tiny_*        | metadata only; built by `focusfix_core.tiny.rewards.load_tiny_reward`              |

Optional metadata `focusfix_clip_heads` / `focusfix_clip_activation` override the CLIP tower's
inferred heads / activation (checkpoints do not store them).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..io import atomic_save_safetensors, load_tensor_file_with_metadata
from .aesthetic import AestheticHead, AestheticReward, is_aesthetic_head
from .base import Reward
from .clip_vision import CLIPVisionTower
from .image import BrightnessReward, ColorTargetReward, SharpnessReward
from .safety import SafetyReward, is_safety_checker

__all__ = ["BUILTIN_REWARDS", "METADATA_KEY", "REWARD_FAMILIES", "TOWER_DTYPES", "build_reward", "convert_reward",
           "detect_reward_family", "load_reward"]

METADATA_KEY = "focusfix_reward"
# the precisions a CLIP reward tower may be loaded in (node input `precision`). No fp16: the reward's gradients
# w.r.t. the image are tiny (full ViT-L/14, random weights, 512²: 2e-7 per pixel on average) and underflow in an
# fp16 backward (saliency cosine 0.89 to fp32's, against 0.99992 in bf16)
TOWER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REWARD_FAMILIES = ("aesthetic", "safety", "tiny_*")
_FORMATS = ("aesthetic: LAION improved-aesthetic-predictor head 'layers.{0,2,4,6,7}.{weight,bias}' "
            "(+ optional CLIP ViT-L/14 tower); safety: SD safety checker 'vision_model.vision_model.*', "
            "'visual_projection.weight', 'concept_embeds', 'special_care_embeds', '*_embeds_weights'; "
            f"tiny_*: files with metadata {METADATA_KEY!r}='tiny_...'")


def _named(reward: Reward, name: str) -> Reward:
    reward.name = name
    return reward


BUILTIN_REWARDS: dict[str, Callable[[], Reward]] = {
    "sharpness": SharpnessReward,
    "brightness": BrightnessReward,
    "color_red": lambda: _named(ColorTargetReward((1.0, 0.0, 0.0)), "color_red"),
    "color_green": lambda: _named(ColorTargetReward((0.0, 1.0, 0.0)), "color_green"),
    "color_blue": lambda: _named(ColorTargetReward((0.0, 0.0, 1.0)), "color_blue"),
    "color_white": lambda: _named(ColorTargetReward((1.0, 1.0, 1.0)), "color_white"),
}


def detect_reward_family(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """The reward family of a state dict: metadata `focusfix_reward` if present, else by key layout.

    Raises:
        ValueError: an unknown family in the metadata, or an unknown key layout (lists the known
            formats and the first keys seen).

    Examples:
        >>> detect_reward_family({f"layers.{i}.{p}": torch.zeros(1) for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")})
        'aesthetic'
        >>> BUILTIN_REWARDS["color_red"]()(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2])
    """
    family = (metadata or {}).get(METADATA_KEY)
    if family is not None:
        if family in ("aesthetic", "safety") or family.startswith("tiny_"):
            return family
        raise ValueError(f"metadata {METADATA_KEY!r} must be one of {REWARD_FAMILIES}, got {family!r}")
    if is_safety_checker(sd):
        return "safety"
    if is_aesthetic_head(sd):
        return "aesthetic"
    raise ValueError(f"unknown reward file layout; known formats: {_FORMATS}. First keys: {list(sd)[:8]}")


def _tower_kwargs(metadata: Mapping[str, str]) -> dict:
    kw = {}
    if "focusfix_clip_heads" in metadata:
        try:
            kw["heads"] = int(metadata["focusfix_clip_heads"])
        except ValueError:
            raise ValueError("metadata 'focusfix_clip_heads' must be an int, "
                             f"got {metadata['focusfix_clip_heads']!r}") from None
    if "focusfix_clip_activation" in metadata:
        kw["activation"] = metadata["focusfix_clip_activation"]
    return kw


def _as_tower(clip_vision_tower, dtype: torch.dtype) -> CLIPVisionTower:
    if isinstance(clip_vision_tower, CLIPVisionTower):  # a copy in another dtype: the caller's tower is left as it is
        tower = clip_vision_tower
        same = tower.vision_model.embeddings.class_embedding.dtype == dtype
        if same:
            return tower
        return CLIPVisionTower.from_state_dict(tower.state_dict(), dtype=dtype, heads=tower.cfg.heads,
                                               activation=tower.cfg.activation)
    if isinstance(clip_vision_tower, Mapping):
        return CLIPVisionTower.from_state_dict(clip_vision_tower, dtype=dtype)
    raise TypeError("clip_vision_tower must be None, a CLIPVisionTower or a CLIP vision state dict, "
                    f"got {type(clip_vision_tower).__name__}")


def build_reward(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 clip_vision_tower: CLIPVisionTower | Mapping[str, torch.Tensor] | None = None, *,
                 tower_dtype: torch.dtype = torch.float32) -> Reward:
    """Build the Reward a state dict describes (see the module docstring for the formats).

    Args:
        sd: name -> tensor, as read from a reward file.
        metadata: the file's metadata (`{}` for pickle formats).
        clip_vision_tower: CLIP ViT-L/14 for an aesthetic head stored alone: a CLIPVisionTower or a
            CLIP vision state dict (e.g. ComfyUI's CLIP_VISION `get_sd()`). A tower in the file wins.
        tower_dtype: the CLIP tower's weights, float32 or bfloat16 (`TOWER_DTYPES`). The tower holds nearly
            all of a CLIP reward's weights (ViT-L/14: 1.14 GiB in fp32); bf16 halves that, while the small
            heads, concept embeddings and thresholds stay fp32. Tiny-world rewards ignore it.

    Raises:
        ValueError: unknown layout, wrong shapes, an aesthetic head with no tower, or a tower_dtype that
            is not a floating dtype.
        TypeError: clip_vision_tower of the wrong type.
    """
    if tower_dtype not in TOWER_DTYPES.values():
        raise ValueError(f"tower_dtype must be one of {list(TOWER_DTYPES.values())}, got {tower_dtype!r}")
    metadata = dict(metadata or {})
    family = detect_reward_family(sd, metadata)
    if family.startswith("tiny_"):
        try:
            from ..tiny.rewards import load_tiny_reward  # lazy: the tiny world is optional
        except ImportError as e:
            raise ValueError(f"reward family {family!r} needs focusfix_core.tiny.rewards, "
                             f"which failed to import: {e}") from e
        return load_tiny_reward(dict(sd), metadata)
    tower_kw = {**_tower_kwargs(metadata), "dtype": tower_dtype}
    if family == "safety":
        return SafetyReward.from_state_dict(sd, **tower_kw)
    head = AestheticHead.from_state_dict(sd)
    rest = {k: v for k, v in sd.items() if not k.startswith("layers.")}
    if rest:
        tower = CLIPVisionTower.from_state_dict(rest, **tower_kw)
    elif clip_vision_tower is not None:
        tower = _as_tower(clip_vision_tower, tower_dtype)
    else:
        raise ValueError("the aesthetic head needs a CLIP ViT-L/14 image tower: connect a CLIP_VISION "
                         "(clip_vision_tower=) or use a file holding the head and the tower together")
    return AestheticReward(tower, head)


def load_reward(path: str | os.PathLike,
                clip_vision_tower: CLIPVisionTower | Mapping[str, torch.Tensor] | None = None, *,
                tower_dtype: torch.dtype = torch.float32) -> Reward:
    """Load a reward file: `.safetensors`, or `.pt/.pth/.bin/.ckpt` via `torch.load(weights_only=True)`.

    Returns:
        A frozen Reward in eval mode. See `build_reward` for `clip_vision_tower` and `tower_dtype`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: corrupt/truncated file, pickled objects (never executed), unknown layout, bad shapes.
    """
    sd, metadata = load_tensor_file_with_metadata(path)
    try:
        reward = build_reward(sd, metadata, clip_vision_tower, tower_dtype=tower_dtype)
    except ValueError as e:
        raise ValueError(f"{str(path)!r}: {e}") from e
    return reward.eval().requires_grad_(False)


def convert_reward(in_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write a `.safetensors` copy of a reward file with its family in metadata `focusfix_reward`.

    Pickles are read with `weights_only=True` (never executed). The layout is validated by
    building the reward on the meta device (no memory, no compute) before anything is written.

    Returns:
        The path written.

    Raises:
        ValueError: as `load_reward`, before anything is written.
    """
    sd, metadata = load_tensor_file_with_metadata(in_path)
    family = detect_reward_family(sd, metadata)
    if not family.startswith("tiny_"):
        meta_sd = {k: v.to("meta") for k, v in sd.items()}
        try:
            if family == "aesthetic" and all(k.startswith("layers.") for k in sd):
                AestheticHead.from_state_dict(meta_sd)  # a lone head: no tower to check
            else:
                build_reward(meta_sd, metadata)
        except ValueError as e:
            raise ValueError(f"{str(in_path)!r}: {e}") from e
    seen, out = set(), {}
    for k, v in sd.items():  # safetensors refuses tensors that share storage: copy those
        ptr = (v.untyped_storage().data_ptr(), v.device) if v.numel() else None
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    meta = {**{str(k): str(v) for k, v in metadata.items()}, METADATA_KEY: family}
    return atomic_save_safetensors(out, out_path, metadata=meta)
