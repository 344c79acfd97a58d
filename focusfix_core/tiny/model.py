"""The tiny text-to-image model of the shapes world: word tokenizer, text encoder, pixel-space eps UNet.

A miniature Stable Diffusion 1.5 so that LoRA targets, attention capture and kohya key export run the
same code paths: the UNet's modules are named like diffusers' (`down_blocks.1.attentions.0.
transformer_blocks.0.attn2.to_k`), each attention has `heads`, `to_q`, `to_k`, `to_v`, `to_out.0`,
and cross-attention (attn2) runs at 16x16 and 8x8. It works in pixel space: x = 2I - 1, decode(x) = (x+1)/2.

References:
- Ho et al. 2020, DDPM (eps-prediction, the training loss);
- Rombach et al. 2022, LDM/SD (UNet with SpatialTransformer blocks, scaled-linear schedule);
- Radford et al. 2021, CLIP (causal text transformer; the last layer's states are the context);
- Hang et al. 2023, min-SNR-gamma loss weighting (used by train.py).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import LiveHW, attention_capture, word_token_indices
from ..denoisers import CFGDenoiser, Cond, EpsDenoiser
from ..io import atomic_save_safetensors, load_state_checked, load_tensor_file_with_metadata
from ..schedules import scaled_linear_alphas_cumprod, sigmas_from_alphas_cumprod
from .world import WORDS

__all__ = [
    "TinyConfig",
    "Tokenizer",
    "TextEncoder",
    "CrossAttention",
    "UNet",
    "TinyModel",
    "DEFAULT_WEIGHTS",
    "load_default_model",
]

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "tiny_t2i.safetensors"
SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")
# Upper bounds on TinyConfig's sizes: 16x the shipped model's (the defaults), far beyond a tiny model. A config read
# from a file comes before its weights, and the sigmas buffer and the samples take what it asks for.
_MAX_SIZES = {"image_size": 512, "channels": 1024, "heads": 64, "context_dim": 1024, "text_layers": 32,
              "max_tokens": 192, "timesteps": 16000}


def _is_size(v, name: str) -> bool:
    """v is an int (not a bool) in [1, _MAX_SIZES[name]]."""
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _MAX_SIZES[name]


@dataclass(frozen=True)
class TinyConfig:
    image_size: int = 32
    channels: tuple[int, int, int] = (32, 48, 64)  # UNet widths at 32x32, 16x16, 8x8
    heads: int = 4
    context_dim: int = 64      # text width D
    text_layers: int = 2
    max_tokens: int = 12       # T: "<start> a red circle and a blue square <end>" is 10
    timesteps: int = 1000      # DDPM training steps of the scaled-linear schedule
    vocab: tuple[str, ...] = SPECIALS + WORDS

    def __post_init__(self):
        for f in ("image_size", "heads", "context_dim", "text_layers", "max_tokens", "timesteps"):
            v = getattr(self, f)
            if not _is_size(v, f):
                raise ValueError(f"TinyConfig.{f} must be an int in [1, {_MAX_SIZES[f]}], got {v!r:.80}")
        if not (isinstance(self.channels, tuple) and len(self.channels) == 3
                and all(_is_size(c, "channels") for c in self.channels)):
            raise ValueError(f"TinyConfig.channels must be 3 ints in [1, {_MAX_SIZES['channels']}], "
                             f"got {self.channels!r:.80}")
        if not (isinstance(self.vocab, tuple) and all(isinstance(w, str) for w in self.vocab)
                and set(SPECIALS) <= set(self.vocab)):
            raise ValueError(f"TinyConfig.vocab must be words (str) including {SPECIALS}, got {self.vocab!r:.200}")
        if self.image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (two downsamplings), got {self.image_size}")
        if any(c % 8 or c % self.heads for c in self.channels):
            raise ValueError(f"channels must be multiples of 8 (GroupNorm) and of heads={self.heads}, got {self.channels}")
        if self.context_dim % self.heads:
            raise ValueError(f"context_dim must be a multiple of heads={self.heads}, got {self.context_dim}")
        if self.max_tokens < 3:
            raise ValueError(f"max_tokens must be >= 3, got {self.max_tokens}")
        if self.timesteps < 2:
            raise ValueError(f"timesteps must be >= 2, got {self.timesteps}")


class Tokenizer:
    """Word-level tokenizer: lower-case words, punctuation dropped, unknown words -> <unk>, padded to T."""

    def __init__(self, vocab: tuple[str, ...], max_tokens: int):
        self.vocab, self.max_tokens = tuple(vocab), max_tokens
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def tokens(self, prompt: str) -> list[str]:
        """'a red circle' -> ['<start>', 'a', 'red', 'circle', '<end>', '<pad>', ...] (length T)."""
        words = [w if w in self.ids else "<unk>" for w in re.findall(r"[a-z]+", prompt.lower())]
        toks = ["<start>", *words[: self.max_tokens - 2], "<end>"]
        return toks + ["<pad>"] * (self.max_tokens - len(toks))

    def check(self, prompt: str, what: str = "prompt") -> None:
        """ValueError naming the words of `prompt` this tokenizer reads as <unk>, or those cut off past T - 2:
        the model would draw something else than asked, silently."""
        words = re.findall(r"[a-z]+", prompt.lower())
        unknown = list(dict.fromkeys(w for w in words if w not in self.ids))
        if unknown:
            known = [w for w in self.vocab if not w.startswith("<")]
            raise ValueError(f"{what} {prompt!r}: the tiny model does not know {unknown}; it knows only the words "
                             f"{known} (e.g. 'a red circle and a blue square')")
        if len(words) > self.max_tokens - 2:
            raise ValueError(f"{what} {prompt!r} has {len(words)} words; the tiny model reads at most "
                             f"{self.max_tokens - 2}")

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> ids: [B,T] long."""
        return torch.tensor([[self.ids[t] for t in self.tokens(p)] for p in prompts], dtype=torch.long)


