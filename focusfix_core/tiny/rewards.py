"""Learned rewards of the shapes world, the small-scale stand-ins of the Focus-N-Fix paper's rewards.

- `ArtifactReward` ("tiny_artifact"): a fully-convolutional glitch detector. heatmap(I) = P(glitch)
  per pixel (like RichHF-18K's artifact heatmaps), score(I) = -P(the image has a glitch).
- `AttributeReward` ("tiny_attribute"): a classifier of a colour deemed "unsafe" (red by default),
  score(I) = -P(an object of that colour). It has no heatmap, so Focus-N-Fix takes its masks from
  gradient saliency (the paper's over-sexualization case).

Both are trained on procedural data (`python -m focusfix_core.tiny.rewards --out DIR`), with blur,
noise and faded glitches so that they also read the diffusion model's imperfect samples. They ship as
safetensors with metadata `focusfix_reward` = "tiny_artifact" / "tiny_attribute"; `load_tiny_reward`
builds them (the generic loader in rewards/loading.py delegates "tiny_*" to it).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io import atomic_save_safetensors, load_state_checked, load_tensor_file_with_metadata
from ..rewards.base import Reward
from .world import COLOURS, TRAIN_WORLD, WorldConfig, render, sample_scenes

__all__ = [
    "ArtifactReward",
    "AttributeReward",
    "load_tiny_reward",
    "load_default_rewards",
    "DEFAULT_REWARDS",
    "train_artifact_reward",
    "train_attribute_reward",
]

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_REWARDS = {"artifact": WEIGHTS_DIR / "tiny_artifact.safetensors",
                   "attribute": WEIGHTS_DIR / "tiny_attribute.safetensors"}


class ArtifactReward(Reward):
    """score(I) = -P(glitch); heatmap(I) = per-pixel P(glitch). I: [B,3,H,W] in [0,1]."""

    has_heatmap = True
    name = "tiny_artifact"

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.net = nn.Sequential(  # receptive field 11 px: a whole 6x6 checker plus context
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=2, dilation=2), nn.SiLU(),
            nn.Conv2d(2 * w, 1, 1),
        )
        self.bias = nn.Parameter(torch.zeros(()))  # image logit offset of the soft-max pooling

    def logits(self, I: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pixel logits [B,1,H,W], image logit [B])."""
        px = self.net(I * 2 - 1)                                       # (B, 1, H, W)
        img = px.flatten(1).logsumexp(1) - math.log(px[0].numel()) + self.bias  # soft max over pixels
        return px, img

    def score(self, I):
        return -torch.sigmoid(self.logits(I)[1])

    def heatmap(self, I):
        return torch.sigmoid(self.logits(I)[0])

    def describe(self):
        return {"name": self.name, "family": "tiny_artifact"}


class AttributeReward(Reward):
    """score(I) = -P(an object of colour `colour`). No heatmap: masks come from gradient saliency."""

    has_heatmap = False
    name = "tiny_attribute"

    def __init__(self, colour: str = "red", width: int = 16):
        super().__init__()
        if colour not in COLOURS:
            raise ValueError(f"colour must be one of {list(COLOURS)}, got {colour!r}")
        self.colour, w = colour, width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),     # 16x16
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),  # 8x8
            nn.Conv2d(2 * w, 1, 1),
        )
        self.bias = nn.Parameter(torch.zeros(()))

    def logit(self, I: torch.Tensor) -> torch.Tensor:
        px = self.net(I * 2 - 1)                                       # (B, 1, h, w)
        return px.flatten(1).logsumexp(1) - math.log(px[0].numel()) + self.bias  # (B,)

    def score(self, I):
        return -torch.sigmoid(self.logit(I))

    def describe(self):
        return {"name": self.name, "family": "tiny_attribute", "colour": self.colour}


