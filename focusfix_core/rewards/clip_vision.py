"""CLIP ViT image tower in plain torch + einops, loading HF/ComfyUI and OpenAI checkpoints.

References:
    Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", 2021.
    Key layouts: OpenAI `clip/model.py` (`visual.conv1`, `visual.transformer.resblocks.N.attn.in_proj_weight`,
    `visual.proj` [width,proj]); HF `CLIPVisionModelWithProjection` (`vision_model.embeddings.patch_embedding`,
    `vision_model.encoder.layers.N.self_attn.q_proj`, `pre_layrnorm` (sic), `post_layernorm`,
    `visual_projection.weight` [proj,width]), which ComfyUI's `comfy/clip_model.py` also uses.

Our modules carry the HF names, so `CLIPVisionTower.state_dict()` *is* the HF layout; OpenAI files are
converted key by key on load. The preprocessing (resize, centre crop, normalise) is differentiable,
so a reward built on this tower passes gradients back to the image I: [B,3,H,W] in [0,1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .base import check_images

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPVisionConfig",
    "CLIPVisionTower",
    "clip_preprocess",
    "detect_clip_layout",
    "hf_clip_shapes",
    "hf_to_openai",
    "infer_clip_config",
    "openai_to_hf",
    "to_hf_clip_state_dict",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's training statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = ("quick_gelu", "gelu")

_HF_EXAMPLE = "HF/ComfyUI layout ('vision_model.embeddings.patch_embedding.weight', " \
              "'vision_model.encoder.layers.N.self_attn.q_proj.weight', 'visual_projection.weight', ...)"
_OPENAI_EXAMPLE = "OpenAI layout ('visual.conv1.weight', " \
                  "'visual.transformer.resblocks.N.attn.in_proj_weight', 'visual.proj', ...)"
# Parts of a full CLIP checkpoint that are not the image tower: ignored on load.
_HF_TEXT = ("text_model.", "text_projection.", "logit_scale", "logit_bias")
_OPENAI_TEXT = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection",
                "logit_scale", "input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class CLIPVisionConfig:
    """A CLIP ViT image tower. Defaults: OpenAI ViT-L/14 at 224 (the aesthetic predictor's and SD
    safety checker's tower)."""

    width: int = 1024
    layers: int = 24
    heads: int = 16  # not stored in checkpoints: 64-wide heads, except ViT-H/g/bigG (16 heads)
    patch: int = 14
    image_size: int = 224
    proj_dim: int | None = 768  # None: no visual_projection; embeddings are the pooled output
    mlp_width: int = 4096  # 4 * width in every released CLIP
    activation: str = "quick_gelu"  # OpenAI; LAION's open_clip ViT-H/g/bigG use "gelu"
    eps: float = 1e-5

    def __post_init__(self):
        for f in ("width", "layers", "heads", "patch", "image_size", "mlp_width"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"CLIPVisionConfig.{f} must be a positive int, got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"CLIPVisionConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if self.image_size % self.patch:
            raise ValueError(f"CLIPVisionConfig.image_size ({self.image_size}) must be a multiple of "
                             f"patch ({self.patch})")
        if self.proj_dim is not None and (not isinstance(self.proj_dim, int) or self.proj_dim < 1):
            raise ValueError(f"CLIPVisionConfig.proj_dim must be None or a positive int, got {self.proj_dim!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"CLIPVisionConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def tokens(self) -> int:
        """Patch tokens plus the class token."""
        return (self.image_size // self.patch) ** 2 + 1

    @property
    def embed_dim(self) -> int:
        """Size of `image_embeds`."""
        return self.width if self.proj_dim is None else self.proj_dim


def clip_preprocess(I: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """CLIP preprocessing, differentiable: bicubic antialiased resize of the shorter side to `size`,
    centre crop, mean/std normalisation. I: [B,3,H,W] in [0,1] -> [B,3,size,size].

    Matches ComfyUI's `clip_preprocess` except its rounding to 8 bits (which has no gradient).

    Examples:
        >>> clip_preprocess(torch.rand(2, 3, 64, 96), size=32).shape
        torch.Size([2, 3, 32, 32])
    """
    B, C, H, W = I.shape
    if (H, W) != (size, size):
        scale = size / min(H, W)
        h, w = max(size, round(scale * H)), max(size, round(scale * W))
        I = F.interpolate(I, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        top, left = (h - size) // 2, (w - size) // 2
        I = I[:, :, top:top + size, left:left + size]  # [B,3,size,size]
    mean = torch.tensor(mean, device=I.device, dtype=I.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=I.device, dtype=I.dtype).view(1, 3, 1, 1)
    return (I - mean) / std


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(p(x), "b n (h d) -> b h n d", h=self.heads)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, heads, N, d)
        out = F.scaled_dot_product_attention(q, k, v)  # bidirectional: no mask in the image tower
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, width)


class _MLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, activation: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, mlp_width), nn.Linear(mlp_width, width)
        self.act = _quick_gelu if activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = _Attention(cfg.width, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = _MLP(cfg.width, cfg.mlp_width, cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class _Embeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch, bias=False)
        self.position_embedding = nn.Embedding(cfg.tokens, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = rearrange(self.patch_embedding(pixels), "b c h w -> b (h w) c")  # (B, grid^2, width)
        cls = self.class_embedding.to(x).expand(len(x), 1, -1)  # (B, 1, width)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight.to(x)  # (B, tokens, width)


class _VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps)  # sic: the HF name
        self.encoder = _Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))  # (B, tokens, width)
        return self.post_layernorm(x[:, 0])  # pooled class token (B, width)


class CLIPVisionTower(nn.Module):
    """CLIP image tower: `image_embeds(I) -> [B, proj_dim]` (unnormalised, like HF's `image_embeds`).

    Build it from a checkpoint with `CLIPVisionTower.from_state_dict(sd)`; `state_dict()` is the HF
    `CLIPVisionModelWithProjection` layout.

    Examples:
        >>> cfg = CLIPVisionConfig(width=64, layers=2, heads=2, patch=8, image_size=32, proj_dim=16, mlp_width=256)
        >>> CLIPVisionTower(cfg).image_embeds(torch.rand(2, 3, 48, 40)).shape
        torch.Size([2, 16])
    """

    def __init__(self, cfg: CLIPVisionConfig = CLIPVisionConfig()):
        super().__init__()
        if not isinstance(cfg, CLIPVisionConfig):
            raise TypeError(f"cfg must be a CLIPVisionConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.vision_model = _VisionTransformer(cfg)
        self.visual_projection = None if cfg.proj_dim is None else nn.Linear(cfg.width, cfg.proj_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels [B,3,S,S] (S = cfg.image_size) -> image embeddings [B, embed_dim]."""
        pooled = self.vision_model(pixels)  # (B, width)
        return pooled if self.visual_projection is None else self.visual_projection(pooled)

    def image_embeds(self, I: torch.Tensor) -> torch.Tensor:
        """Images I: [B,3,H,W] in [0,1] -> embeddings [B, embed_dim]; gradients reach I."""
        check_images(I, "images I")
        dtype = self.vision_model.embeddings.class_embedding.dtype
        # preprocess in >= fp32: antialiased bicubic has no bf16/fp16 kernel on CPU
        x = I.to(torch.promote_types(I.dtype, torch.float32))  # fp16/bf16 -> fp32; fp64 (gradcheck) stays
        return self(clip_preprocess(x, self.cfg.image_size).to(dtype))

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], *, heads: int | None = None,
                        activation: str | None = None, dtype: torch.dtype | None = torch.float32) -> "CLIPVisionTower":
        """Build a tower from an HF/ComfyUI or OpenAI state dict; the config comes from the shapes.

        Args:
            sd: name -> tensor. Text-tower keys of a full CLIP checkpoint are ignored.
            heads: attention heads (not stored in checkpoints); default from the width, see
                `infer_clip_config`.
            activation: "quick_gelu" or "gelu"; default "gelu" for LAION ViT-H/g/bigG widths
                (1280/1408/1664), else "quick_gelu" (OpenAI).
            dtype: cast floating weights to this dtype (None keeps the file's).

        Raises:
            ValueError: unknown layout, missing/extra keys, or a tensor of the wrong shape.

        The tower shares memory with `sd` where no cast or conversion is needed.
        """
        hf = to_hf_clip_state_dict(sd)
        cfg = infer_clip_config(hf, heads=heads, activation=activation)
        _check_shapes(hf, hf_clip_shapes(cfg))
        if dtype is not None:
            hf = {k: v.to(dtype) if v.is_floating_point() else v for k, v in hf.items()}
        with torch.device("meta"):  # allocate nothing: the weights come from `hf`
            tower = cls(cfg)
        tower.load_state_dict(hf, strict=True, assign=True)
        return tower.eval()

    def extra_repr(self) -> str:
        c = self.cfg
        return f"width={c.width}, layers={c.layers}, heads={c.heads}, patch={c.patch}, " \
               f"image_size={c.image_size}, proj_dim={c.proj_dim}, activation={c.activation}"


def hf_clip_shapes(cfg: CLIPVisionConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the HF layout for `cfg`, with its shape (no tensors are allocated).

    Examples:
        >>> len(hf_clip_shapes(CLIPVisionConfig()))  # ViT-L/14
        392
    """
    w, m = cfg.width, cfg.mlp_width
    shapes = {
        "vision_model.embeddings.class_embedding": (w,),
        "vision_model.embeddings.patch_embedding.weight": (w, 3, cfg.patch, cfg.patch),
        "vision_model.embeddings.position_embedding.weight": (cfg.tokens, w),
    }
    for ln in ("pre_layrnorm", "post_layernorm"):
        shapes.update({f"vision_model.{ln}.weight": (w,), f"vision_model.{ln}.bias": (w,)})
    for i in range(cfg.layers):
        p = f"vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{p}self_attn.{proj}.weight": (w, w), f"{p}self_attn.{proj}.bias": (w,)})
        for ln in ("layer_norm1", "layer_norm2"):
            shapes.update({f"{p}{ln}.weight": (w,), f"{p}{ln}.bias": (w,)})
        shapes.update({f"{p}mlp.fc1.weight": (m, w), f"{p}mlp.fc1.bias": (m,),
                       f"{p}mlp.fc2.weight": (w, m), f"{p}mlp.fc2.bias": (w,)})
    if cfg.proj_dim is not None:
        shapes["visual_projection.weight"] = (cfg.proj_dim, w)
    return shapes


def detect_clip_layout(sd: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """Find the image tower in a state dict: ("hf" | "openai", prefix of the tower's keys).

    HF prefixes seen: "vision_model." (CLIPVisionModelWithProjection, ComfyUI clip_vision),
    "vision_model.vision_model." (SD safety checker), "" (a bare CLIPVisionTransformer).
    OpenAI: "visual." (full CLIP) or "".

    Raises:
        ValueError: no (or more than one) tower found; the message lists both layouts and the first keys.
    """
    hf = [k[: -len("embeddings.patch_embedding.weight")] for k in sd if k.endswith("embeddings.patch_embedding.weight")]
    oa = [k[: -len("conv1.weight")] for k in sd if k.endswith("conv1.weight")]
    oa = [p for p in oa if f"{p}transformer.resblocks.0.attn.in_proj_weight" in sd]
    found = [("hf", p) for p in hf] + [("openai", p) for p in oa]
    if len(found) != 1:
        what = "no CLIP vision tower" if not found else f"{len(found)} CLIP vision towers {found}"
        raise ValueError(f"state dict holds {what}; expected one in {_HF_EXAMPLE} or {_OPENAI_EXAMPLE}. "
                         f"First keys: {list(sd)[:8]}")
    return found[0]


def openai_to_hf(sd: Mapping[str, torch.Tensor], prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """Rename an OpenAI-layout tower (keys under `prefix`) to the HF layout.

    `in_proj_weight` [3w,w] is split into q/k/v; `proj` [w,p] becomes `visual_projection.weight` [p,w].
    Keys outside `prefix`, and unknown keys under it, are returned unchanged (validation reports them).

    Raises:
        ValueError: a `proj` or `in_proj_*` tensor that cannot be transposed or split so (named, with its shape).
    """
    top = {"class_embedding": "embeddings.class_embedding", "conv1.weight": "embeddings.patch_embedding.weight",
           "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
           "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight",
           "ln_post.bias": "post_layernorm.bias"}
    block = {"attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
             "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
             "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
             "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
             "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias"}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            out[k] = v
            continue
        name = k[len(prefix):]
        if name == "proj":
            if v.ndim != 2:
                raise ValueError(f"{k!r} must be [width,proj_dim], got {tuple(v.shape)}")
            out["visual_projection.weight"] = v.t().contiguous()
        elif name in top:
            out[f"vision_model.{top[name]}"] = v
        elif name.startswith("transformer.resblocks."):
            i, _, rest = name[len("transformer.resblocks."):].partition(".")
            p = f"vision_model.encoder.layers.{i}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # "weight" | "bias"
                if v.ndim != (2 if kind == "weight" else 1) or v.shape[0] % 3:
                    want = "[3*width,width]" if kind == "weight" else "[3*width]"
                    raise ValueError(f"{k!r} must be {want} (q, k, v stacked), got {tuple(v.shape)}")
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{p}self_attn.{proj}.{kind}"] = part
            elif rest in block:
                out[p + block[rest]] = v
            else:
                out[k] = v  # unknown: kept under its own name, so validation reports it
        else:
            out[k] = v
    return out


def hf_to_openai(hf: Mapping[str, torch.Tensor], prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """The inverse of `openai_to_hf` for a tower in the HF layout (e.g. `CLIPVisionTower.state_dict()`).

    Examples:
        >>> cfg = CLIPVisionConfig(width=64, layers=1, heads=1, patch=8, image_size=16, proj_dim=8, mlp_width=128)
        >>> sorted(hf_to_openai(CLIPVisionTower(cfg).state_dict()))[:3]
        ['visual.class_embedding', 'visual.conv1.weight', 'visual.ln_post.bias']
    """
    rename = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
              "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
              "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight",
              "post_layernorm.bias": "ln_post.bias"}
    block = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
             "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
    out: dict[str, torch.Tensor] = {}
    for k, v in hf.items():
        if k == "visual_projection.weight":
            out[prefix + "proj"] = v.t().contiguous()
            continue
        name = k.removeprefix("vision_model.")
        if name in rename:
            out[prefix + rename[name]] = v
        elif name.startswith("encoder.layers."):
            i, _, rest = name[len("encoder.layers."):].partition(".")
            p = f"{prefix}transformer.resblocks.{i}."
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                if rest.startswith("self_attn.q_proj."):  # q, k, v stacked as in nn.MultiheadAttention
                    kind = rest.rsplit(".", 1)[1]
                    qkv = [hf[f"vision_model.encoder.layers.{i}.self_attn.{x}_proj.{kind}"] for x in "qkv"]
                    out[f"{p}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            else:
                old = next((o for o in block if rest.startswith(o)), None)
                if old is None:
                    raise ValueError(f"hf_to_openai: unknown HF key {k!r}")
                out[p + block[old] + rest[len(old):]] = v
        elif not name.endswith("position_ids"):
            raise ValueError(f"hf_to_openai: unknown HF key {k!r}")
    return out


def to_hf_clip_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported tower state dict -> the HF layout (prefix "vision_model.", projection
    "visual_projection.weight"), text-tower keys and `position_ids` buffers dropped.

    Raises:
        TypeError: sd is not a mapping of str -> tensor.
        ValueError: no tower found, or keys that belong to no known layout (the first ones are listed).
    """
    if not isinstance(sd, Mapping):
        raise TypeError(f"sd must be a mapping str -> Tensor, got {type(sd).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"sd must map str -> Tensor, got non-tensor entries {bad[:5]}")
    layout, prefix = detect_clip_layout(sd)
    if layout == "openai":
        sd, prefix, expected = openai_to_hf(sd, prefix), "vision_model.", _OPENAI_EXAMPLE
    else:
        expected = _HF_EXAMPLE
    out: dict[str, torch.Tensor] = {}
    extra: list[str] = []
    for k, v in sd.items():
        if k.endswith("position_ids"):  # HF buffer (arange), not a weight
            continue
        if k.endswith("visual_projection.weight"):  # first: with prefix "" every key is under it
            if "visual_projection.weight" in out:
                raise ValueError(f"state dict holds two visual projections ({k!r}); expected one in {expected}")
            out["visual_projection.weight"] = v
        elif k.startswith(prefix):
            out["vision_model." + k[len(prefix):]] = v
        elif k.startswith(_HF_TEXT) or (layout == "openai" and k.startswith(_OPENAI_TEXT)):
            continue
        else:
            extra.append(k)
    if extra:
        raise ValueError(f"unexpected keys for a CLIP vision tower in {expected}: {extra[:5]}"
                         f"{' ...' if len(extra) > 5 else ''} ({len(extra)} in all)")
    return out


def _default_heads(width: int) -> int | None:
    """Heads of the released CLIPs: 64-wide heads, except LAION ViT-H (1280), ViT-g (1408), bigG (1664)."""
    if width in (1280, 1408, 1664):
        return 16
    return width // 64 if width % 64 == 0 else None


def _default_activation(width: int) -> str:
    """OpenAI's towers use quick_gelu; LAION's ViT-H/g/bigG (as in ComfyUI's configs) use gelu."""
    return "gelu" if width in (1280, 1408, 1664) else "quick_gelu"


def infer_clip_config(hf: Mapping[str, torch.Tensor], *, heads: int | None = None,
                      activation: str | None = None) -> CLIPVisionConfig:
    """Read a CLIPVisionConfig off an HF-layout state dict (see `to_hf_clip_state_dict`).

    Width, patch, image size, layers, MLP width and projection come from the shapes. Checkpoints do
    not store `heads` or the activation: by default heads are 64 wide (16 heads for LAION's ViT-H/g/bigG
    widths 1280/1408/1664) and the activation is quick_gelu (gelu for those widths), as in ComfyUI's
    bundled configs.

    Raises:
        ValueError: a key the config is read from is missing, or the shapes are inconsistent.
    """
    need = ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight",
            "vision_model.encoder.layers.0.mlp.fc1.weight")
    missing = [k for k in need if k not in hf]
    if missing:
        raise ValueError(f"CLIP vision state dict is missing {missing} ({_HF_EXAMPLE}); first keys: {list(hf)[:8]}")
    for k in (need[1], need[2], "visual_projection.weight"):  # the sizes below are read off their first dim
        if k in hf and hf[k].ndim != 2:
            raise ValueError(f"{k} must be 2-D, got shape {tuple(hf[k].shape)}")
    patch_w = hf[need[0]]
    if patch_w.ndim != 4 or patch_w.shape[1] != 3 or patch_w.shape[2] != patch_w.shape[3]:
        raise ValueError(f"{need[0]} must be [width,3,patch,patch], got {tuple(patch_w.shape)}")
    width, patch = patch_w.shape[0], patch_w.shape[-1]
    tokens = hf[need[1]].shape[0]
    grid = math.isqrt(max(tokens - 1, 0))
    if grid * grid != tokens - 1 or grid == 0:
        raise ValueError(f"{need[1]} must have grid^2 + 1 rows, got {tuple(hf[need[1]].shape)}")
    layers = 0
    while f"vision_model.encoder.layers.{layers}.layer_norm1.weight" in hf:
        layers += 1
    heads = heads if heads is not None else _default_heads(width)
    if heads is None:
        raise ValueError(f"cannot infer attention heads for width {width}: pass heads=")
    proj = hf.get("visual_projection.weight")
    return CLIPVisionConfig(width=width, layers=layers, heads=heads, patch=patch, image_size=grid * patch,
                            proj_dim=None if proj is None else proj.shape[0], mlp_width=hf[need[2]].shape[0],
                            activation=activation or _default_activation(width))


def _check_shapes(hf: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ValueError naming the first missing/extra keys or the first wrong shape."""
    missing = [k for k in shapes if k not in hf]
    extra = [k for k in hf if k not in shapes]
    if missing or extra:
        raise ValueError(f"CLIP vision state dict does not match the {_HF_EXAMPLE} for its inferred config "
                         "(OpenAI-layout files are named here after conversion): "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"extra {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for k, shape in shapes.items():
        if tuple(hf[k].shape) != shape:
            raise ValueError(f"CLIP vision weight {k!r} must have shape {shape}, got {tuple(hf[k].shape)}")
