"""The tiny shapes world: procedural captioned images with two planted failure modes.

Every image I: [3,H,W] in [0,1] holds one or two shapes (circle, square, triangle) in named palette
colours on a low-saturation background with a gentle gradient. Captions read "a red circle" or
"a red circle and a blue square". Two failure modes mirror the papers:

- artifact (Focus-N-Fix): a fraction `glitch_rate` of training images carries a "glitch", a small
  magenta/black checkerboard patch on the background, never mentioned by the caption (magenta is in
  no palette colour or background, so the glitch is exactly measurable even when blurred);
- composition (Separate-and-Enhance): two-object scenes are rare (`two_object_rate`), and the
  `held_out` two-object combinations never occur in training at all.

Everything is deterministic from a seed (a local `torch.Generator`, no global seeding), and every
image comes with its ground truth (`Scene`: objects with colour, shape, bbox and mask; glitch bbox).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "COLOURS",
    "SHAPES",
    "GLITCH_COLOUR",
    "WORDS",
    "WorldConfig",
    "TRAIN_WORLD",
    "Obj",
    "Scene",
    "caption",
    "parse_caption",
    "is_held_out",
    "all_prompts",
    "sample_scenes",
    "render",
    "make_batch",
    "shape_mask",
]

# Saturated palette (saturation >= 0.75) far from the low-saturation backgrounds and from each other.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
WORDS: tuple[str, ...] = ("a", "and", *COLOURS, *SHAPES)  # every word a caption may use
GLITCH_COLOUR = torch.tensor([1.0, 0.0, 1.0])  # magenta cells of the glitch checkerboard (others black)


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn. The defaults are the training distribution of the shipped model."""

    size: int = 32                 # H = W
    glitch_rate: float = 0.25      # fraction of images with a glitch patch (the artifact to fix)
    two_object_rate: float = 0.15  # fraction of two-object scenes (rare: the compositional weakness)
    include_held_out: bool = False  # False: held-out two-object combinations never occur (training)
    single_size: tuple[int, int] = (10, 18)  # object side/diameter range in pixels, one object
    pair_size: tuple[int, int] = (8, 13)     # ... two objects
    glitch_size: int = 6           # glitch patch side (2-pixel checker cells)
    supersample: int = 4           # anti-aliasing factor of the renderer

    def __post_init__(self):
        if self.size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {self.size}")
        for name in ("glitch_rate", "two_object_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        for name in ("single_size", "pair_size"):
            lo, hi = getattr(self, name)
            if not 4 <= lo <= hi <= self.size // 2 + 2:
                raise ValueError(f"{name} must satisfy 4 <= lo <= hi <= size/2+2, got {(lo, hi)}")


TRAIN_WORLD = WorldConfig()


@dataclass(frozen=True)
class Obj:
    """One shape. bbox = (x0, y0, x1, y1) in pixels, x1/y1 exclusive; the shape fills its s x s box."""

    colour: str
    shape: str
    bbox: tuple[float, float, float, float]


@dataclass
class Scene:
    """Ground truth of one image. masks: [n_obj,H,W] bool (coverage > 0.5); glitch: bbox or None."""

    objects: list[Obj]
    background: tuple[float, ...]  # (r, g, b, gx, gy): base colour and gradient per unit x/y
    glitch: tuple[int, int, int, int] | None = None
    masks: torch.Tensor | None = field(default=None, repr=False)

    @property
    def caption(self) -> str:
        return caption(self.objects)


def caption(objects: list[Obj]) -> str:
    """'a red circle' or 'a red circle and a blue square'."""
    return " and ".join(f"a {o.colour} {o.shape}" for o in objects)


def parse_caption(prompt: str) -> list[tuple[str, str]]:
    """Inverse of `caption`: 'a red circle and a blue square' -> [('red','circle'), ('blue','square')].

    Raises ValueError for a prompt outside the world's grammar.
    """
    words = prompt.lower().replace(",", " ").split()
    out, i = [], 0
    while i < len(words):
        if words[i] in ("a", "and"):
            i += 1
            continue
        if i + 1 < len(words) and words[i] in COLOURS and words[i + 1] in SHAPES:
            out.append((words[i], words[i + 1]))
            i += 2
            continue
        raise ValueError(f"prompt {prompt!r} is not '<a colour shape> [and a colour shape]' "
                         f"(colours {list(COLOURS)}, shapes {list(SHAPES)}); stuck at {words[i]!r}")
    return out


def is_held_out(pair: list[tuple[str, str]]) -> bool:
    """Two-object combinations that never occur in training (about 1 in 4, both orders)."""
    if len(pair) != 2:
        return False
    (c1, s1), (c2, s2) = pair
    ci = list(COLOURS)
    key = (ci.index(c1) + ci.index(c2)) * 3 + SHAPES.index(s1) + SHAPES.index(s2)
    return key % 4 == 1


def all_prompts(n_objects: int, held_out: bool | None = None) -> list[str]:
    """Every caption with 1 or 2 objects (two objects: distinct colours), optionally filtered by `is_held_out`."""
    singles = [(c, s) for c in COLOURS for s in SHAPES]
    if n_objects == 1:
        return [caption([Obj(c, s, (0, 0, 0, 0))]) for c, s in singles]
    if n_objects != 2:
        raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")
    out = []
    for a in singles:
        for b in singles:
            if a[0] != b[0] and (held_out is None or is_held_out([a, b]) == held_out):
                out.append(caption([Obj(*a, (0, 0, 0, 0)), Obj(*b, (0, 0, 0, 0))]))
    return out


def _rand(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def _place(g, size: int, s: int, taken: list[tuple[float, float, float, float]], gap: int) -> tuple | None:
    """A random s x s box inside the image (1 px margin) at least `gap` px from every box in `taken`."""
    for _ in range(50):
        x0, y0 = _randint(g, 1, size - 1 - s), _randint(g, 1, size - 1 - s)
        box = (x0, y0, x0 + s, y0 + s)
        if all(box[0] >= t[2] + gap or t[0] >= box[2] + gap or box[1] >= t[3] + gap or t[1] >= box[3] + gap
               for t in taken):
            return box
    return None


def sample_scenes(n: int, seed: int, cfg: WorldConfig = TRAIN_WORLD, prompts: list[str] | None = None) -> list[Scene]:
    """n random scenes, deterministic from `seed`. With `prompts` (len n), scene i depicts prompts[i].

    Glitches follow `cfg.glitch_rate` in both cases; set it to 0 for clean ground truth.
    """
    if prompts is not None and len(prompts) != n:
        raise ValueError(f"prompts must have n={n} entries, got {len(prompts)}")
    g = torch.Generator().manual_seed(int(seed))
    colours, scenes = list(COLOURS), []
    while len(scenes) < n:
        if prompts is not None:
            spec = parse_caption(prompts[len(scenes)])
        elif _rand(g) < cfg.two_object_rate:
            c = torch.randperm(len(colours), generator=g)[:2].tolist()
            spec = [(colours[c[0]], SHAPES[_randint(g, 0, 2)]), (colours[c[1]], SHAPES[_randint(g, 0, 2)])]
            if not cfg.include_held_out and is_held_out(spec):
                continue
        else:
            spec = [(colours[_randint(g, 0, len(colours) - 1)], SHAPES[_randint(g, 0, 2)])]
        lo, hi = cfg.single_size if len(spec) == 1 else cfg.pair_size
        boxes = []
        for _ in spec:
            box = _place(g, cfg.size, _randint(g, lo, hi), boxes, gap=2)
            if box is None:
                break
            boxes.append(box)
        if len(boxes) != len(spec):
            continue
        glitch = None
        if _rand(g) < cfg.glitch_rate:
            k = cfg.glitch_size
            glitch = _place(g, cfg.size, k, boxes, gap=1)
        grey = _rand(g, 0.25, 0.75)
        tint = [_rand(g, -0.06, 0.06) for _ in range(3)]
        grad = (_rand(g, -0.15, 0.15), _rand(g, -0.15, 0.15))  # change across the whole image
        objects = [Obj(c, s, tuple(float(v) for v in b)) for (c, s), b in zip(spec, boxes)]
        scenes.append(Scene(objects, (grey + tint[0], grey + tint[1], grey + tint[2], *grad), glitch))
    return scenes


def shape_mask(shape: str, bbox, size: int, supersample: int = 1) -> torch.Tensor:
    """Coverage of `shape` filling bbox (x0,y0,x1,y1) on a size x size grid -> [size,size] in [0,1].

    supersample > 1 averages a finer grid (anti-aliased coverage); 1 gives a binary mask at pixel centres.
    """
    k = supersample
    c = (torch.arange(size * k, dtype=torch.float32) + 0.5) / k  # sample coordinates in pixels
    y, x = c[:, None], c[None, :]
    x0, y0, x1, y1 = bbox
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    elif shape == "square":
        m = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    elif shape == "triangle":  # apex at top centre, base at the bottom of the box
        half = (y - y0) / (y1 - y0) * r
        m = (y >= y0) & (y <= y1) & ((x - cx).abs() <= half)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    m = m.float()
    if k > 1:
        m = F.avg_pool2d(m[None, None], k)[0, 0]
    return m


def _background(bg, size: int) -> torch.Tensor:
    r, g_, b, gx, gy = bg
    t = torch.linspace(-0.5, 0.5, size)
    ramp = gx * t[None, :] + gy * t[:, None]  # [H,W]
    return (torch.tensor([r, g_, b])[:, None, None] + ramp).clamp(0, 1)  # [3,H,W]


def render(scenes: list[Scene], cfg: WorldConfig = TRAIN_WORLD) -> torch.Tensor:
    """Draw scenes (and fill each scene's `masks`). -> I: [B,3,H,W] in [0,1]."""
    S = cfg.size
    out = torch.empty(len(scenes), 3, S, S)
    for i, sc in enumerate(scenes):
        img = _background(sc.background, S)
        masks = []
        for o in sc.objects:
            alpha = shape_mask(o.shape, o.bbox, S, cfg.supersample)  # [H,W]
            img = alpha * torch.tensor(COLOURS[o.colour])[:, None, None] + (1 - alpha) * img
            masks.append(alpha > 0.5)
        if sc.glitch is not None:  # 2-pixel magenta/black checkerboard
            x0, y0, x1, y1 = sc.glitch
            yy, xx = torch.meshgrid(torch.arange(y1 - y0), torch.arange(x1 - x0), indexing="ij")
            img[:, y0:y1, x0:x1] = ((yy // 2 + xx // 2) % 2).float() * GLITCH_COLOUR[:, None, None]
        sc.masks = torch.stack(masks)
        out[i] = img
    return out


def make_batch(n: int, seed: int, cfg: WorldConfig = TRAIN_WORLD, prompts: list[str] | None = None):
    """n images with captions and ground truth. -> (I: [n,3,H,W] in [0,1], captions: list[str], scenes)

    >>> I, captions, scenes = make_batch(2, seed=0)
    >>> I.shape
    torch.Size([2, 3, 32, 32])
    """
    scenes = sample_scenes(n, seed, cfg, prompts)
    return render(scenes, cfg), [s.caption for s in scenes], scenes
