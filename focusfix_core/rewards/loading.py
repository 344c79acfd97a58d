"""Reward files: detect what a checkpoint holds and build the matching Reward, never running pickles.

Formats (metadata `focusfix_reward` names the family; without it the key layout decides):

| family        | keys                                                                               |
|---------------|------------------------------------------------------------------------------------|
| aesthetic     | `layers.{0,2,4,6,7}.{weight,bias}` (LAION linearMSE head) or `layers.{0,3,6,9,11}.*` |
|               | (reluMSE), optionally plus a CLIP ViT-L/14 tower (HF `vision_model.*` +               |
|               | `visual_projection.weight`, or OpenAI `visual.*`)                                    |
| safety        | SD safety checker: `vision_model.vision_model.*`, `visual_projection.weight`,       |
|               | `concept_embeds`, `special_care_embeds`, `*_embeds_weights`                          |
| tiny_*        | metadata only; built by `focusfix_core.tiny.rewards.load_tiny_reward`              |

Optional metadata `focusfix_clip_heads` / `focusfix_clip_activation` override the CLIP tower's
inferred heads / activation (checkpoints do not store them).

Files an artist may try that are no reward FocusFix reads (ImageReward, PickScore, HPSv2, a CLIP model or
image tower) are refused with what they are and what to do instead.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Mapping, Union

import torch

from ..io import atomic_save_safetensors, check_float_finite, load_tensor_file_with_metadata
from .aesthetic import HEAD_VARIANTS, LAION_HEAD_WIDTHS, AestheticHead, AestheticReward, is_aesthetic_head
from .base import Reward
from .clip_vision import CLIPVisionConfig, CLIPVisionTower, detect_clip_layout
from .image import BrightnessReward, ColorTargetReward, SharpnessReward
from .safety import SAFETY_KEYS, SafetyReward, is_safety_checker

__all__ = ["BUILTIN_PREFIX", "BUILTIN_REWARDS", "METADATA_KEY", "REWARD_FAMILIES", "TOWER_DTYPES", "build_reward", "convert_reward",
           "detect_reward_family", "load_reward"]

METADATA_KEY = "focusfix_reward"
# the precisions a CLIP reward tower may be loaded in (node input `precision`). No fp16: the reward's gradients
# w.r.t. the image are tiny (full ViT-L/14, random weights, 512²: 2e-7 per pixel on average) and underflow in an
# fp16 backward (saliency cosine 0.89 to fp32's, against 0.99992 in bf16)
TOWER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REWARD_FAMILIES = ("aesthetic", "safety", "tiny_*")
_FORMATS = ("aesthetic: LAION improved-aesthetic-predictor head 'layers.{0,2,4,6,7}.{weight,bias}' (linearMSE) "
            "or 'layers.{0,3,6,9,11}.*' (reluMSE) (+ optional CLIP ViT-L/14 tower); "
            "safety: SD safety checker 'vision_model.vision_model.*', 'visual_projection.weight', 'concept_embeds', "
            "'special_care_embeds', '*_embeds_weights'; "
            f"tiny_*: files with metadata {METADATA_KEY!r}='tiny_...'")
# what the LAION aesthetic heads need, and where a ComfyUI user gets it
L14_TOWER = ("OpenAI CLIP ViT-L/14 at 224 px (in ComfyUI: Load CLIP Vision with clip-vit-large-patch14.safetensors, "
             "the model.safetensors of openai/clip-vit-large-patch14, in models/clip_vision)")
_AS_TOWER = ("to use its image tower for an aesthetic head, put the file in models/clip_vision and connect it "
             "through Load CLIP Vision to Load Reward's clip_vision input (the LAION heads need "
             "OpenAI CLIP ViT-L/14 at 224 px)")
_PROMPT_SCORED = ("it scores an image against its prompt, and FocusFix's rewards see the image alone; use the LAION "
                  "aesthetic head, the safety checker or a built-in reward")
# a ViT's name by (width, layers, patch), for messages about a tower that is not the one needed
_VIT_NAMES = {(768, 12, 32): "ViT-B/32", (768, 12, 16): "ViT-B/16", (1024, 24, 14): "ViT-L/14",
              (1280, 32, 14): "ViT-H/14", (1408, 40, 14): "ViT-g/14", (1664, 48, 14): "ViT-bigG/14"}
# image encoders that are no CLIP tower, by a key only they have (ComfyUI's CLIP_VISION layouts)
_OTHER_ENCODERS = (("multi_modal_projector.", "a LLaVA image tower"), ("mask_token", "a DINOv2 image encoder"),
                   ("patch_embedding.bias", "a SigLIP image tower"))
TowerSource = Union[CLIPVisionTower, Mapping[str, torch.Tensor], Callable[[], object]]


def _named(reward: Reward, name: str) -> Reward:
    reward.name = name
    return reward


BUILTIN_PREFIX = "builtin:"  # how the Load Reward node lists them (builtin:sharpness); the CLI takes it too
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
    if "focusfix_targets" in (metadata or {}):  # a LoRA records the reward it was trained with under the same key
        raise ValueError("not a reward file FocusFix reads: this is a LoRA FocusFix saved (it goes in models/loras; "
                         "to train it further, give it as continue_from / --continue-from)")
    if family is not None:
        if family in ("aesthetic", "safety") or family.startswith("tiny_"):
            return family
        raise ValueError(f"metadata {METADATA_KEY!r} must be one of {REWARD_FAMILIES}, got {family!r}")
    if is_safety_checker(sd):
        return "safety"
    if is_aesthetic_head(sd):
        return "aesthetic"
    known = _known_non_reward(sd)
    if known:
        raise ValueError(f"not a reward file FocusFix reads: {known}")
    raise ValueError(f"unknown reward file layout; known formats: {_FORMATS}. First keys: {list(sd)[:8]}")


def _known_non_reward(sd: Mapping[str, torch.Tensor]) -> str | None:
    """What a common file that is no FocusFix reward holds, and what to do instead; None for anything else."""
    keys = list(sd)
    if any(k.startswith("blip.") for k in keys):
        return f"this is ImageReward (BLIP + MLP), which is not supported: {_PROMPT_SCORED}"
    if any(k.startswith(("model.diffusion_model.", "diffusion_model.")) for k in keys):
        return "this is a diffusion model checkpoint (it goes in models/checkpoints, and loads with Load Checkpoint)"
    try:
        detect_clip_layout(sd)
        tower = True
    except ValueError:
        tower = False
    if not tower and any(k.endswith(("text_projection", "text_projection.weight")) for k in keys):
        return ("this is a CLIP text encoder, without an image tower (it goes in models/text_encoders or "
                "models/clip): a reward scores images")
    if any(k.endswith(("logit_scale", "text_projection", "text_projection.weight")) for k in keys):
        return (f"this is a whole CLIP model, image and text towers (PickScore and HPSv2 files look like this; "
                f"they are not supported: {_PROMPT_SCORED}); {_AS_TOWER}")
    safety = [k for k in SAFETY_KEYS if k in sd]
    if len(safety) >= 2:  # some of the checker's own keys: a damaged safety checker, not a tower for clip_vision
        return (f"a safety checker without {[k for k in SAFETY_KEYS if k not in sd]}: a damaged file; download it "
                f"again")
    head = [k for k in keys if k.startswith(("layers.", "predictor.", "mlp.", "head."))]
    layers = [re.fullmatch(r"layers\.(\d+)\.(?:weight|bias)", k) for k in keys if k.startswith("layers.")]
    found = {int(m[1]) for m in layers if m}
    if layers and all(layers):  # an MLP's layers.N.weight/bias only (another net's layers.* keys say more)
        # part of one head variant (`HEAD_VARIANTS`): a damaged file of it; any other layer: another MLP
        part = next((idx for idx in HEAD_VARIANTS.values() if found <= set(idx)), None)
        if part is None:
            heads = " or ".join(str(list(i)) for i in HEAD_VARIANTS.values())
            return (f"its layers.* keys are an MLP's that is not the LAION aesthetic head (layers {sorted(found)}; "
                    f"the head has layers {heads})")
        missing = [f"layers.{i}.{p}" for i in part for p in ("weight", "bias") if f"layers.{i}.{p}" not in sd]
        more = f" ({len(missing)} keys missing)" if len(missing) > 4 else ""
        return f"an aesthetic head without {missing[:4]}{more}: a damaged file; download it again"
    if not tower:
        return None
    if head:  # a tower beside a head FocusFix cannot read (another predictor), not a bare tower
        return (f"it holds a CLIP image tower and head keys FocusFix cannot read as the LAION aesthetic head, e.g. "
                f"{head[:3]} (another predictor?)")
    return f"this is a CLIP image tower, not a reward; {_AS_TOWER}"



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
    raise TypeError("clip_vision_tower must be None, a CLIPVisionTower, a CLIP vision state dict or a function "
                    f"returning one, got {type(clip_vision_tower).__name__}")


def _vit_name(cfg: CLIPVisionConfig) -> str:
    name = _VIT_NAMES.get((cfg.width, cfg.layers, cfg.patch),
                          f"a {cfg.width}-wide, {cfg.layers}-layer ViT with {cfg.patch}-px patches")
    # otherwise "is ViT-L/14 at 224 px, but the head scores ViT-L/14 at 224 px" reads as a contradiction
    bare = " without its visual projection (visual_projection.weight)" if cfg.proj_dim is None else ""
    return f"{name} at {cfg.image_size} px ({cfg.embed_dim}-d embeddings){bare}"


def _encoder_kind(sd) -> str:
    """A guess at the image encoder a state dict that is no CLIP tower holds, for messages."""
    keys = list(sd) if isinstance(sd, Mapping) else []
    return next((kind for marker, kind in _OTHER_ENCODERS if any(marker in k for k in keys)),
                f"first keys {keys[:3]}")


def _given_tower(clip_vision_tower: TowerSource, dtype: torch.dtype, tower_name: str) -> CLIPVisionTower:
    """The caller's tower; a ValueError names it (`tower_name`) and the tower the aesthetic head needs."""
    if callable(clip_vision_tower) and not isinstance(clip_vision_tower, (CLIPVisionTower, Mapping)):
        clip_vision_tower = clip_vision_tower()  # a function: read only now that a lone head needs it
    try:
        return _as_tower(clip_vision_tower, dtype)
    except ValueError as e:
        raise ValueError(f"{tower_name} is not a CLIP image tower FocusFix can read "
                         f"({_encoder_kind(clip_vision_tower)}): {e}. The aesthetic head needs {L14_TOWER}") from None