def load_tiny_reward(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Reward:
    """Build a tiny reward from a state dict and its file metadata (`focusfix_reward` = "tiny_..."). Built on the
    meta device and given the file's tensors once their shapes are checked: a width in the metadata allocates
    nothing (a crafted one could ask for terabytes), and meta tensors (`convert_reward`'s check) stay meta."""
    metadata = metadata or {}
    family, width = metadata.get("focusfix_reward", ""), str(metadata.get("width", 16))
    if not (width.isdecimal() and int(width) > 0):  # meta tensors refuse a negative size too, from deep in torch
        raise ValueError(f"metadata 'width' must be a positive int (the shipped rewards use 16), got {width!r}")
    with torch.device("meta"):
        if family == "tiny_artifact":
            reward = ArtifactReward(width=int(width))
        elif family == "tiny_attribute":
            reward = AttributeReward(colour=metadata.get("colour", "red"), width=int(width))
        else:
            raise ValueError(f"metadata focusfix_reward must be 'tiny_artifact' or 'tiny_attribute', got {family!r}")
    return load_state_checked(reward, tensors, family, assign=True).eval().requires_grad_(False)


def _load_file(path: Path) -> Reward:
    return load_tiny_reward(*load_tensor_file_with_metadata(path))


def load_default_rewards() -> dict[str, Reward]:
    """The shipped rewards: {"artifact": ArtifactReward, "attribute": AttributeReward}."""
    missing = [str(p) for p in DEFAULT_REWARDS.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shipped tiny rewards missing: {missing}; run `python -m focusfix_core.tiny.rewards --out DIR`")
    return {name: _load_file(path) for name, path in DEFAULT_REWARDS.items()}


def save_reward(reward: Reward, path) -> None:
    meta = {"focusfix_reward": reward.describe()["family"], "width": str(reward.net[0].out_channels)}
    if isinstance(reward, AttributeReward):
        meta["colour"] = reward.colour
    atomic_save_safetensors(reward.state_dict(), path, meta)


# --- training on procedural data -------------------------------------------------------------------

def _degrade(I: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Make renders look like samples: random blur (sigma <= 1.2 px), colour shift (<= 0.12 per channel,
    the model's backgrounds drift to lavender) and noise (std <= 0.04). I: [B,3,H,W]."""
    B = I.shape[0]
    sigma = 1.2 * torch.rand(B, generator=g) * (torch.rand(B, generator=g) < 0.6)
    x = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-x[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k = k / k.sum(1, keepdim=True)                                      # (B, 5) per-image 1-D kernels
    out = torch.empty_like(I)
    for b in range(B):  # separable blur, one kernel per image
        kb = k[b].view(1, 1, 1, 5).expand(3, 1, 1, 5)
        y = F.conv2d(F.pad(I[b:b + 1], (2, 2, 0, 0), mode="replicate"), kb, groups=3)
        out[b:b + 1] = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), kb.transpose(2, 3), groups=3)
    shift = (torch.rand(B, 3, 1, 1, generator=g) * 2 - 1) * 0.12
    noise = torch.randn(I.shape, generator=g) * 0.04 * torch.rand(B, 1, 1, 1, generator=g)
    return (out + shift + noise).clamp(0, 1)


def _artifact_batch(n: int, seed: int, cfg: WorldConfig):
    """Images with faded glitches (contrast 0.15..1) half of the time. -> I, label [B], pixel mask [B,1,H,W]."""
    g = torch.Generator().manual_seed(seed)
    scenes = sample_scenes(n, seed, WorldConfig(glitch_rate=0.5, two_object_rate=0.3, include_held_out=True))
    glitched = render(scenes, cfg)
    boxes = [s.glitch for s in scenes]
    for s in scenes:
        s.glitch = None
    clean = render(scenes, cfg)
    c = 0.15 + 0.85 * torch.rand(n, 1, 1, 1, generator=g)
    I = clean + c * (glitched - clean)
    M = torch.zeros(n, 1, cfg.size, cfg.size)
    for i, b in enumerate(boxes):
        if b is not None:
            M[i, :, b[1]:b[3], b[0]:b[2]] = 1
    label = torch.tensor([b is not None for b in boxes], dtype=torch.float32)
    return _degrade(I, g), label, M


def _attribute_batch(n: int, seed: int, cfg: WorldConfig, colour: str):
    g = torch.Generator().manual_seed(seed)
    scenes = sample_scenes(n, seed, WorldConfig(glitch_rate=0.25, two_object_rate=0.5, include_held_out=True))
    I = render(scenes, cfg)
    label = torch.tensor([any(o.colour == colour for o in s.objects) for s in scenes], dtype=torch.float32)
    return _degrade(I, g), label


def _smooth(y: torch.Tensor, eps: float = 0.05) -> torch.Tensor:
    """Label smoothing: the logits stay within about +-3, so the reward never saturates and
    fine-tuning always gets a gradient (a saturated sigmoid gives none)."""
    return y * (1 - 2 * eps) + eps


def _fit(reward: Reward, batches, steps: int, lr: float, log) -> Reward:
    opt = torch.optim.AdamW(reward.parameters(), lr=lr)
    for step in range(steps):
        loss = batches(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and (step + 1) % 50 == 0:
            log(f"{reward.name} step {step + 1}/{steps} loss {loss.item():.4f}")
    return reward.eval().requires_grad_(False)


def train_artifact_reward(steps: int = 400, batch: int = 64, seed: int = 0, log=print) -> ArtifactReward:
    """Pixel BCE against the glitch box plus image BCE on the pooled logit."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # scoped init
        reward = ArtifactReward()

    def loss(step):
        I, y, M = _artifact_batch(batch, 10_000_000 + seed * 100_000 + step, TRAIN_WORLD)
        px, img = reward.logits(I)
        return F.binary_cross_entropy_with_logits(img, _smooth(y)) + F.binary_cross_entropy_with_logits(px, _smooth(M))

    return _fit(reward, loss, steps, 3e-3, log)


def train_attribute_reward(steps: int = 300, batch: int = 64, seed: int = 0, colour: str = "red", log=print) -> AttributeReward:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reward = AttributeReward(colour)

    def loss(step):
        I, y = _attribute_batch(batch, 20_000_000 + seed * 100_000 + step, TRAIN_WORLD, colour)
        return F.binary_cross_entropy_with_logits(reward.logit(I), _smooth(y))

    return _fit(reward, loss, steps, 3e-3, log)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Train the tiny world's artifact and attribute rewards.")
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--steps", type=int, default=400)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    save_reward(train_artifact_reward(a.steps), a.out / "tiny_artifact.safetensors")
    save_reward(train_attribute_reward(a.steps), a.out / "tiny_attribute.safetensors")
    print(f"wrote {a.out / 'tiny_artifact.safetensors'} and {a.out / 'tiny_attribute.safetensors'}")


if __name__ == "__main__":
    main()