class CrossAttention(nn.Module):
    """Multi-head attention named like diffusers' `Attention`; context=None makes it self-attention."""

    def __init__(self, dim: int, context_dim: int | None, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B,N,C], context: [B,T,D] or None -> [B,N,C]."""
        B, N, C = x.shape
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        q, k, v = (t.view(B, -1, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, h, N|T, C/h)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.to_out[1](self.to_out[0](out))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))  # net.0, net.2

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), CrossAttention(dim, None, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), CrossAttention(dim, context_dim, heads)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """SD's SpatialTransformer: GroupNorm, proj_in, one transformer block over the h*w pixels, proj_out."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(8, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, context_dim, heads)])
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x, context):
        B, C, h, w = x.shape
        y = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, hw, C)
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(y).transpose(1, 2).reshape(B, C, h, w)


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(x) + h


class Block(nn.Module):
    """One UNet level: a resnet, an optional spatial transformer, an optional down/upsampler."""

    def __init__(self, cin, cout, temb, context_dim, heads, attention: bool, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin, cout, temb)])
        self.attentions = nn.ModuleList([Transformer2DModel(cout, context_dim, heads)] if attention else [])
        self.resample = resample
        if resample == "down":
            self.downsamplers = nn.ModuleList([nn.Conv2d(cout, cout, 3, stride=2, padding=1)])

    def forward(self, x, emb, context):
        x = self.resnets[0](x, emb)
        for attn in self.attentions:
            x = attn(x, context)
        return x

    def resample_(self, x):
        if self.resample == "down":
            return self.downsamplers[0](x)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")  # no conv: the next resnet mixes
        return x


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (continuous) timesteps, as in DDPM/SD. t: [B] -> [B,dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class UNet(nn.Module):
    """eps-prediction UNet: net(x_in: [B,3,H,W], t: [B], cond={"context": [B,T,D]}) -> eps: [B,3,H,W].

    Levels: 32x32 (resnet), 16x16 (resnet + attn), 8x8 (resnet + attn), mid at 8x8 (attn), and back up.
    """

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        c0, c1, c2 = cfg.channels
        temb, D, h = 4 * c0, cfg.context_dim, cfg.heads
        self.c0 = c0
        self.conv_in = nn.Conv2d(3, c0, 3, padding=1)
        self.time_embedding = nn.Sequential(nn.Linear(c0, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.down_blocks = nn.ModuleList([
            Block(c0, c0, temb, D, h, attention=False, resample="down"),  # 32x32 -> 16x16
            Block(c0, c1, temb, D, h, attention=True, resample="down"),   # 16x16 -> 8x8
            Block(c1, c2, temb, D, h, attention=True, resample=None),     # 8x8
        ])
        self.mid_block = Block(c2, c2, temb, D, h, attention=True, resample=None)
        self.up_blocks = nn.ModuleList([
            Block(c2 + c2, c2, temb, D, h, attention=True, resample="up"),  # 8x8 -> 16x16
            Block(c2 + c1, c1, temb, D, h, attention=True, resample="up"),  # 16x16 -> 32x32
            Block(c1 + c0, c0, temb, D, h, attention=False, resample=None),  # 32x32
        ])
        self.conv_norm_out = nn.GroupNorm(8, c0)
        self.conv_out = nn.Conv2d(c0, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        context = cond["context"]                                       # (B, T, D)
        assert x.shape[0] == context.shape[0], f"batch {x.shape[0]} vs context {context.shape[0]}"
        emb = self.time_embedding(timestep_embedding(t, self.c0))       # (B, 4*c0)
        h, skips = self.conv_in(x), []
        for block in self.down_blocks:
            h = block(h, emb, context)
            skips.append(h)
            h = block.resample_(h)
        h = self.mid_block(h, emb, context)
        for block in self.up_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
            h = block.resample_(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class TextBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.attn = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, h, T, C/h)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    """CLIP-like causal text transformer: ids [B,T] -> context [B,T,D] (the last layer's states)."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        D = cfg.context_dim
        self.token_embedding = nn.Embedding(len(cfg.vocab), D)
        self.position_embedding = nn.Parameter(torch.zeros(cfg.max_tokens, D))
        self.layers = nn.ModuleList([TextBlock(D, cfg.heads) for _ in range(cfg.text_layers)])
        self.final_layer_norm = nn.LayerNorm(D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]  # (B, T, D)
        for layer in self.layers:
            x = layer(x)
        return self.final_layer_norm(x)


class TinyModel(nn.Module):
    """The embedded model, implementing `denoisers.DiffusionModel`. Pixel space: latent_scale = 1.

    Example:
        >>> m = TinyModel.random(seed=0)
        >>> m.encode_prompts(["a red circle", ""])["context"].shape
        torch.Size([2, 12, 64])
    """

    latent_channels = 3
    latent_scale = 1

    def __init__(self, cfg: TinyConfig = TinyConfig(), name: str = "focusfix-tiny"):
        super().__init__()
        self.cfg, self.name = cfg, name
        self.tokenizer = Tokenizer(cfg.vocab, cfg.max_tokens)
        self.text_encoder = TextEncoder(cfg)
        self.net = UNet(cfg)
        with torch.device("cpu"):  # numbers, not weights: real also when built on the meta device (`load`)
            sigmas = sigmas_from_alphas_cumprod(scaled_linear_alphas_cumprod(cfg.timesteps)).float()
        self.register_buffer("sigmas", sigmas, persistent=False)  # [T] ascending
        self._hw = LiveHW((cfg.image_size, cfg.image_size))  # the size of the call running now (attention maps)

    @classmethod
    def random(cls, seed: int = 0, config: TinyConfig | None = None) -> "TinyModel":
        """A randomly initialised model (for tests), deterministic from `seed`."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # scoped: fork_rng restores the global RNG on exit
            return cls(config or TinyConfig())

    # --- DiffusionModel protocol -------------------------------------------------------------
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """x: [B,3,H,W] (x = x0 + sigma * eps), sigma: [B] -> x0: [B,3,H,W]."""
        self._hw.hw = tuple(x.shape[-2:])
        return EpsDenoiser(self.net, self.sigmas)(x, sigma, cond)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel space: I = (z + 1) / 2, differentiable and unclamped. z: [B,3,H,W] -> I: [B,3,H,W]."""
        return (z + 1) / 2

    def encode(self, I: torch.Tensor) -> torch.Tensor:
        """Inverse of decode. I: [B,3,H,W] in [0,1] -> z: [B,3,H,W] in [-1,1]."""
        return I * 2 - 1

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """prompts (len B; "" is unconditional) -> {"context": [B,T,D]}."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of str, got {prompts!r}")
        ids = self.tokenizer(prompts).to(self.sigmas.device)
        return {"context": self.text_encoder(ids)}

    def tokens(self, prompt: str) -> list[str]:
        return self.tokenizer.tokens(prompt)

    def token_indices(self, prompt: str, words: list[str]) -> list[list[int]]:
        """For each word, its positions in the encoded prompt (e.g. 'circle' in 'a red circle' -> [3])."""
        return word_token_indices(self.tokens(prompt), words)

    def attention_capture(self, store):
        """While active, every attn2 feeds its (q, k) to `store.add` (see focusfix_core.attention)."""
        return attention_capture(self.net, store, self._hw)

    def attention_levels(self) -> list[int]:
        """The UNet levels with cross-attention (0 = the image's size; 16x16 and 8x8 at 32 px: [1, 2])."""
        levels, level = set(), 0
        for block in self.net.down_blocks:
            if len(block.attentions):
                levels.add(level)
            level += block.resample == "down"
        if len(self.net.mid_block.attentions):
            levels.add(level)
        return sorted(levels)

    def checkpoint_modules(self) -> list[nn.Module]:
        """The UNet's resnets and spatial transformers, for block-wise gradient checkpointing."""
        return [m for m in self.net.modules() if isinstance(m, (ResnetBlock2D, Transformer2DModel))]

    # --- conveniences --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int] | None = None, steps: int = 20,
               cfg_scale: float = 3.0) -> torch.Tensor:
        """Deterministic DDIM with classifier-free guidance, the trainers' sampler. -> I: [B,3,H,W] in [0,1].

        seeds: one per prompt (default 0..B-1); an image depends only on its prompt and seed.
        """
        from ..sampler import sample, sampling_sigmas, seed_noise

        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"need one seed per prompt, got {len(seeds)} seeds for {len(prompts)} prompts")
        S, dev = self.cfg.image_size, self.sigmas.device
        sigmas = sampling_sigmas(self, steps).to(dev)
        x = seed_noise(seeds, (3, S, S), device=dev) * sigmas[0]
        denoiser = CFGDenoiser(self.denoise, self.encode_prompts([""]), cfg_scale)
        return self.decode(sample(denoiser, x, sigmas, self.encode_prompts(list(prompts)))).clamp(0, 1)

    def save(self, path, dtype=torch.float16) -> None:
        """Weights and config as safetensors (metadata `focusfix_tiny_config` = JSON config), atomically."""
        import json

        sd = {k: v.detach().to(dtype) for k, v in self.state_dict().items()}
        atomic_save_safetensors(sd, path, {"focusfix_tiny_config": json.dumps(asdict(self.cfg)), "name": self.name})

    @classmethod
    def load(cls, path) -> "TinyModel":
        """Inverse of `save`. Weights come back as float32.

        The config is checked, then the model is built on the meta device and takes the file's tensors once every
        name and shape matches: a crafted config allocates nothing (it could ask for terabytes).

        Raises:
            FileNotFoundError: no such file.
            ValueError: naming the file: a corrupt file, no or a bad `focusfix_tiny_config`, or weights whose
                names or shapes differ from the config's model.
        """
        import json

        tensors, meta = load_tensor_file_with_metadata(path)  # a missing or corrupt file is named
        if "focusfix_tiny_config" not in meta:
            raise ValueError(f"{path} has no 'focusfix_tiny_config' metadata: not a FocusFix tiny model")
        try:
            raw = json.loads(meta["focusfix_tiny_config"])
            if not isinstance(raw, dict):
                raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
            unknown = sorted(set(raw) - set(TinyConfig.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown fields {unknown}")
            cfg = TinyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        except (ValueError, RecursionError) as e:  # json's errors are ValueErrors; deep nesting is a RecursionError
            raise ValueError(f"{path}: metadata 'focusfix_tiny_config' is not a TinyConfig: {e}") from None
        with torch.device("meta"):
            model = cls(cfg, name=meta.get("name", "focusfix-tiny"))
        return load_state_checked(model, tensors, str(path), assign=True).eval()


def load_default_model() -> TinyModel:
    """The shipped model (focusfix_core/tiny/weights/tiny_t2i.safetensors)."""
    if not DEFAULT_WEIGHTS.is_file():
        raise FileNotFoundError(f"shipped tiny weights missing at {DEFAULT_WEIGHTS}: run "
                                f"`python -m focusfix_core.tiny.train --out DIR` and copy DIR/tiny_t2i.safetensors there")
    return TinyModel.load(DEFAULT_WEIGHTS)