def _aesthetic_tower(sd: Mapping[str, torch.Tensor], given: TowerSource | None, tower_kw: dict,
                     tower_name: str | None) -> tuple[CLIPVisionTower, str]:
    """The head's tower and its name for messages: the file's own (it wins over a given one), else the given one."""
    rest = {k: v for k, v in sd.items() if not k.startswith("layers.")}
    if rest:
        if not any(k.endswith(("patch_embedding.weight", "conv1.weight")) for k in rest):
            # a few stray keys (an SWA save's n_averaged, a mean): named, not read as a broken tower
            raise ValueError(f"the file holds an aesthetic head and {len(rest)} other "
                             f"{'keys that hold' if len(rest) > 1 else 'key that holds'} no CLIP tower, e.g. "
                             f"{list(rest)[:3]}: save the head's layers.* keys alone (and connect its tower), or the "
                             f"head with its whole tower")
        return CLIPVisionTower.from_state_dict(rest, **tower_kw), "the tower in this file"
    if given is None:
        how = (f"connect {L14_TOWER} to {tower_name}, or use" if tower_name is not None else  # no input for one
               "use")
        raise ValueError(f"the aesthetic head needs a CLIP ViT-L/14 image tower and this file holds none: {how} a "
                         f"file holding the head and its tower")
    return _given_tower(given, tower_kw["dtype"], tower_name), tower_name


