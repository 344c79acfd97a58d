"""Trainers: Focus-N-Fix and Separate-and-Enhance, each an iterator of `StepRecord`s (STYLE rule 9).

Focus-N-Fix (Xing et al., CVPR 2025), eq. (2): L = -r(I) + lam * ||(1 - M(I0)) * (I0 - I)||_F, where I0 is the
base model's image for the same prompt and noise and M(I0) marks the region that may change; I is sampled
with the LoRA, gradients through the last K steps only (DRaFT-K, Clark et al. 2024).
Separate-and-Enhance (Bao et al., SIGGRAPH 2024): LoRA on cross-attention to_k, losses on the object tokens'
cross-attention maps, plus a preservation term that keeps single-object prompts as the base model draws them.

A trainer never prints, saves or draws: the consumer (CLI, ComfyUI node, test) shows progress, cancels by
breaking the loop and saves what it has (`save_state`, or the LoRA itself).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import numbers
import os
import re
import signal
import threading
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, ContextManager, Iterator, Sequence, TypeVar

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint as _checkpoint

from . import __version__
from .attention import AttentionStore, map_size
from .denoisers import (MODEL_MEMBERS, CFGDenoiser, Cond, DiffusionModel, cat_cond, index_cond, initial_x,
                        missing_members, model_guidance, prepare_cond)
from .io import atomic_torch_save, load_training_state
from .losses import (NonFiniteScoreError, _as_mask4, enhance_loss, key_change_loss, preservation_loss, region_loss,
                     resize_mask, reward_loss, separate_loss)
from .lora import LoRA, MergedWhenNoGrad, base_model_metadata, steps_trained
from .records import StepRecord
from .rewards.clip_vision import CLIPVisionTower
from .rewards.base import Reward
from .saliency import SALIENCY_METHODS, check_mask, check_mask_settings, check_threshold, mask_from_reward, mask_noise
from .sampler import (COMPILE_MODES, SAMPLERS, CompiledWhenNoGrad, check_sigmas, check_steps, checkpointed_modules,
                      compile_denoiser, sample, sampling_sigmas, seed_noise)

__all__ = [
    "parse_ints",
    "repeated_seeds_note",
    "repeated_prompts_note",
    "batch_note",
    "unchanged_notes",
    "FixConfig",
    "FixTrainer",
    "SeparateEnhanceConfig",
    "SeparateEnhanceTrainer",
    "NonFiniteLossError",
    "split_objects_prompt",
    "check_continued_method",
    "trainer_on",
    "METHOD_TRAINERS",
    "split_words",
    "stop_as_interrupt",
    "interrupts_held",
    "check_state_format",
    "STATE_FORMAT",
    "MAX_RANK",
]

MASK_SOURCES = ("heatmap", "saliency", "mask", "none")
PRESERVATIONS = ("auto", "keys", "outputs")
# layers whose input is the prompt's text alone: a LoRA only there changes a prompt's image only through them
_TEXT_SIDE = re.compile(r"(^|\.)attn2\.(to_k|to_v)$")


class _StopForward(Exception):
    """Raised inside the net once the last attention layer the maps need has run."""


class NonFiniteLossError(ValueError):
    """The loss or a gradient became NaN/inf; the LoRA keeps the weights of the last good step."""


def _check_choice(name, value, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")


def _check_positive(name, value, allow_zero=False):
    if not (value >= 0 if allow_zero else value > 0) or not math.isfinite(value):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_whole(name, value, least):
    """A count: a whole number >= least (a fractional rank or a NaN iteration count would be cut silently)."""
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value == int(value) and value >= least):
        raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}")


_T = TypeVar("_T")  # a trainer (`trainer_on`)
MAX_RANK = 256  # also the nodes' rank widget; rank 100000 wrote a 1.9 GB LoRA of the tiny model and ruined its images
MAX_SEED = 2**64 - 1  # KSampler's seed widget goes up to 0xffffffffffffffff


def _check_seed(name, value):
    if not 0 <= value <= MAX_SEED:  # a torch generator takes 64 bits; KSampler's widget the same range
        raise ValueError(f"{name}: {value} is outside 0 to {MAX_SEED} (KSampler's seed range)")


# fields renamed since states were first saved: old name -> new (a state saved before reads as the same run)
_RENAMED_CONFIG_FIELDS = {"sampler": "sampler_name"}


@dataclass(frozen=True)
class _LoRAConfig:
    lr: float = 1e-3
    rank: int = 4
    alpha: float | None = None          # None -> alpha = rank (scale 1)
    targets: str | tuple[str, ...] = "attn"
    iterations: int = 50
    batch_size: int = 1
    seed: int = 0                       # the new LoRA's start, the item order, the training noise
    grad_clip: float = 1.0              # max adapter gradient norm; 0 = off

    def _check_common(self):
        _check_seed("seed", self.seed)
        _check_positive("lr", self.lr)
        # AdamW's first step is lr / (1 - beta1) = 10 lr, a float32 beside the adapters: above this it overflowed
        # in torch ("value cannot be converted to type float without overflow"), not in our NaN guard
        top = torch.finfo(torch.float32).max / 10
        if self.lr > top:
            raise ValueError(f"lr must be at most {top:.3g} (AdamW's first step, 10 lr, is a float32), got {self.lr}")
        for name in ("rank", "iterations", "batch_size"):
            _check_whole(name, getattr(self, name), 1)
            object.__setattr__(self, name, int(getattr(self, name)))  # 4.0 (a JSON number) is the count 4
        if self.rank > MAX_RANK:
            raise ValueError(f"rank must be at most {MAX_RANK}, got {self.rank} (a low-rank adapter: 4 to 64 is usual)")
        if self.alpha is not None:
            _check_positive("alpha", self.alpha)
        _check_positive("grad_clip", self.grad_clip, allow_zero=True)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class FixConfig(_LoRAConfig):
    """Focus-N-Fix / DRaFT settings. Items are all (prompt, seed) pairs; I0 and M are cached per item."""

    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    negative_prompt: str = ""
    height: int = 512                   # image size in pixels (latents are height // latent_scale)
    width: int = 512
    steps: int = 20                     # sampler steps N (len(sigmas) - 1 when sigmas are given)
    sampler_name: str = "ddim"          # ddim (= euler) | dpmpp_2m: KSampler's deterministic samplers
    scheduler: str = "normal"           # a name the model knows (schedules.SCHEDULERS; ComfyUI: its own list)
    sigmas: tuple[float, ...] = ()      # an explicit schedule, [steps + 1] ending at 0; replaces steps and scheduler
    cfg_scale: float = 5.0              # the nodes' and CLI's `cfg` (KSampler's name): `cfg` names configs here
    K: int = 1                          # DRaFT-K: differentiated last steps
    lv_copies: int = 0                  # DRaFT-LV re-noised copies of the last step (0 = off)
    lam: float = 1.0                    # λ, weight of the region term; 0 = plain DRaFT (region still logged)
    reward_target: float | None = None  # no more push on an image once its reward reaches this (None: unbounded)
    mask_source: str = "heatmap"        # heatmap | saliency | mask (painted, `masks`) | none (plain DRaFT)
    mask_space: str = "pixel"           # pixel | latent: where the region term compares I0 and I
    saliency_method: str = "grad"       # grad | smoothgrad | grad_x_input
    blur_sigma: float = 2.0
    threshold_mode: str = "top_percent" # value | top_percent | otsu
    threshold: float = 0.15             # top 15 % of the heatmap may change, by default
    dilation: int = 2                   # pixels added around the mask
    feather: float = 0.0
    compile: str = "off"                # off | default | reduce-overhead | max-autotune: the graph-free steps

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(p.strip() for p in self.prompts if p and p.strip()))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "targets", self.targets if isinstance(self.targets, str) else tuple(self.targets))
        if not self.prompts:
            raise ValueError("prompts is empty: give at least one non-empty prompt")
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed")
        for s in self.seeds:
            _check_seed("seeds", s)
        self._check_common()
        _check_choice("sampler_name", self.sampler_name, SAMPLERS)
        if not isinstance(self.scheduler, str) or not self.scheduler:
            raise ValueError(f"scheduler must be a scheduler's name, got {self.scheduler!r}")
        if self.sigmas:
            object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
            check_sigmas(self.sigmas)
            object.__setattr__(self, "steps", len(self.sigmas) - 1)
            if self.K > self.steps:
                raise ValueError(f"K ({self.K}) is more than the {self.steps} steps of the sigmas: lower K or give "
                                 f"sigmas with more steps")
        check_steps(self.steps, self.K, least_K=1)
        if self.lv_copies < 0:
            raise ValueError(f"lv_copies must be >= 0, got {self.lv_copies}")
        if self.lv_copies and self.K != 1:
            raise ValueError(f"lv_copies > 0 (DRaFT-LV) differentiates only the re-noised copies of the last step: "
                             f"set K to 1 (now {self.K})")
        _check_positive("lam", self.lam, allow_zero=True)
        if self.reward_target is not None and not math.isfinite(self.reward_target):
            raise ValueError(f"reward_target must be a finite number, got {self.reward_target} (no target: leave it "
                             f"unset)")
        _check_positive("cfg_scale", self.cfg_scale)
        _check_choice("mask_source", self.mask_source, MASK_SOURCES)
        if self.mask_source in ("heatmap", "saliency"):  # before any image is sampled
            check_threshold(self.threshold_mode, self.threshold)
            check_mask_settings(self.blur_sigma, self.dilation, self.feather)
            _check_choice("saliency_method", self.saliency_method, SALIENCY_METHODS)
        _check_choice("mask_space", self.mask_space, ("pixel", "latent"))
        _check_choice("compile", self.compile, COMPILE_MODES)
        if self.height < 8 or self.width < 8:
            raise ValueError(f"width and height must be >= 8 pixels, got {self.width}x{self.height}")

    @property
    def items(self) -> list[tuple[str, int]]:
        return [(p, s) for p in self.prompts for s in self.seeds]


MAX_INTS = 10_000  # seeds in one list: 10 000 items already hold over 100 GB of images at 512² (`_check_host_memory`)


def repeated_seeds_note(seeds: Sequence[int], name: str = "seeds") -> list[str]:
    """A note naming the seeds given more than once ([] when none is): each repeat trains the same image again."""
    repeated = sorted(s for s, n in Counter(seeds).items() if n > 1)
    return [f"{name} repeat {repeated}: each repeat trains the same image again (counts it more)"] if repeated else []


def repeated_prompts_note(prompts: Sequence[str], name: str = "prompts", objects: Sequence[Sequence[str]] = ()
                          ) -> list[str]:
    """A note naming the prompts given more than once, compared as trained (stripped; with Separate-and-Enhance's
    `objects`, a prompt with the same object words; [] when none is): each repeat trains the same item again, as a
    repeated seed does."""
    if objects:
        prompts = [f"{p.strip()} | {', '.join(o)}" for p, o in zip(prompts, objects)]
    repeated = [p for p, n in Counter(p.strip() for p in prompts if p.strip()).items() if n > 1]
    if not repeated:
        return []
    again = "prompt again (counts it more)" if objects else "images again (counts them more)"
    return [f"{name} repeat {repeated}: each repeat trains the same {again}"]


def unchanged_notes(history: Sequence[StepRecord], reward_target: float | None, name: str = "reward_target",
                    unbounded: str = "leave it unset to never stop") -> list[str]:
    """A report line when no step moved the LoRA (every gradient exactly 0), which otherwise looks like a normal
    run: with a reward_target (the setting's `name`) every image was already at it. `unbounded`: how to set none."""
    if not history or any(r.grad_norm != 0 for r in history):
        return []
    why = (f"every image's reward was already at or above {name} ({reward_target:g}; the first step's mean reward "
           f"was {history[0].reward:.4g}), where the reward stops pushing: raise {name}, or {unbounded}"
           if reward_target is not None else "the loss gave no gradient")
    return [f"the LoRA did not change: every step's gradient was 0 ({why})"]


def batch_note(batch_size: int, n_items: int, name: str = "batch_size") -> list[str]:
    """A note when a batch is larger than the (prompt, seed) items: an item always gives the same trajectory, so
    a step would compute some of them more than once."""
    if batch_size <= n_items or n_items < 1:  # no items: the empty prompts or seeds are refused by name elsewhere
        return []
    # on average: a batch takes the rest of one shuffled pass and then whole ones, so one item may come once more
    return [f"{name} {batch_size} is more than the {n_items} (prompt, seed) items: a step computes each of them "
            f"{batch_size / n_items:.3g} times on average (add seeds or prompts, or lower {name})"]


def parse_ints(text: str, name: str = "seeds") -> list[int]:
    """'0, 1, 5-7' -> [0, 1, 5, 6, 7] (the seeds of the nodes and the CLI); ValueError quoting the bad part."""
    out: list[int] = []
    for part in re.split(r"[,\s]+", str(text).strip()):
        if not part:
            continue
        m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(f"{name}: {part!r} is not an integer or a range like 3-5 (got {text!r})")
        if max(len(g.lstrip("-0")) for g in m.groups() if g) > len(str(MAX_SEED)):  # before int(): its limit
            raise ValueError(f"{name}: {part[:24]!r}... ({len(part)} characters) is outside 0 to {MAX_SEED} "
                             f"(KSampler's seed range)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo < 0 or hi > MAX_SEED:  # KSampler's seed range: a seed outside it could not be drawn again there
            raise ValueError(f"{name}: {part!r} is outside 0 to {MAX_SEED} (KSampler's seed range)")
        if hi < lo or hi - lo > 1000:
            raise ValueError(f"{name}: range {part!r} must go up and hold at most 1001 values")
        out += range(lo, hi + 1)
        if len(out) > MAX_INTS:  # checked as it grows: a pasted wall of ranges stops here, not in RAM
            raise ValueError(f"{name} holds over {MAX_INTS} values (at {part!r}): give at most {MAX_INTS}")
    if not out:
        raise ValueError(f"{name} is empty: give at least one integer, e.g. 0, 1, 2")
    return out


def split_words(text: str) -> list[str]:
    """"cat, dog; bird" -> ["cat", "dog", "bird"]: object words are separated by ',' or ';' (the Train
    Separate-and-Enhance lines and the Attention Maps words alike)."""
    return [w.strip() for w in re.split(r"[,;]", str(text)) if w.strip()]


def _check_distinct_words(prompt: str, objects: Sequence[str]) -> None:
    """The same word twice trains one token's map against itself: refuse it, naming the word."""
    seen: dict[str, str] = {}
    for w in objects:
        key = " ".join(w.lower().split())
        if key in seen:
            raise ValueError(f"prompt {prompt!r} names the object {seen[key]!r} twice: each object needs its own "
                             f"words, e.g. 'a black cat and a white cat | black cat, white cat'")
        seen[key] = w


def split_objects_prompt(line: str) -> tuple[str, list[str]]:
    """"a cat and a dog | cat, dog" -> ("a cat and a dog", ["cat", "dog"])."""
    if "|" not in line:
        raise ValueError(f"prompt line {line!r} needs object words after '|', e.g. 'a cat and a dog | cat, dog'")
    if line.count("|") > 1:  # which '|' ends the prompt is a guess: the words would take the rest of the prompt
        raise ValueError(f"prompt line {line!r} has {line.count('|')} '|': write the prompt, one '|', then the "
                         f"object words, e.g. 'a cat and a dog | cat, dog'")
    prompt, words = line.split("|", 1)
    if not prompt.strip():
        raise ValueError(f"prompt line {line!r} has no prompt before '|', e.g. 'a cat and a dog | cat, dog'")
    objects = split_words(words)
    if len(objects) < 2:
        raise ValueError(f"prompt line {line!r} needs at least two object words, got {objects}")
    _check_distinct_words(prompt.strip(), objects)
    return prompt.strip(), objects


def _names(part: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", part, re.I) is not None


# the trainer each saved method belongs to: DRaFT is Focus-N-Fix with lam 0 (mask_source none)
METHOD_TRAINERS = {"focus-n-fix": "focus-n-fix", "draft": "focus-n-fix",
                   "separate-and-enhance": "separate-and-enhance"}


def check_size(width: int, height: int, scale: int) -> None:
    """ValueError unless width and height (pixels) are multiples of the model's `latent_scale` (8 for SD's VAE)."""
    if width % scale or height % scale:
        raise ValueError(f"width and height must be multiples of {scale} for this model, got {width}x{height}")


def trainer_on(make: Callable[[LoRA | None], _T], lora: LoRA | None) -> _T:
    """make(lora): a trainer on `lora`, already hooked onto the net (a continued or resumed LoRA; None: the
    trainer attaches a new one). `lora` is removed again if the trainer cannot be built: the net is left as it
    was."""
    try:
        return make(lora)
    except BaseException:
        if lora is not None:
            lora.remove()
        raise


def check_continued_method(saved: str, method: str, name: str, apply_first: str) -> None:
    """Refuse to train a LoRA further under another method than its own (`method`: "focus-n-fix" or
    "separate-and-enhance"). The run would relabel it, and the other method's loss would work against it (S&E's
    preservation pulls single-object prompts back to the MODEL without it, undoing part of a fix). `name` names
    the LoRA, `apply_first` how to build on it instead."""
    if METHOD_TRAINERS.get(saved, saved) != method:
        raise ValueError(f"{name} is a {saved} LoRA: this {method} run trains only LoRAs of its own method further. "
                         f"To build on it, {apply_first}")


def _without_weights(prompt: str) -> str:
    """The prompt without ComfyUI's emphasis syntax: '(a cat and a dog:1.2)' -> 'a cat and a dog'. Split
    parts of it kept unbalanced '(' and ':1.2)', which the text encoder reads as literal tokens. Escaped
    parentheses (\\( \\)), literal text to ComfyUI, stay."""
    plain = re.sub(r"(?<!\\):\s*[-+]?(?:\d+\.?\d*|\.\d+)\s*(?=\))", "", prompt)  # ':1.2' before a ')'
    return re.sub(r"(?<!\\)[()]", "", plain)


def _single_object_prompts(prompt: str, objects: Sequence[str]) -> list[str]:
    """Preservation prompts, one per object: the prompt's part around ' and ' / ',' that names this object and
    no other one ('a red circle' of 'a red circle and a blue square'), else 'a <word>' (the reference code uses
    'a photo of <word>'). A part naming two objects ('a cat next to a dog') would hold the very composition
    the training changes."""
    # "and" as a word of its own: "black-and-white cat" is one object's part
    parts = [p.strip() for p in re.split(r"(?<![\w-])and(?![\w-])|,", _without_weights(prompt), flags=re.I)
             if p.strip()]
    out = []
    for w in objects:
        hit = [p for p in parts if _names(p, w)]
        alone = len(hit) == 1 and not any(_names(hit[0], o) for o in objects if o.lower() != w.lower())
        out.append(hit[0] if alone else f"a {w}")
    return out


@dataclass(frozen=True)
class SeparateEnhanceConfig(_LoRAConfig):
    """Separate-and-Enhance settings. `objects[i]` are the object words of `prompts[i]`.

    Where this differs from the reference code (adobe/SeperateAndEnhance), on purpose:
    - `t_range` (0.5, 1): steps are drawn from the noisier half of the schedule, where the layout is decided; the
      reference draws t uniformly over all of it.
    - the random latents are z ~ N(0, I), the statistics of real SD latents after their scaling; the reference
      uses randn * 0.18215.
    - the preservation term: `keys` is the keys' relative change, and `outputs` the x0 MSE; the reference's is
      the eps MSE on "a photo of <word>" prompts. For an eps model x0 = x - sigma * eps, so `outputs` is sigma^2
      times the eps MSE (about 40x on average for SD1.5 in the default t_range, most at the noisiest steps):
      `lam_preserve` is on another scale than the reference's weight, and than `keys`.
    """

    prompts: tuple[str, ...] = ()
    objects: tuple[tuple[str, ...], ...] = ()
    # single-object prompts: each object's own part of its prompt, or "a <word>"; never a part naming two objects
    preserve_prompts: tuple[str, ...] = ()
    targets: str | tuple[str, ...] = "to_k"  # the paper: tuning values collapses the model
    lam_sep: float = 1.0
    lam_en: float = 1.0
    lam_preserve: float = 1.0
    # "keys": relative change of the adapted to_k/to_v outputs on the preserve prompts' text (exact for their
    # conditional prediction, no UNet pass; only for LoRAs on those layers); "outputs": x0 MSE against the
    # adapters-disabled model on random noisy latents (any targets, two more UNet passes per step); "auto": keys
    # where possible
    preservation: str = "auto"
    t_range: tuple[float, float] = (0.5, 1.0)  # fraction of the training timesteps (1 = pure noise)
    resolution: int = 16                     # attention maps' shorter side (16 for SD at 512 px; `map_size`)
    height: int = 512
    width: int = 512

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(p.strip() for p in self.prompts))
        object.__setattr__(self, "objects", tuple(tuple(o) for o in self.objects))
        object.__setattr__(self, "targets", self.targets if isinstance(self.targets, str) else tuple(self.targets))
        if not self.prompts or not all(self.prompts):
            raise ValueError("prompts is empty: give at least one prompt with two or more objects")
        if len(self.objects) != len(self.prompts):
            raise ValueError(f"objects must give words for each prompt: {len(self.prompts)} prompts, "
                             f"{len(self.objects)} object lists")
        for p, o in zip(self.prompts, self.objects):
            if len(o) < 2:
                raise ValueError(f"prompt {p!r} needs at least two object words, got {list(o)}")
            _check_distinct_words(p, o)
        self._check_common()
        for name in ("lam_sep", "lam_en", "lam_preserve"):
            _check_positive(name, getattr(self, name), allow_zero=True)
        if self.lam_sep == 0 and self.lam_en == 0:  # the LoRA starts at zero, where preservation has no gradient
            raise ValueError("lam_sep and lam_en are both 0: Separate-and-Enhance has nothing to train (lam_preserve "
                             "only holds the model as it is); give lam_sep or lam_en a weight")
        _check_choice("preservation", self.preservation, PRESERVATIONS)
        if not (len(self.t_range) == 2 and 0.0 <= self.t_range[0] < self.t_range[1] <= 1.0):
            raise ValueError(f"t_range must be (lo, hi) with 0 <= lo < hi <= 1, got {self.t_range}")
        if not self.preserve_prompts and self.lam_preserve > 0:
            derived = [q for p, o in zip(self.prompts, self.objects) for q in _single_object_prompts(p, o)]
            object.__setattr__(self, "preserve_prompts", tuple(dict.fromkeys(derived)))  # each once, in order


@contextmanager
def _frozen(*modules: nn.Module):
    """Freeze the host weights for a step (only the adapters learn), restoring the flags afterwards."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _fp16_in_gradient_path(model) -> bool:
    """Does backward pass through float16 compute? The model's `compute_dtypes` where it names them (ComfyUI
    computes fp8-stored weights in fp16 or bf16), else the dtypes of the net's and decoder's weights."""
    dtypes = getattr(model, "compute_dtypes", None)
    if dtypes is None:
        dtypes = {p.dtype for m in (model.net, *_decoders(model)) for p in m.parameters()}
    return torch.float16 in set(dtypes)


def _check_loss_scaling(device_type: str, version: str) -> None:
    """Refuse fp16 training where torch's GradScaler cannot run: on Apple's MPS before torch 2.8 its unscale
    step casts to float64, which MPS lacks (pytorch#142397), and the first step would crash."""
    major_minor = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if device_type == "mps" and major_minor < (2, 8):
        raise ValueError(f"this model computes in fp16, and training it on Apple's MPS needs torch 2.8 or newer "
                         f"(this is {version}): update ComfyUI's torch, or start ComfyUI with --force-fp32")


def physical_memory_bytes() -> int | None:
    """This machine's RAM in bytes; None where it cannot be read (then nothing is checked against it)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # Linux, macOS
    except (AttributeError, ValueError, OSError):
        pass
    try:
        import psutil  # not ours to require: ComfyUI installs it (Windows has no sysconf)
    except ImportError:
        return None
    return int(psutil.virtual_memory().total)


def _digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's shape and values (CPU bytes): a short fingerprint to store in a training state."""
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


_ADAM_SETTINGS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")  # what shapes an update

STATE_FORMAT = 1  # the layout of a training state (`state_dict`): raise it when an older FocusFix would misread it


def check_state_format(state) -> None:
    """Refuse a training state written in a newer layout than this FocusFix reads (states from before the
    field read as format 1): it would be misread, or refused with a message about the wrong part."""
    fmt = state.get("format", 1) if isinstance(state, dict) else 1
    if type(fmt) is not int or fmt < 1:
        raise ValueError(f"the training state is invalid: format must be an int >= 1, got {str(fmt)[:60]!r}")
    if fmt > STATE_FORMAT:
        by = state.get("focusfix_version")
        raise ValueError(f"the training state was written by a newer FocusFix"
                         f"{f' ({by})' if isinstance(by, str) else ''} in format {fmt}; this FocusFix "
                         f"({__version__}) reads format {STATE_FORMAT} or older: update FocusFix to resume it, "
                         f"or start a new run")


def _check_training_state(state, trainer: _LoRATrainer
                          ) -> tuple[int, list[StepRecord], tuple[dict[str, str], str]]:
    """Check every part of a training state (`_LoRATrainer.state_dict`) against `trainer` before any of it is
    used: a corrupt or crafted state.pt then fails at once, naming the part, not mid-run or after training.

    Returns:
        (step, history, (continued, continued_from)), parsed.

    Raises:
        ValueError: another method or other settings, more steps than iterations, or an invalid part.
    """
    def invalid(what: str) -> ValueError:  # `what` ends with the value found, cut short if long
        return ValueError(f"the training state is invalid: {what if len(what) < 300 else what[:296] + ' ...'}")

    if not isinstance(state, dict):
        raise invalid(f"expected a dict of the run's step, lora, optimizer and rng, got {type(state).__name__}")
    check_state_format(state)
    if state.get("method") != trainer.method:
        raise ValueError(f"training state is for method {state.get('method')!r}, not {trainer.method!r}")
    missing = [k for k in ("config", "step", "lora", "optimizer", "rng") if k not in state]
    if missing:
        raise invalid(f"it lacks {missing}")
    try:
        saved = json.loads(state["config"])
    except (TypeError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        raise invalid(f"config must be the run's settings as a JSON object, got {str(state['config'])[:60]!r}")
    saved = {_RENAMED_CONFIG_FIELDS.get(k, k): v for k, v in saved.items()}
    now = json.loads(trainer.cfg.to_json())
    # a setting added since the state was saved matches only at its "off" value (no sigmas, no negative prompt:
    # what that FocusFix did); any other value the state cannot have held
    free = ("iterations", "compile")  # what a resume may change
    unrecorded = [k for k in sorted(now) if k not in saved and k not in free and now[k] not in (None, [], "", 0)]
    differ = [k for k in sorted(saved) if k not in free and saved[k] != now.get(k)]
    if unrecorded:  # no setting can match a value the state never held ("sampler_name None (now 'ddim')")
        raise ValueError(f"the training state was saved by an older FocusFix, which did not record "
                         f"{', '.join(map(repr, unrecorded[:4]))}{' ...' if len(unrecorded) > 4 else ''}: it cannot be "
                         f"resumed as the same run. Train its LoRA further in a new run instead (continue_from its "
                         f"lora.safetensors)")
    changed = [f"{k} {saved.get(k)!r} (now {now.get(k)!r})" for k in differ]
    if changed:
        raise ValueError(f"the training state was saved by a run with other settings: {'; '.join(changed[:4])}"
                         f"{' ...' if len(changed) > 4 else ''}. Resume with the same settings (only the "
                         f"iterations may change), or start a new run")
    reward = getattr(trainer, "reward", None)  # states saved before the reward was recorded have none to compare
    now_reward = None if reward is None else json.dumps(_describe(reward))
    if "reward" in state and now_reward is not None and state["reward"] != now_reward:
        raise ValueError(f"the training state was saved by a run with reward {str(state['reward'])[:120]} (now "
                         f"{now_reward[:120]}). Resume with the same reward, or start a new run")
    weights = state.get("weights")  # states saved before the weights were recorded have none to compare
    if weights is not None:
        if not (isinstance(weights, dict) and all(isinstance(v, str) for v in weights.values())):
            raise invalid(f"weights must map the frozen modules to their sha256, got {str(weights)[:60]!r}")
        other = [k for k, v in trainer.weights_digest().items() if k in weights and weights[k] != v]
        if other:
            raise ValueError(f"the training state was saved by a run with another {' and '.join(other)} (the same "
                             f"name and settings, other weights). Resume with the {' and '.join(other)} it trained "
                             f"against, or start a new run")
    painted = getattr(trainer, "_painted_digest", None)
    if "painted" in state and painted is not None and state["painted"] != painted:
        raise ValueError("the training state was saved by a run with other painted masks: resume with the same "
                         "masks (the same images, in the same order), or start a new run")
    step = state["step"]
    if type(step) is not int or step < 0:  # type(): a bool is an int too
        raise invalid(f"step must be an int >= 0, got {step!r}")
    if step > trainer.cfg.iterations:
        raise ValueError(f"iterations ({trainer.cfg.iterations}) is below the {step} steps the training state "
                         f"already holds: give more iterations to resume")

    own, lora = trainer.lora.state_dict(), state["lora"]
    if not isinstance(lora, dict) or set(lora) != set(own):
        keys = set(lora) if isinstance(lora, dict) else set()
        raise invalid(f"lora must hold this run's {len(own)} adapter tensors; missing {sorted(set(own) - keys)[:3]}, "
                      f"unexpected {sorted(map(str, keys - set(own)))[:3]}")
    for k, v in lora.items():
        if not isinstance(v, torch.Tensor) or v.shape != own[k].shape:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise invalid(f"lora {k!r} is {shape}, expected shape {tuple(own[k].shape)}")
        if not v.is_floating_point():
            raise invalid(f"lora {k!r} is {v.dtype}, expected a float dtype")
        if not torch.isfinite(v.float()).all():
            raise invalid(f"lora {k!r} holds NaN or inf values")

    rng = state["rng"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.ndim != 1:
        raise invalid(f"rng must be a generator state (1-D torch.uint8 tensor), got "
                      f"{rng.dtype if isinstance(rng, torch.Tensor) else type(rng).__name__}")
    try:
        torch.Generator().set_state(rng)  # a scratch generator: the size must be a CPU generator's
    except RuntimeError as e:
        raise invalid(f"rng is not a CPU generator's state ({str(e).splitlines()[0]})") from None

    scratch = torch.optim.AdamW(trainer.params)  # the trainer's optimizer kind; loading into it changes nothing
    try:
        scratch.load_state_dict(state["optimizer"])
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as e:
        raise invalid(f"optimizer does not fit this run's LoRA ({type(e).__name__}: {e})") from None
    for p, moments in scratch.state.items():  # load_state_dict checks counts, not shapes: a step would fail
        for k, v in moments.items():
            if isinstance(v, torch.Tensor) and v.ndim and (v.shape != p.shape or not torch.isfinite(v).all()):
                raise invalid(f"optimizer {k!r} has shape {tuple(v.shape)} or non-finite values, expected "
                              f"finite values of shape {tuple(p.shape)}")
            if isinstance(v, torch.Tensor) and not v.ndim and not (torch.isfinite(v) and v >= 0):  # Adam's count
                raise invalid(f"optimizer {k!r} is {v.item()}, expected a finite count >= 0")
    # the settings of this run's optimizer (lr, betas, eps, ...), which the config already matched: others (an
    # edited or damaged file) would train with what no setting says, or fail inside the first step
    for saved_group, group in zip(scratch.param_groups, trainer.optimizer.param_groups):
        odd = [k for k in _ADAM_SETTINGS if k in group and saved_group.get(k) != group[k]]
        if odd:
            raise invalid(f"optimizer {odd[0]} is {saved_group.get(odd[0])!r}, but this run's is {group[odd[0]]!r}")

    if hasattr(trainer, "items") and "order" in state:  # FixTrainer: the items left of the current pass
        order, n = state["order"], len(trainer.items)
        if (not isinstance(order, torch.Tensor) or order.dtype != torch.long or order.ndim != 1
                or not ((order >= 0) & (order < n)).all() or len(order.unique()) != len(order)):
            raise invalid(f"order must be distinct item indices in 0..{n - 1} (a 1-D int64 tensor), got "
                          f"{order.tolist() if isinstance(order, torch.Tensor) else order!r}")

    scaler = state.get("scaler")
    if trainer.scaler is not None and scaler is not None:
        fields = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
        if (not isinstance(scaler, dict) or not all(isinstance(scaler.get(f), (int, float)) for f in fields)
                or not 0 < scaler["scale"] < math.inf):
            raise invalid(f"scaler must be a GradScaler state with {list(fields)} and a finite scale > 0, "
                          f"got {scaler!r}")

    history = state.get("history", [])
    try:
        if not isinstance(history, list):
            raise TypeError(f"expected a list, got {type(history).__name__}")
        history = [StepRecord(**json.loads(r)) for r in history]
    except (TypeError, ValueError) as e:
        raise invalid(f"history must list the steps' records as JSON ({e})") from None
    try:
        continued = json.loads(state.get("continued", "{}"))
    except (TypeError, ValueError):
        continued = None
    if not isinstance(continued, dict) or not all(isinstance(v, str) for v in continued.values()):
        raise invalid(f"continued must be the continued LoRA's metadata as a JSON object of strings, got "
                      f"{state.get('continued')!r}")
    source = state.get("continued_from", "")  # states saved before it was kept have none
    if not isinstance(source, str):
        raise invalid(f"continued_from must be the continued LoRA's file name, got {source!r}")
    return step, history, (continued, source)


def _release_failed_backward(device: torch.device) -> None:
    """Run an empty backward on `device`. A step whose backward stopped midway (out of memory, a cancel, an error
    in a block's recompute) leaves its graph with autograd until the next backward on that device: an artist's
    retry with lower settings would sample its base images beside it (hygiene review, 2)."""
    try:
        with torch.inference_mode(False), torch.enable_grad():
            torch.zeros((), device=device, requires_grad=True).backward()
    except Exception:  # a broken device: the error being raised says more
        pass


class _KeepWritten(TorchDispatchMode):
    """Holds every saved tensor an op writes into until the step's backward is done (`allow_mutation_on_saved_tensors`
    context `ctx`, entered just before this mode). That context clones such a tensor and finds the clone again by
    the tensor's (id, data_ptr, version) alone: once the written tensor was freed, a new tensor that CPython and the
    allocator placed at the same id and address, at the same version, got the old one's clone in the backward. Seen
    with FreeU_V2 (it scales a block's output in place) on Python 3.13: a recomputed block got a 32-channel clone
    for its 64-channel input; with equal shapes it would have been wrong gradients without an error."""

    def __init__(self, ctx) -> None:
        super().__init__()
        self.ctx, self.kept = ctx, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, is_out, name in _written_args(func):
            written = kwargs.get("out") if is_out else args[i] if i < len(args) else kwargs.get(name)
            for t in written if isinstance(written, (list, tuple)) else (written,):
                if isinstance(t, torch.Tensor) and _saved_id(t) in self.ctx.sid_to_tid:
                    self.kept.append(t)
        return func(*args, **kwargs)

    def __exit__(self, *exc):
        self.kept.clear()
        return super().__exit__(*exc)


@functools.cache
def _written_args(func) -> tuple[tuple[int, bool, str], ...]:
    """(position, is_out, name) of each argument an op writes into; most ops write none (read once per op)."""
    return tuple((i, a.is_out, a.name) for i, a in enumerate(func._schema.arguments)
                 if a.alias_info is not None and a.alias_info.is_write)


def _saved_id(t: torch.Tensor) -> tuple[int, int]:
    """(data_ptr, version), the key `allow_mutation_on_saved_tensors` files a saved tensor's storage under."""
    try:
        return t.data_ptr(), t._version
    except RuntimeError:  # a tensor without storage (fake, functional): torch files them under 0
        return 0, t._version


class _MutationContext:
    """`allow_mutation_on_saved_tensors` entered at a step's first call with grad enabled (`enter`: a forward
    pre-hook on the net, or `FixTrainer._differentiated`) and left by `end()`, after the backward, which reads the
    copies it keeps. `before_backward()` notes whether the graph needed it: a saved tensor was written in place, so
    the mode copied it (the copies go with the graph's saved tensors in the backward)."""

    def __init__(self, stack: ExitStack):
        self._stack, self._ctx, self.copied = stack, None, False

    def enter(self, module=None, args=None) -> None:
        if torch.is_grad_enabled() and self._ctx is None:
            self._ctx = self._stack.enter_context(torch.autograd.graph.allow_mutation_on_saved_tensors())
            self._stack.enter_context(_KeepWritten(self._ctx))  # inside it: sees each op first

    def before_backward(self) -> None:
        # a torch without the context's `cloned` (a private attribute) is taken to need the mode: safe, slower
        self.copied = self.copied or (self._ctx is not None and len(getattr(self._ctx, "cloned", (None,))) > 0)

    def end(self) -> None:
        self._stack.close()


@contextmanager
def _mutation_allowed_from_first_graph(net: nn.Module | None) -> Iterator[_MutationContext]:
    """A `_MutationContext` entered from `net`'s first forward with grad enabled (None: the caller enters it) until
    its `end()` or the block ends. The graph-free sampler calls before it, N - K of a Focus-N-Fix step's N, run
    without its per-op Python; they save nothing, so their writes need no copy (and a compiled call under a
    dispatch mode would make dynamo skip its code for good). Nor do the gradient clipping and the optimizer step
    after it: there the mode's per-op Python would cost a step's every adapter tensor, and on torch 2.5 (not 2.13)
    its check failed on their multi-tensor (foreach) kernels ("'list' object has no attribute 'data_ptr'")."""
    with ExitStack() as stack:
        mutation = _MutationContext(stack)
        if net is not None:
            handle = net.register_forward_pre_hook(mutation.enter)
            stack.callback(handle.remove)
        yield mutation


class _LoRATrainer:
    """Shared machinery: LoRA, optimizer, clipping, NaN guard, full-state save/resume."""

    method = "lora"
    model_members = MODEL_MEMBERS  # what this trainer calls on its model
    nonfinite_advice = "lower lr"  # what to change when the loss or a gradient turns NaN/inf, in its settings' names

    @classmethod
    def _check_model(cls, model: object) -> None:
        missing = missing_members(model, cls.model_members)
        if missing:  # a ComfyUI MODEL or a diffusers pipeline handed over as it is: named, not an AttributeError
            raise TypeError(f"model must be a DiffusionModel (focusfix_core.denoisers: the tiny model, or the nodes' "
                            f"ComfyDiffusionModel around a ComfyUI MODEL), got a {type(model).__name__} without "
                            f"{', '.join(missing)}")

    def __init__(self, model: DiffusionModel, cfg: _LoRAConfig, lora: LoRA | None, device=None):
        self.model, self.cfg = model, cfg
        self.device = torch.device(device) if device is not None else next(model.net.parameters()).device
        fp16 = _fp16_in_gradient_path(model)
        if fp16:  # before any hook goes onto the (possibly shared) net
            _check_loss_scaling(self.device.type, torch.__version__)
        # adapters are initialised on the CPU from the config's seed: same seed, same LoRA, on any device
        self.lora = lora if lora is not None else LoRA.attach(
            model.net, targets=cfg.targets, rank=cfg.rank, alpha=cfg.alpha, device="cpu",
            generator=torch.Generator().manual_seed(cfg.seed))
        self.lora.to(self.device)
        self.params = [p for p in self.lora.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        # fp16 compute (ComfyUI's default for SD1.5/SDXL UNets on most GPUs) flushes the small gradients of a
        # reward to zero on their way back to the adapters: scale the loss, as mixed-precision training does
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0**16, growth_interval=100) if fp16 else None
        self._scale_used: float | None = None  # the loss scale of the last backward (the record's loss_scale)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self._weights_digest: dict[str, str] | None = None  # `weights_digest`, computed on the first save
        self.history: list[StepRecord] = []
        # metadata of the saved LoRA this run continues ({}: a new LoRA); kept in the state, so a resumed run's
        # LoRA still counts the earlier run's steps (`lora.continued_metadata`)
        self.continued: dict[str, str] = {}
        self.continued_from = ""  # that LoRA's file, for the report (kept in the state too)
        # whether the model writes into tensors autograd saved (`_checked_step`): None until the first step tells
        self.mutation_allowed: bool | None = None
        self._mutation: _MutationContext | None = None  # that step's context, read and ended around the backward
        self._good = self._snapshot()

    def continues(self, metadata: dict[str, str], source: str = "") -> None:
        """Record the saved LoRA this new run trains further (its metadata, and its file `source` if read from
        one), before the first step. Its draws (item order, noise, timesteps) are then seeded by (seed, the steps
        the LoRA already has): with the same seed, a continued run would otherwise replay the first run's batches,
        and leave out what they missed."""
        self.continued, self.continued_from = dict(metadata), str(source)
        before = steps_trained(metadata)
        if before > 0:
            self.generator.manual_seed((self.cfg.seed * 1_000_003 + before) % 2**63)
            self._good = self._snapshot()

    # -- state -------------------------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        """The state after the last finished step: the LoRA and what the next step will draw (a step stopped half
        way is then redrawn the same, so a resumed run equals an uninterrupted one)."""
        return {"lora": {k: v.detach().clone() for k, v in self.lora.state_dict().items()}, **self._draw_state()}

    def _draw_state(self) -> dict:
        return {"rng": self.generator.get_state()}

    def _set_draw_state(self, state: dict) -> None:
        """The draws of a snapshot, or of a saved state (`state_dict`)."""
        self.generator.set_state(state["rng"])

    def _frozen_modules(self) -> dict[str, nn.Module]:
        """What the run trains against, by what a resume names: the model (FixTrainer: and the reward)."""
        return {"model": self.model if isinstance(self.model, nn.Module) else self.model.net}

    def weights_digest(self) -> dict[str, str]:
        """sha256 of each frozen module's weights (`_frozen_modules`; the LoRA's excluded), computed once: a resume
        with another model or reward of the same name and settings is refused (`_check_training_state`)."""
        if self._weights_digest is None:
            own = {id(p) for p in self.lora.parameters()}
            self._weights_digest = {}
            for what, module in self._frozen_modules().items():
                h = hashlib.sha256()
                for name, t in (*module.named_parameters(), *module.named_buffers()):
                    if id(t) not in own:
                        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
                        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                self._weights_digest[what] = h.hexdigest()
        return self._weights_digest

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "focusfix_version": __version__,
            "method": self.method,
            "config": self.cfg.to_json(),
            "weights": self.weights_digest(),
            "step": self.step,
            "lora": self.lora.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self.generator.get_state(),
            "history": [json.dumps(r.as_dict()) for r in self.history],
            "continued": json.dumps(self.continued),
            "continued_from": self.continued_from,
            **({} if self.scaler is None else {"scaler": self.scaler.state_dict()}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the run `state` holds. ValueError when it was saved by another method or other settings
        (only iterations, and compile, may change), already holds more steps than iterations, or any part of it
        is invalid (`_check_training_state`); the trainer is then left as it was."""
        step, history, continued = _check_training_state(state, self)  # before any of it is used
        self.lora.load_state_dict(state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._set_draw_state(state)
        self.step, self.history, (self.continued, self.continued_from) = step, history, continued
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self._good = self._snapshot()

    def save_state(self, path) -> None:
        """Atomically write LoRA + optimizer + step + RNG, for `resume` (`load_state`)."""
        atomic_torch_save(self.state_dict(), path)

    def load_state(self, path) -> None:
        self.load_state_dict(load_training_state(path))

    # -- one optimizer step ---------------------------------------------------------------------------------
    def _optimizer_step(self, loss: torch.Tensor) -> float:
        """Backward, NaN guard, clip: the gradient norm (the update itself is `_finish_step`'s). On a non-finite
        loss/grad, restore the last good LoRA and raise.

        With fp16 in the gradient path the loss is scaled (`self.scaler`); a non-finite gradient there is an
        overflow at that scale: `_finish_step` skips the update (the returned norm is inf) and halves the scale."""
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            self.restore_last_good()
            raise NonFiniteLossError(f"loss is {loss.item()} at step {self.step + 1}: stopped; the LoRA keeps "
                                     f"the weights of step {self.step} ({self.nonfinite_advice})")
        scaler = self.scaler
        if self._mutation is not None:
            self._mutation.before_backward()
        (loss if scaler is None else scaler.scale(loss)).backward()
        if self._mutation is not None:
            self._mutation.end()
        if scaler is not None:
            self._scale_used = scaler.get_scale()
            scaler.unscale_(self.optimizer)  # the adapters' own (fp32) gradients
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if not math.isfinite(grad_norm) and (scaler is None or scaler.get_scale() <= 1.0):
            self.restore_last_good()
            raise NonFiniteLossError(f"gradient norm is {grad_norm} at step {self.step + 1}: stopped; the LoRA "
                                     f"keeps the weights of step {self.step} ({self.nonfinite_advice})")
        return grad_norm if math.isfinite(grad_norm) else math.inf

    def _finish_step(self, t0: float, **terms) -> StepRecord:
        """The update, its snapshot (`restore_last_good`) and the step count, as one: a Ctrl-C meanwhile waits
        until all three are done (`interrupts_held`), so an interrupted run holds the step before or this one,
        never half of it (Adam's moments one update ahead of the LoRA, or a state.pt one step behind its LoRA,
        which a resume would then train a step too many). `terms` (the record's numbers) are read before."""
        with interrupts_held():
            if self.scaler is None:
                self.optimizer.step()
            else:
                self.scaler.step(self.optimizer)  # skipped when the gradients overflowed
                self.scaler.update()
            self._good = self._snapshot()
            return self._record(t0, **terms)

    def restore_last_good(self) -> None:
        """Put back the LoRA and random draws of the last finished step (after an interrupt that may have hit
        mid-step or mid-update)."""
        self.lora.load_state_dict(self._good["lora"])
        self._set_draw_state(self._good)
        self.optimizer.zero_grad(set_to_none=True)

    def _mutation_context(self) -> ContextManager[_MutationContext]:
        """The first step's (and a writing model's every step's) `_MutationContext`, entered at the net's first
        forward with grad enabled."""
        return _mutation_allowed_from_first_graph(self.model.net)

    def train_step(self) -> StepRecord:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[StepRecord]:
        while self.step < self.cfg.iterations:
            with self._explain_oom(f"in training step {self.step + 1} of {self.cfg.iterations}"):
                try:
                    record = self._checked_step()
                except BaseException:
                    _release_failed_backward(self.device)
                    raise
            yield record

    def _checked_step(self) -> StepRecord:
        """`train_step`, also for a model whose forward writes in place into a tensor autograd saved (ComfyUI's
        FreeU_V2 patch rescales a block's features in place), which would fail the backward. The first step runs
        under torch's `allow_mutation_on_saved_tensors`, which copies such a tensor before the write, and the later
        steps only if that step needed a copy: the mode runs Python for every op, so only a model that needs it
        pays, and only from the step's first UNet call that records a graph (`_mutation_allowed_from_first_graph`).
        A failed backward would keep its graph for good (autograd's saved tensors hold it in a cycle that only a
        finished backward breaks: one step's activations leaked per run), so the mode comes before it. A model
        that writes in place only in a later step still trains: that step is drawn again (its draws put back)
        under the mode, at the cost of that one graph."""
        if self.mutation_allowed is not False:
            with self._mutation_context() as self._mutation:
                try:
                    record = self.train_step()
                finally:
                    mutation, self._mutation = self._mutation, None
            self.mutation_allowed = self.mutation_allowed or mutation.copied
            return record
        try:
            return self.train_step()
        except RuntimeError as e:
            if "modified by an inplace operation" not in str(e):
                raise
        self.restore_last_good()
        self.mutation_allowed = True
        return self._checked_step()

    def _memory_advice(self) -> str:
        """What lowers a step's memory, by the settings' (and node inputs') names, with their values."""
        c = self.cfg
        return f"lower batch_size (now {c.batch_size}), then width and height (now {c.width}x{c.height})"

    @contextmanager
    def _explain_oom(self, stage: str) -> Iterator[None]:
        """Re-raise a device out-of-memory error saying where it happened and what lowers the memory. The type
        stays torch.OutOfMemoryError, so ComfyUI still unloads its models after it."""
        try:
            yield
        except (torch.OutOfMemoryError, RuntimeError) as e:
            # MPS says "MPS backend out of memory" in a plain RuntimeError; the CPU allocator (a CPU-only
            # ComfyUI, the command line) "DefaultCPUAllocator: can't allocate memory" (Linux, macOS) or "...: not
            # enough memory" (Windows)
            cpu = "DefaultCPUAllocator" in str(e) or "can't allocate memory" in str(e)
            if not (isinstance(e, torch.OutOfMemoryError) or cpu or "out of memory" in str(e)):
                raise
            raise torch.OutOfMemoryError(f"out of {'CPU' if cpu else 'device'} memory {stage}: "
                                         f"{self._memory_advice()}. "
                                         f"({str(e).splitlines()[0] if str(e) else 'no details'})") from e

    def _record(self, t0: float, **terms) -> StepRecord:
        rec = StepRecord(step=self.step, total=self.cfg.iterations, seconds=time.perf_counter() - t0,
                         loss_scale=self._scale_used, **terms)
        self.history.append(rec)
        self.step += 1
        return rec

    def metadata(self) -> dict:
        """LoRA metadata: method, base model and every setting that shaped the weights."""
        cfg, m = asdict(self.cfg), self.model
        base = base_model_metadata(getattr(m, "family", None), v_prediction=getattr(m, "v_prediction", False),
                                   width=self.cfg.width, height=self.cfg.height, title=f"FocusFix {self.method}")
        return {**base, "focusfix_method": self.method, "focusfix_base_model": getattr(m, "name", "unknown"),
                "focusfix_steps_trained": self.step, "focusfix_config": json.dumps(cfg, sort_keys=True)}


def stop_as_interrupt(signum, frame) -> None:
    """A signal handler that stops a run as Ctrl-C does: the command line's for SIGTERM (`kill`, `timeout`, a job
    scheduler's stop), so the steps done are written as after a Ctrl-C."""
    raise KeyboardInterrupt


_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM") if hasattr(signal, n))


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT), or a SIGTERM the command line turns into one, until the block ends, then raise its
    KeyboardInterrupt. Only for the signals whose handler raises it (Python's own for SIGINT, `stop_as_interrupt`)
    and in the main thread (the command line); elsewhere (ComfyUI's worker thread, whose cancel is checked between
    sampler calls) the block runs as is."""
    kept = {} if threading.current_thread() is not threading.main_thread() else {
        s: h for s in _STOP_SIGNALS if (h := signal.getsignal(s)) in (signal.default_int_handler, stop_as_interrupt)}
    held = []
    for s in kept:
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s, h in kept.items():
            signal.signal(s, h)
        if held:
            raise KeyboardInterrupt


class _SwitchAfter:
    """A denoiser whose first n calls go to `first` and later ones to `then`."""

    def __init__(self, first, then, n: int):
        self.first, self.then, self.n, self.calls = first, then, n, 0

    def __call__(self, x, sigma, cond):
        self.calls += 1
        return (self.first if self.calls <= self.n else self.then)(x, sigma, cond)


class FixTrainer(_LoRATrainer):
    """Focus-N-Fix (lam > 0 with a mask) or DRaFT-K/LV (lam = 0 or mask_source "none").

    Args:
        model: a `DiffusionModel`.
        reward: a `Reward` (frozen here; only the LoRA learns).
        cfg: `FixConfig`.
        masks: for mask_source "mask" (painted): M [N,H,W] or [N,1,H,W] in [0,1] (1 = may change), N = 1 (all items),
            len(seeds) (one per seed, any prompt) or len(items) (prompt-major order).
        cond, uncond: optional precomputed conditioning instead of encoding `cfg.prompts` / `cfg.negative_prompt`
            with the model's text encoder: cond one Cond of batch len(prompts), or a list of one Cond per prompt
            (each of its own context length); uncond of batch 1.
        lora: an attached LoRA to continue; a new one is attached otherwise.
        on_sampler_step: called with `sample`'s step info after every sampler step the trainer takes (I0, I, the
            training trajectory), and with {"mask_item": i} before item i's mask is derived from the reward; it
            may raise to cancel (a node's check for ComfyUI's cancel button), so a long step stops within one
            denoiser call or one mask.
    """

    method = "focus-n-fix"
    nonfinite_advice = "lower lr or lam, or check the reward"

    def __init__(self, model: DiffusionModel, reward: Reward, cfg: FixConfig, *, masks: torch.Tensor | None = None,
                 cond: Cond | None = None, uncond: Cond | None = None, lora: LoRA | None = None, device=None,
                 on_sampler_step: Callable[[dict], None] | None = None):
        if not isinstance(cfg, FixConfig):
            raise TypeError(f"cfg must be a FixConfig, got {type(cfg).__name__}")
        self._check_model(model)
        if not isinstance(reward, nn.Module) or not callable(reward):
            raise TypeError(f"reward must be a Reward module mapping [B,3,H,W] images to [B] scores, got {type(reward).__name__}")
        if cfg.mask_source == "heatmap" and not getattr(reward, "has_heatmap", False):
            raise ValueError(f"mask_source 'heatmap' needs a reward with a heatmap; reward "
                             f"{getattr(reward, 'name', type(reward).__name__)!r} has none: use 'saliency'")
        scale = model.latent_scale
        check_size(cfg.width, cfg.height, scale)
        self._order: list[int] = []  # items still to train on in this pass (part of every snapshot)
        super().__init__(model, cfg, lora, device)
        self.on_sampler_step = on_sampler_step
        try:
            self._setup(reward, masks, cond, uncond)
        except BaseException:
            if lora is None:  # never leave our hooks on a (possibly shared) net after a failed setup
                self.lora.remove()
            raise

    def _setup(self, reward, masks, cond, uncond):
        model, cfg = self.model, self.cfg
        scale = model.latent_scale
        if cfg.lam == 0 or cfg.mask_source == "none":
            self.method = "draft"
        self.reward = reward
        self.latent_shape = (model.latent_channels, cfg.height // scale, cfg.width // scale)
        self.sigmas = (torch.tensor(cfg.sigmas, dtype=torch.float32) if cfg.sigmas else
                       sampling_sigmas(model, cfg.steps, cfg.scheduler)).to(self.device)
        self._sigma_max = float(self.sigmas[0])  # read once: the start x of every trajectory scales noise by it
        top = float(model.sigmas[-1])
        if cfg.sigmas and self._sigma_max < 0.5 * top:  # every image is drawn from noise alone, no latent to refine
            raise ValueError(f"sigmas start at {self._sigma_max:.4g}, far below the model's top sigma {top:.4g}: a "
                             f"partial denoise (a scheduler's denoise < 1, SplitSigmas' low half) would train on "
                             f"noise too weak to make an image from. Give sigmas of a full denoise (denoise 1)")
        self.items = cfg.items
        self._check_host_memory()
        self._painted = self._check_painted_masks(masks) if cfg.mask_source == "mask" else None
        if cfg.mask_source != "mask" and masks is not None:
            raise ValueError(f"masks were given but mask_source is {cfg.mask_source!r}: set mask_source='mask'")
        with torch.no_grad():  # the text encoder is frozen: encode once
            hw = self.latent_shape[1:]
            # one cond per prompt, each of its own length (a prompt over 75 tokens has 154): a batch joins only its
            # own rows (`_cond`), so a short prompt is not attended at the least common multiple of every length
            self.prompt_conds = [prepare_cond(model, c, hw) for c in self._per_prompt(cond)]
            self.uncond = prepare_cond(
                model, uncond if uncond is not None else model.encode_prompts([cfg.negative_prompt]), hw)
        guidance = model_guidance(model)  # the model's own CFG where it has one (e.g. a patched ComfyUI MODEL)
        self.denoiser = CFGDenoiser(model.denoise, self.uncond, cfg.cfg_scale, guidance)
        # every graph-free call (I0, the N - K steps, previews) through one callable, compiled on request; the
        # model call alone is compiled, so another cfg_scale reuses its graph
        self.sampling_denoiser = self.denoiser if cfg.compile == "off" else CFGDenoiser(
            CompiledWhenNoGrad(model.denoise, cfg.compile, compile_denoiser), self.uncond, cfg.cfg_scale, guidance)
        self._train_denoiser = MergedWhenNoGrad(self.sampling_denoiser, self.lora)  # graph-free steps: no hooks
        # where the model names its blocks, checkpoint them one by one instead of whole denoiser calls
        self._checkpoint_modules = list(getattr(model, "checkpoint_modules", lambda: [])())
        self._checkpoint_calls = not self._checkpoint_modules  # whole differentiated calls instead (`_differentiated`)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self.last_images: torch.Tensor | None = None
        # (prompt, seed) items first met by before_after() whose derived mask is empty (a flat map): shown with
        # it; training refuses such an item, but it never met this one, and its LoRA must not be lost for a picture
        self.unmasked: list[tuple[str, int]] = []

    def _check_host_memory(self) -> None:
        """Refuse, before any sampling, item counts whose images would not fit in CPU memory: the cache (I0, z0,
        M) and at the end before_after()'s I0, I and M, 11 fp32 planes of H x W an item (~46 MB at 1024²); a
        node's IMAGE copies of them come on top, within the margin. Running out of RAM would end the whole
        process (ComfyUI included) without a word."""
        c, ram = self.cfg, physical_memory_bytes()
        per_item = 4 * (11 * c.height * c.width + math.prod(self.latent_shape))
        need = per_item * len(self.items)
        if ram is not None and need > ram / 2:
            raise ValueError(
                f"{len(c.prompts)} prompt(s) x {len(c.seeds)} seed(s) = {len(self.items)} items would hold "
                f"{need / 2**30:.1f} GiB of images in CPU memory ({per_item / 2**20:.0f} MB an item at "
                f"{c.width}x{c.height}), over half of this machine's {ram / 2**30:.1f} GiB: use fewer seeds or "
                f"prompts (train in several runs with continue_from), or a smaller width and height")

    def _check_painted_masks(self, masks):
        cfg = self.cfg
        if masks is None:
            raise ValueError("mask_source is 'mask' but no masks were passed (connect a MASK)")
        M = _as_mask4(masks, "masks")
        if tuple(M.shape[-2:]) != (cfg.height, cfg.width):
            raise ValueError(f"mask M is {M.shape[-2]}x{M.shape[-1]} but images are {cfg.height}x{cfg.width}: "
                             f"resize the mask to the image size")
        if len(M) not in (1, len(cfg.seeds), len(self.items)):
            raise ValueError(f"got {len(M)} masks; expected 1, one per seed ({len(cfg.seeds)}) or one per "
                             f"(prompt, seed) item ({len(self.items)})")
        # an empty painted mask holds the whole image: training could only fight the region term (a mask editor
        # that saved nothing, or an inverted mask)
        bad = check_mask(M, kinds=("nonfinite", "empty")) if cfg.lam > 0 else []
        if bad:
            raise ValueError(f"{bad[0]}: paint the region that may change (in ComfyUI's mask editor the painted "
                             f"part is 1 = may change), or set lam 0 for plain DRaFT")
        M = M.float().clamp(0, 1).cpu()  # [N,1,H,W] in CPU memory like the cache it feeds (`_keep`)
        # a resume with other masks is refused; hashed as [N,H,W], the layout states were saved with
        self._painted_digest = _digest(M[:, 0])
        return M

    # -- I0 and M: computed once per item (the base model is frozen) ----------------------------------------
    def _noise(self, idx: list[int]) -> torch.Tensor:
        seeds = [self.items[i][1] for i in idx]
        return initial_x(self.model, seed_noise(seeds, self.latent_shape, device=self.device), self._sigma_max)

    def _per_prompt(self, cond: Cond | Sequence[Cond] | None) -> list[Cond]:
        """The conditioning of each prompt: encoded one by one, the given per-prompt Conds, or the rows of a
        Cond of batch len(prompts) (at its joined length)."""
        P = len(self.cfg.prompts)
        if cond is None:
            return [self.model.encode_prompts([p]) for p in self.cfg.prompts]
        rows = sum(len(c["context"]) for c in cond) if isinstance(cond, (list, tuple)) else len(cond["context"])
        if rows != P or (isinstance(cond, (list, tuple)) and len(cond) != P):
            raise ValueError(f"cond holds {rows} text encoding(s) for {P} prompt(s): give one per prompt")
        return list(cond) if isinstance(cond, (list, tuple)) else [index_cond(cond, [i]) for i in range(P)]

    def _cond(self, idx: list[int]) -> Cond:
        """The batch's conditioning: its prompts' rows, joined (cat_cond) only to this batch's lengths."""
        return cat_cond(*(self.prompt_conds[self.cfg.prompts.index(self.items[i][0])] for i in idx))

    def _painted_mask(self, i: int) -> torch.Tensor:
        M = self._painted
        if len(M) == 1:
            return M[0]
        if len(M) == len(self.items):
            return M[i]
        return M[i % len(self.cfg.seeds)]  # items are prompt-major: the seed's position, also for a repeated seed

    @contextmanager
    def _as_in_a_step(self):
        """The net as a training step's graph-free calls see it (frozen, its blocks' checkpoint wrappers idle
        without grad): a compiled sampler then traces one graph for I0, previews and training, not three."""
        with _frozen(self.model.net), checkpointed_modules(self._checkpoint_modules):
            yield

    def _step_callback(self, extra: Callable[[dict], None] | None = None) -> Callable[[dict], None] | None:
        """`sample`'s callback: on_sampler_step, then `extra` (either may be None)."""
        fns = [f for f in (self.on_sampler_step, extra) if f is not None]
        if len(fns) < 2:
            return fns[0] if fns else None
        return lambda info: [f(info) for f in fns]

    @staticmethod
    def _keep(t: torch.Tensor) -> torch.Tensor:
        """A cache entry: t in CPU memory. On the device the cache would grow by every (prompt, seed): ~4 MB an
        item at 512², ~17 MB at 1024²; the copy back moves a batch's share of that (a few ms per 17 MB). Not
        page-locked: torch's pinned allocator rounds each block up to a power of two (+25-60 % here) and keeps
        freed blocks for the life of the process."""
        return t.detach().cpu()

    def release(self) -> None:
        """Free what only training needs once a run is over: the cached I0/z0/M and the merge's copy of the
        original weights (`MergedWhenNoGrad.release`). The trainer can still draw images, unmerged."""
        self._cache.clear()
        self._train_denoiser.release()

    @torch.no_grad()
    def base(self, idx: list[int], callback: Callable[[dict], None] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """I0 [b,3,H,W], its latents z0 [b,C,h,w] and M [b,1,H,W] (None for "none") for items idx on the
        trainer's device, from the cache (`_fill_cache`); `callback` follows the sampler's steps when I0 is
        sampled."""
        self._fill_cache(idx, callback)
        flat = [self.items[i] for i in idx if self.items[i] in self.unmasked]
        if flat:  # cached by before_after() with its empty mask: a step would hold the whole image
            raise ValueError(f"the {self.cfg.mask_source} mask of prompt {flat[0][0]!r}, seed {flat[0][1]} is empty "
                             f"(a flat map): paint the mask, or set lam 0")
        entries = [self._cache[i] for i in idx]

        def stacked(k: int) -> torch.Tensor:
            return torch.stack([e[k].to(self.device, non_blocking=True) for e in entries])
        return stacked(0), stacked(1), None if entries[0][2] is None else stacked(2)

    @torch.no_grad()
    def _fill_cache(self, idx: list[int], callback: Callable[[dict], None] | None = None,
                    shown_only: bool = False) -> None:
        """Sample I0 and derive M for the items of idx not in the cache yet, and cache them in CPU memory.

        A batch with a new item is sampled whole, cached items too: kernels round differently at other batch
        sizes, and the new item's I0 must equal its I in the step that trains it on this batch while the LoRA is
        still untrained. (The region norm's gradient has full size at any I != I0: at a rounding-level
        difference it points along the rounding noise, and Adam would take a full step along it.)"""
        todo = [j for j, i in enumerate(idx) if i not in self._cache]  # positions in idx
        if todo:
            denoiser = self.sampling_denoiser
            if denoiser is not self.denoiser:
                # compiled kernels round differently: the last K steps run eagerly like I's differentiated calls,
                # so an untrained LoRA gives I == I0 bit for bit
                denoiser = _SwitchAfter(denoiser, self.denoiser, self.cfg.steps - self.cfg.K)
            with self.lora.disabled(), self._as_in_a_step():
                z0 = sample(denoiser, self._noise(idx), self.sigmas, self._cond(idx), K=0, checkpoint=False,
                           callback=self._step_callback(callback), sampler_name=self.cfg.sampler_name)[todo]
                I0 = self.model.decode(z0).float()
            todo = [idx[j] for j in todo]
            src = self.cfg.mask_source
            if src == "mask":
                M = torch.stack([self._painted_mask(i) for i in todo])
            elif src == "none":
                M = None
            else:
                M = torch.cat([self._derived_mask(i, I0[j:j + 1], shown_only) for j, i in enumerate(todo)])
            for j, i in enumerate(todo):
                self._cache[i] = (self._keep(I0[j]), self._keep(z0[j]), None if M is None else self._keep(M[j]))

    def _derived_mask(self, i: int, I0: torch.Tensor, shown_only: bool = False) -> torch.Tensor:
        """M(I0): [1,1,H,W] of item i from the reward (heatmap or saliency), for I0 [1,3,H,W] as the artist sees it
        (clamped, as VAE Decode gives it). One item at a time, smoothgrad's noise the same for each
        (`mask_noise`): an item's mask is the same whichever items share its batch (a blur rounds differently
        per batch, and a top_percent cut flips near-tied pixels), so a resumed run draws the masks it had, and
        the Saliency Mask node shows it."""
        c, (prompt, seed) = self.cfg, self.items[i]
        if self.on_sampler_step is not None:  # a cancel between items: smoothgrad runs 8 reward backwards each
            self.on_sampler_step({"mask_item": i})
        M = mask_from_reward(self.reward, I0.clamp(0, 1), mask_source=c.mask_source, saliency_method=c.saliency_method,
                             blur_sigma=c.blur_sigma, threshold_mode=c.threshold_mode, threshold=c.threshold,
                             dilation=c.dilation, feather=c.feather, generator=mask_noise(I0.device))
        if c.lam > 0 and not bool(M.amax() > 0):  # the region term would hold the whole image: nothing to fix
            if shown_only:  # before_after(): drawn with its empty mask, and said (`unmasked`)
                self.unmasked.append((prompt, seed))
                return M
            # every threshold mode keeps the peak of a normalised map: only a flat map (no location) gets here
            raise ValueError(f"the {c.mask_source} mask of prompt {prompt!r}, seed {seed} is empty: the reward's "
                             f"{c.mask_source} of that image is flat (it marks no place), so no threshold helps. "
                             f"Paint the mask (mask_source mask), or set lam 0")
        return M

    @torch.no_grad()
    def before_after(self, progress: Callable[[int], Callable[[dict], None]] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """I0 [N,3,H,W], I [N,3,H,W] (the LoRA as it is now) and M [N,1,H,W] (None for "none") of every item, in
        CPU memory, drawn batch_size items at a time: the device's peak stays a training batch's, however many
        items there are.

        progress: called once with the number of sampler steps to come (I0 of items not seen in training, and
        every I); the callback it returns follows each of them (a progress bar with previews).

        An item training never met whose derived mask is empty (a flat map, which a step refuses) is drawn with
        that mask and listed in `unmasked`, instead of failing the run at its end."""
        idx, b = list(range(len(self.items))), self.cfg.batch_size
        chunks = [idx[k:k + b] for k in range(0, len(idx), b)]
        new = [any(i not in self._cache for i in chunk) for chunk in chunks]
        callback = None if progress is None else progress((len(self.sigmas) - 1) * (len(chunks) + sum(new)))
        I: torch.Tensor | None = None  # filled chunk by chunk: a list joined at the end would hold I twice
        with self._explain_oom("while drawing the before/after images"):
            for k, chunk in zip(range(0, len(idx), b), chunks):
                self._fill_cache(chunk, callback, shown_only=True)
                drawn = self.sample_images(chunk, callback)
                if I is None:
                    I = torch.empty((len(idx), *drawn.shape[1:]), dtype=drawn.dtype)
                I[k:k + len(chunk)] = drawn.cpu()
        I0, _, M = zip(*(self._cache[i] for i in idx))
        return torch.stack(I0), I, None if M[0] is None else torch.stack(M)

    @torch.no_grad()
    def sample_images(self, idx: list[int], callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """I: [b,3,H,W] for items idx with the LoRA as it is now, merged into the weights as a LoRA loader
        merges it (same noise as I0; no graph); `callback` follows the sampler's steps."""
        with self._as_in_a_step():
            try:
                z = sample(self._train_denoiser, self._noise(idx), self.sigmas, self._cond(idx), K=0, checkpoint=False,
                           callback=self._step_callback(callback), sampler_name=self.cfg.sampler_name)
            finally:
                self._train_denoiser.restore()
            return self.model.decode(z).float()

    def _next_items(self) -> list[int]:
        """Cycle through the items in a seeded random order (same seed -> same batches)."""
        while len(self._order) < self.cfg.batch_size:
            self._order += torch.randperm(len(self.items), generator=self.generator).tolist()
        idx, self._order = self._order[: self.cfg.batch_size], self._order[self.cfg.batch_size:]
        return idx

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["order"] = torch.tensor(self._order, dtype=torch.long)
        state["reward"] = json.dumps(_describe(self.reward))  # a resume with another reward is refused
        if self._painted is not None:
            state["painted"] = self._painted_digest
        return state

    def _draw_state(self) -> dict:
        return {**super()._draw_state(), "order": list(self._order)}

    def _frozen_modules(self) -> dict[str, nn.Module]:
        return {**super()._frozen_modules(), **({"reward": self.reward} if isinstance(self.reward, nn.Module) else {})}

    def _memory_advice(self) -> str:
        c = self.cfg
        advice = (f"lower batch_size (now {c.batch_size}) or K (now {c.K}), then width and height (now "
                  f"{c.width}x{c.height})")
        towers = [m for m in self.reward.modules() if isinstance(m, CLIPVisionTower)] if isinstance(
            self.reward, nn.Module) else []
        if any(t.vision_model.embeddings.class_embedding.dtype == torch.float32 for t in towers):
            advice += "; a CLIP reward (aesthetic, safety) takes about 0.6 GiB less with precision bf16 (Load Reward)"
        return advice

    def _set_draw_state(self, state: dict) -> None:
        super()._set_draw_state(state)
        # a snapshot's list, or a saved state's tensor (none in a state saved before the order was kept)
        self._order = torch.as_tensor(state.get("order", []), dtype=torch.long).tolist()

    def train_step(self) -> StepRecord:
        cfg, t0 = self.cfg, time.perf_counter()
        idx = self._next_items()
        # DRaFT (mask_source "none") never reads I0: do not sample it
        I0, z0, M = self.base(idx) if cfg.mask_source != "none" else (None, None, None)
        blocks = self._checkpoint_modules
        with (torch.enable_grad(), _frozen(self.model.net, self.reward, *_decoders(self.model)),
              checkpointed_modules(blocks)):
            try:
                z = sample(self._differentiated, self._noise(idx), self.sigmas, self._cond(idx), K=cfg.K,
                           lv_copies=cfg.lv_copies, generator=self.generator, checkpoint=False,
                           callback=self.on_sampler_step, sampler_name=cfg.sampler_name)
            finally:
                self._train_denoiser.restore()
            I = self.model.decode(z).float()
            n = max(cfg.lv_copies, 1)  # DRaFT-LV: n copies of each image, adjacent
            try:  # scored as VAE Decode shows it: no reward for pixels pushed past [0, 1]
                scores = self.reward(I.clamp(0, 1))
                loss = reward_loss(scores, cfg.reward_target)
            except NonFiniteScoreError as e:
                self.restore_last_good()
                raise NonFiniteLossError(f"{e} at step {self.step + 1}: stopped; the LoRA keeps the weights of "
                                         f"step {self.step} (check the reward, or lower lr)") from None
            region = None
            if M is not None:
                if cfg.mask_space == "pixel":
                    R = region_loss(I, I0.repeat_interleave(n, 0), M.repeat_interleave(n, 0))
                else:
                    R = region_loss(z.float(), z0.float().repeat_interleave(n, 0),
                                    resize_mask(M, z.shape[-2:]).repeat_interleave(n, 0))
                region = R.mean()
                if cfg.lam > 0:
                    loss = loss + cfg.lam * region
            grad_norm = self._optimizer_step(loss)
        self.last_images = I.detach()[::n]
        return self._finish_step(t0, loss=loss.item(), grad_norm=grad_norm, reward=scores.mean().item(),
                                 region=None if region is None else region.item())

    def _mutation_context(self) -> ContextManager[_MutationContext]:
        # entered by `_differentiated`, not by a hook on the net: torch.compile guards on a module's hooks, and
        # would recompile the graph-free calls when the hook comes and goes
        return _mutation_allowed_from_first_graph(None)

    def _differentiated(self, x, sigma, cond):
        """The training trajectory's denoiser: `_train_denoiser`, whose calls with grad enabled enter the step's
        `_MutationContext` and, on a model without named blocks (`checkpointed_modules`), run checkpointed whole.
        The mode is entered before the checkpoint: entered inside one, it would take the tensors the checkpoint
        saves after it, and the recompute would no longer match them (torch's CheckpointError). It does not reach
        inside the checkpoint, though: a model without named blocks that writes in place into a tensor it saved
        trains on the written values (the recompute runs under the checkpoint's own hooks). ComfyUI's SD1.5 and
        SDXL UNets name their blocks: only another net could meet this."""
        if not torch.is_grad_enabled():
            return self._train_denoiser(x, sigma, cond)
        if self._mutation is not None:
            self._mutation.enter()
        if not self._checkpoint_calls:
            return self._train_denoiser(x, sigma, cond)
        return _checkpoint(self._train_denoiser, x, sigma, cond, use_reentrant=False)

    def metadata(self) -> dict:
        meta = super().metadata()
        meta.update(focusfix_method=self.method, focusfix_reward=json.dumps(_describe(self.reward)),
                    focusfix_lam=self.cfg.lam, focusfix_K=self.cfg.K, focusfix_sampler_steps=self.cfg.steps)
        return meta


def _decoders(model) -> list[nn.Module]:
    """Modules in the gradient path besides `net` (the VAE decoder): frozen for the step like the net."""
    mods = getattr(model, "modules_in_gradient_path", None)
    return [m for m in (mods() if mods is not None else []) if m is not model.net]


def _describe(reward) -> dict:
    return reward.describe() if hasattr(reward, "describe") else {"name": type(reward).__name__}


def _run_until_stopped(run, handles) -> None:
    """run(), which a hook may end early with _StopForward; the hooks' handles are removed either way."""
    try:
        run()
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


def _slots_by_storage(tensors: list[torch.Tensor]) -> list[int]:
    """Slot of each tensor, shared by tensors that view the same memory the same way: [a, b, a] -> [0, 1, 0]."""
    seen: dict[tuple, int] = {}
    return [seen.setdefault((t.data_ptr(), t.shape, t.stride(), t.dtype), len(seen)) for t in tensors]


class SeparateEnhanceTrainer(_LoRATrainer):
    """Separate-and-Enhance: LoRA on to_k; per step, random latents noised to a random timestep, one
    denoiser pass per prompt with attention capture, Separate + Enhance losses on the object maps, and a
    preservation term on single-object prompts (cfg.preservation): the relative change of the adapted
    keys on their text ("keys", no UNet pass), or the x0 MSE against the adapters-disabled model."""

    method = "separate-and-enhance"
    model_members = (*MODEL_MEMBERS, "token_indices", "attention_capture")
    nonfinite_advice = "lower lr, lam_sep or lam_en"

    def __init__(self, model: DiffusionModel, cfg: SeparateEnhanceConfig, *, lora: LoRA | None = None, device=None):
        if not isinstance(cfg, SeparateEnhanceConfig):
            raise TypeError(f"cfg must be a SeparateEnhanceConfig, got {type(cfg).__name__}")
        self._check_model(model)
        scale = model.latent_scale
        check_size(cfg.width, cfg.height, scale)
        # the maps' (h, w): resolution is their shorter side, so a portrait or landscape size works too; a size
        # where the model has no cross-attention is refused here, before any UNet pass
        levels = getattr(model, "attention_levels", None)
        self.map_hw = map_size(cfg.resolution, (cfg.height // scale, cfg.width // scale),
                               attention_levels=None if levels is None else levels(), latent_scale=scale)
        # Token positions first: a missing word is a config error, found before any LoRA is attached.
        self.token_indices = [model.token_indices(p, list(o)) for p, o in zip(cfg.prompts, cfg.objects)]
        super().__init__(model, cfg, lora, device)
        self._stop_at: str | None = None  # attn2 layer after which attention_maps stops the net
        try:
            self.latent_shape = (model.latent_channels, cfg.height // scale, cfg.width // scale)
            with torch.no_grad():
                hw = self.latent_shape[1:]
                # one cond per prompt, each of its own length (a prompt over 75 tokens has more): a batch joins
                # its rows with cat_cond, and the maps sum the copies of a shorter row's tokens (context_lengths)
                self.prompt_conds = [prepare_cond(model, model.encode_prompts([p]), hw) for p in cfg.prompts]
                self.context_lengths = [int(c["context"].shape[1]) for c in self.prompt_conds]
                self.pcond = (prepare_cond(model, model.encode_prompts(list(cfg.preserve_prompts)), hw)
                              if cfg.preserve_prompts else None)
            self.preservation = "none" if self.pcond is None or cfg.lam_preserve == 0 else self._setup_preservation()
        except BaseException:
            if lora is None:
                self.lora.remove()
            raise

    @property
    def cond(self) -> Cond:
        """Every prompt's conditioning, joined (cat_cond): batch len(prompts)."""
        return cat_cond(*self.prompt_conds)

    def _setup_preservation(self) -> str:
        """Resolve cfg.preservation; for "keys", keep each adapted layer's input on the preserve prompts
        (`_text`, deduplicated: the UNet hands every attn2 the same context) and the base outputs' energy."""
        mode, names = self.cfg.preservation, self.lora.module_names
        if mode == "outputs":
            return mode
        image_side = [n for n in names if not _TEXT_SIDE.search(n)]
        if image_side:
            if mode == "keys":
                raise ValueError(f"preservation='keys' needs a LoRA only on cross-attention to_k / to_v (they read "
                                 f"the text alone); targets {self.cfg.targets!r} also adapt {image_side[:3]}: use "
                                 f"preservation='outputs' or targets='to_k'")
            return "outputs"
        P, b = len(self.cfg.preserve_prompts), self.cfg.batch_size
        sig = self.model.sigmas.to(torch.float32)
        chunks = []
        for i in range(0, P, b):
            rows = list(range(i, min(i + b, P)))
            chunks.append(self._layer_inputs(rows, torch.zeros((len(rows), *self.latent_shape), device=self.device),
                                             sig[-1].to(self.device).expand(len(rows))))
        # the same input at another noise and timestep: a layer whose input moves reads the image too
        probe = self._layer_inputs([0], torch.ones((1, *self.latent_shape), device=self.device),
                                   sig[len(sig) // 2].to(self.device).expand(1))
        text_only = all(c is not None for c in chunks) and probe is not None and all(
            a.shape[1:] == q.shape[1:] and torch.equal(a[:1], q) for a, q in zip(chunks[0], probe))
        if not text_only:
            if mode == "keys":
                raise ValueError("preservation='keys': an adapted layer did not run or read more than the text in "
                                 "this model (a patched attention?); use preservation='outputs'")
            return "outputs"
        slots = [_slots_by_storage(c) for c in chunks]
        self._slots = slots[0] if all(q == slots[0] for q in slots) else list(range(len(names)))
        first = {k: i for i, k in reversed(list(enumerate(self._slots)))}  # slot -> first layer using it
        self._text = {k: torch.cat([c[i] for c in chunks]) for k, i in first.items()}  # [P, T, C] per slot
        with torch.no_grad(), self.lora.disabled():
            self._key_energy = sum(h(self._text[k]).float().square().flatten(1).sum(1)
                                   for h, k in zip(self.lora._hosts, self._slots))  # (P,)
        # checked once here, not by key_change_loss at every step (each check is a host sync mid-step)
        if not bool((torch.isfinite(self._key_energy) & (self._key_energy > 0)).all()):
            raise ValueError("preservation='keys': the base model's adapted keys of a preserve prompt are zero or not "
                             "finite, so their relative change is undefined; check preserve_prompts, or use "
                             "preservation='outputs'")
        # in the adapters' fp32 once: each adapter would cast (and keep for backward) its own copy every step
        self._text = {k: t.float() for k, t in self._text.items()}
        return "keys"

    def _layer_inputs(self, pidx: list[int], x, sigma) -> list[torch.Tensor] | None:
        """Input of every adapted layer in one adapters-off pass on preserve prompts pidx (stopping once all
        have run); None if one never ran (e.g. its attention was replaced by another node's patch)."""
        hosts, got = self.lora._hosts, {}

        def pre(i):
            def hook(module, args, kwargs):
                got.setdefault(i, args[0] if args else next(iter(kwargs.values())))
                if len(got) == len(hosts):
                    raise _StopForward
            return hook

        handles = [h.register_forward_pre_hook(pre(i), with_kwargs=True) for i, h in enumerate(hosts)]
        with torch.no_grad(), self.lora.disabled():
            _run_until_stopped(lambda: self.model.denoise(x, sigma, index_cond(self.pcond, pidx)), handles)
        return [got[i] for i in range(len(hosts))] if len(got) == len(hosts) else None

    def _noisy(self, b: int):
        """Random latents noised at random timesteps in t_range: x = z + sigma * eps, z, eps ~ N(0, I)."""
        T = len(self.model.sigmas)
        lo, hi = self.cfg.t_range
        t = (lo + (hi - lo) * torch.rand(b, generator=self.generator)) * (T - 1)
        sigma = self.model.sigmas.to(torch.float32)[t.round().long()].to(self.device)
        z = torch.randn((b, *self.latent_shape), generator=self.generator).to(self.device)
        eps = torch.randn((b, *self.latent_shape), generator=self.generator).to(self.device)
        return z + sigma[:, None, None, None] * eps, sigma

    def attention_maps(self, idx: list[int], x, sigma, keep_grad: bool) -> torch.Tensor:
        """A: [b, n_words, h, w] (`map_hw`) for prompts idx (all with the same number of object words)."""
        toks = [self.token_indices[i] for i in idx]
        store = AttentionStore(toks, resolution=self.map_hw, keep_grad=keep_grad,
                               context_lengths=[self.context_lengths[i] for i in idx])
        cond = cat_cond(*(self.prompt_conds[i] for i in idx))  # rows repeated only to this batch's lengths
        # The losses read only these maps: stop the net after the last cross-attention layer of that size
        # (SD1.5 at 512 px: after output_blocks.5, 45 % of the forward FLOPs never run).
        seen, handles = [], []

        def note(name):
            def hook(module, args, output):
                seen.append((name, store.n_layers))
                if name == self._stop_at:
                    raise _StopForward
            return hook

        # on to_k, as the capture: an attn2 replace patch (IPAdapter-style) runs to_q and to_k, never attn2's forward
        with self.model.attention_capture(store):  # its hooks run first: the layer is stored when ours runs
            for name, m in self.model.net.named_modules():
                if name.rsplit(".", 1)[-1] == "attn2" and hasattr(m, "to_k"):
                    handles.append(m.to_k.register_forward_hook(note(name)))
            _run_until_stopped(lambda: self.model.denoise(x, sigma, cond), handles)
        if self._stop_at is None:  # first call ran the whole net: remember the last layer that added a map
            grew = [n for (n, k), (_, k0) in zip(seen, [("", 0)] + seen) if k > k0]
            self._stop_at = grew[-1] if grew else None
        return store.maps()

    def train_step(self) -> StepRecord:
        cfg, t0 = self.cfg, time.perf_counter()
        idx = torch.randint(len(cfg.prompts), (cfg.batch_size,), generator=self.generator).tolist()
        x, sigma = self._noisy(len(idx))
        with torch.enable_grad(), _frozen(self.model.net):
            # group prompts by object count so each batch of maps is rectangular
            sep, en = [], []
            for n_obj in sorted({len(cfg.objects[i]) for i in idx}):
                rows = [j for j, i in enumerate(idx) if len(cfg.objects[i]) == n_obj]
                A = self.attention_maps([idx[j] for j in rows], x[rows], sigma[rows], keep_grad=True)
                sep.append(separate_loss(A))
                en.append(enhance_loss(A))
            s, e = torch.cat(sep).mean(), torch.cat(en).mean()
            loss = cfg.lam_sep * s + cfg.lam_en * e
            p = None
            if self.preservation == "keys":  # every preserve prompt, exactly: no UNet pass
                d = [a.delta(self._text[k]) * self.lora.strength for a, k in zip(self.lora.adapters, self._slots)]
                p = key_change_loss(d, self._key_energy, check_energy=False).mean()
                loss = loss + cfg.lam_preserve * p
            elif self.preservation == "outputs":
                pidx = torch.randint(len(cfg.preserve_prompts), (cfg.batch_size,), generator=self.generator).tolist()
                xp, sp = self._noisy(len(pidx))
                pc = index_cond(self.pcond, pidx)
                with torch.no_grad(), self.lora.disabled():  # base = same module with adapters off
                    base = self.model.denoise(xp, sp, pc)
                p = preservation_loss(self.model.denoise(xp, sp, pc), base).mean()
                loss = loss + cfg.lam_preserve * p
            grad_norm = self._optimizer_step(loss)
        return self._finish_step(t0, loss=loss.item(), grad_norm=grad_norm, separate=s.item(), enhance=e.item(),
                                 preserve=None if p is None else p.item())

    @torch.no_grad()
    def eval_maps(self, seed: int = 0, sigma_frac: float = 0.8) -> torch.Tensor:
        """Attention maps [P, n_objects, h, w] (`map_hw`) for every prompt at a fixed noise (for before/after views);
        a prompt with fewer objects than the most gets all-zero maps after its own (drawn as blank tiles)."""
        with self._explain_oom("while drawing the attention maps"):
            return self._eval_maps(seed, sigma_frac)

    def _eval_maps(self, seed: int, sigma_frac: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        P = len(self.cfg.prompts)
        T = len(self.model.sigmas)
        sigma = self.model.sigmas.float()[round(sigma_frac * (T - 1))].to(self.device).expand(P)
        x = torch.randn((P, *self.latent_shape), generator=g).to(self.device) * (1 + sigma[0] ** 2) ** 0.5
        out = []
        for i in range(P):
            out.append(self.attention_maps([i], x[i:i + 1], sigma[i:i + 1], keep_grad=False)[0])
        n = max(len(a) for a in out)
        return torch.stack([torch.cat([a, a.new_zeros(n - len(a), *a.shape[1:])]) for a in out])

    def metadata(self) -> dict:
        meta = super().metadata()
        meta.update(focusfix_lam_sep=self.cfg.lam_sep, focusfix_lam_en=self.cfg.lam_en,
                    focusfix_lam_preserve=self.cfg.lam_preserve, focusfix_preservation=self.preservation)
        return meta