def _check_given_weights(tower: CLIPVisionTower, tower_name: str | None) -> None:
    """The connected tower's weights, as `_check_weights` checks a file's: a NaN would surface as a NaN score that
    names neither the input nor the file. Meta weights (sizes only) have no values to check."""
    try:
        check_float_finite({k: v for k, v in tower.state_dict().items() if not v.is_meta}, "weights", "")
    except ValueError as e:
        raise ValueError(f"{tower_name or 'the connected CLIP tower'}: {e}: that CLIP vision file is corrupt; "
                         f"download it again") from None


def _check_head_tower(head: AestheticHead, tower: CLIPVisionTower, where: str) -> None:
    """A released LAION head scores only the embeddings it was trained on, OpenAI CLIP ViT-L/14 at 224 px: another
    tower of the same width (ViT-L/14-336) loads and gives scores that mean nothing. Other heads: widths must chain."""
    cfg, l14 = tower.cfg, CLIPVisionConfig()
    if head.widths == LAION_HEAD_WIDTHS:
        shape = lambda c: (c.width, c.layers, c.patch, c.image_size, c.proj_dim)  # noqa: E731
        if shape(cfg) != shape(l14):
            raise ValueError(f"{where} is {_vit_name(cfg)}, but the LAION aesthetic head scores the embeddings of "
                             f"{L14_TOWER}")
    elif head.in_dim != cfg.embed_dim:
        raise ValueError(f"the aesthetic head takes {head.in_dim}-d embeddings but {where} gives "
                         f"{cfg.embed_dim}-d ones")


def _check_weights(sd: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights no reward net holds (non-float) or that make every score NaN, naming the first keys; one pass
    over the tensors. HF CLIP's integer `position_ids` are a buffer the towers drop, not weights."""
    check_float_finite({k: v for k, v in sd.items() if not k.endswith("position_ids")}, "reward weights",
                       ": the file is corrupt")


def build_reward(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 clip_vision_tower: TowerSource | None = None, *, tower_dtype: torch.dtype = torch.float32,
                 tower_name: str | None = "clip_vision_tower") -> Reward:
    """Build the Reward a state dict describes (see the module docstring for the formats).

    Args:
        sd: name -> tensor, as read from a reward file.
        metadata: the file's metadata (`{}` for pickle formats).
        clip_vision_tower: CLIP ViT-L/14 for an aesthetic head stored alone: a CLIPVisionTower, a CLIP
            vision state dict (e.g. ComfyUI's CLIP_VISION `get_sd()`), or a function returning one, called only
            when the file is such a head. A tower in the file wins; other families ignore it.
        tower_dtype: the CLIP tower's weights, float32 or bfloat16 (`TOWER_DTYPES`). The tower holds nearly
            all of a CLIP reward's weights (ViT-L/14: 1.14 GiB in fp32); bf16 halves that, while the small
            heads, concept embeddings and thresholds stay fp32. Tiny-world rewards ignore it.
        tower_name: what error messages call `clip_vision_tower` (a node names its input); None where the caller
            has no way to give a tower (the command line).

    Raises:
        ValueError: unknown layout, wrong shapes, an aesthetic head with no tower or with a tower other than
            OpenAI CLIP ViT-L/14 at 224 px (for the released heads), or a tower_dtype that is not in TOWER_DTYPES.
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
    tower, where = _aesthetic_tower(sd, clip_vision_tower, tower_kw, tower_name)
    _check_head_tower(head, tower, where)
    if where == tower_name:  # the connected tower, once it fits: its values checked as a file's are
        _check_given_weights(tower, tower_name)
    return AestheticReward(tower, head)


def load_reward(path: str | os.PathLike, clip_vision_tower: TowerSource | None = None, *,
                tower_dtype: torch.dtype = torch.float32, tower_name: str | None = "clip_vision_tower") -> Reward:
    """Load a reward file: `.safetensors`, or `.pt/.pth/.bin/.ckpt` via `torch.load(weights_only=True)`.

    Returns:
        A frozen Reward in eval mode. See `build_reward` for `clip_vision_tower`, `tower_dtype`, `tower_name`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: corrupt/truncated file, pickled objects (never executed), unknown layout, bad shapes,
            non-float or non-finite weights (naming the file and the first keys).
    """
    sd, metadata = load_tensor_file_with_metadata(path)
    try:
        _check_weights(sd)
        reward = build_reward(sd, metadata, clip_vision_tower, tower_dtype=tower_dtype, tower_name=tower_name)
    except ValueError as e:
        raise ValueError(f"{str(path)!r}: {e}") from e
    return reward.eval().requires_grad_(False)


def convert_reward(in_path: str | os.PathLike, out_path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write a `.safetensors` copy of a reward file with its family in metadata `focusfix_reward`.

    Pickles are read with `weights_only=True` (never executed). The layout is validated by
    building the reward on the meta device (no memory, no compute), every family, and the weights checked
    as `load_reward` checks them, before anything is written.

    Returns:
        The path written.

    Raises:
        ValueError: as `load_reward`, before anything is written.
        FileExistsError: `out_path` exists and not `overwrite`.
    """
    sd, metadata = load_tensor_file_with_metadata(in_path)
    try:
        family = detect_reward_family(sd, metadata)
        _check_weights(sd)  # on the real tensors: the meta ones below hold no values
        meta_sd = {k: v.to("meta") for k, v in sd.items()}
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
    return atomic_save_safetensors(out, out_path, metadata=meta, overwrite=overwrite)
