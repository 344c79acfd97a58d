"""Low-rank adapters (LoRA, Hu et al. 2021, Eq. 3: W x + (alpha/r) B A x) attached by forward hooks.

The host modules keep their class and their weights: each hook adds `strength * (alpha/r) * up(down(x))`
to the host's output. Adapters are kept in fp32 whatever the host dtype. Saved files use the kohya
layout (`lora_unet_<path with _>.lora_down.weight / .lora_up.weight / .alpha`) that ComfyUI's
LoraLoader, A1111 and Forge load with scale `strength * alpha / rank`.

References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021.
    kohya-ss/sd-scripts `networks/lora.py` (key names, init, conv LoRA).
"""
from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .io import atomic_save_safetensors, check_float_finite, load_tensor_file_with_metadata

__all__ = [
    "MergedWhenNoGrad",
    "release_pinned_memory",
    "BASE_FAMILIES",
    "base_model_metadata",
    "metadata_family",
    "family_mismatch",
    "TARGET_PRESETS",
    "diffusers_unet_names",
    "resolve_targets",
    "paths_in_kohya",
    "lora_delta",
    "lora_weight_delta",
    "LoRAAdapter",
    "LoRA",
    "merge_kohya_into",
    "lora_metadata",
    "save_lora",
    "load_lora_file",
    "SavedLoRA",
    "read_focusfix_lora",
    "continued_metadata",
    "steps_trained",
]

# name -> (regex searched in module paths, host types that qualify)
TARGET_PRESETS: dict[str, tuple[str, tuple[type[nn.Module], ...]]] = {
    "to_k": (r"(^|\.)attn2\.to_k$", (nn.Linear,)),  # cross-attention keys (Separate-and-Enhance)
    "attn": (r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$", (nn.Linear,)),
    "all_linear": (r"", (nn.Linear,)),
}
_HOST_TYPES = (nn.Linear, nn.Conv2d)  # subclasses (comfy.ops.*.Linear) qualify too
_DOWN, _UP, _ALPHA = "lora_down.weight", "lora_up.weight", "alpha"  # kohya key suffixes


def resolve_targets(net: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Module paths of `net` that LoRA attaches to.

    Args:
        net: the host network.
        targets: a preset name from `TARGET_PRESETS` ("to_k", "attn", "all_linear"), or regex
            pattern(s) searched (`re.search`) in the paths of `net.named_modules()`. Only
            `nn.Linear`/`nn.Conv2d` (and subclasses) qualify.

    Returns:
        Matching paths, in `named_modules()` order, without duplicates.

    Raises:
        TypeError: net is not a Module, or targets is not a str / sequence of str.
        ValueError: no targets, a bad regex, or a pattern that matches no module (the message lists
            a few module names that would qualify).

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> resolve_targets(net, "all_linear")
        ['0', '2']
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
    patterns = [targets] if isinstance(targets, str) else targets
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"targets must be a preset name or regex pattern(s) (str), got {targets!r}")
    if not patterns:
        raise ValueError("targets must name at least one preset or pattern, got an empty sequence")
    hosts = [(name, m) for name, m in net.named_modules() if name and isinstance(m, _HOST_TYPES)]
    found: dict[str, None] = {}
    for pattern in patterns:
        regex, types = TARGET_PRESETS.get(pattern, (pattern, _HOST_TYPES))
        try:
            compiled = re.compile(regex)
        except re.error as e:
            raise ValueError(f"targets pattern {pattern!r} is not a valid regex: {e}") from None
        hits = [name for name, m in hosts if isinstance(m, types) and compiled.search(name)]
        if not hits:
            examples = [name for name, _ in hosts[:6]]
            raise ValueError(
                f"targets pattern {pattern!r} matches no nn.Linear/nn.Conv2d module of "
                f"{type(net).__name__}; presets are {sorted(TARGET_PRESETS)}; "
                f"example module names: {examples}"
            )
        found.update(dict.fromkeys(hits))
    return [name for name, _ in hosts if name in found]


def _host_paths(net: nn.Module, paths: Sequence[str]) -> list[str]:
    """`paths` checked as LoRA hosts of `net` (nn.Linear/nn.Conv2d), in `named_modules()` order."""
    wanted = set(paths)
    hosts = [name for name, m in net.named_modules() if name in wanted and isinstance(m, _HOST_TYPES)]
    if not hosts or len(hosts) != len(wanted):
        bad = sorted(wanted - set(hosts))
        raise ValueError(f"modules must be nn.Linear/nn.Conv2d paths of {type(net).__name__}, got "
                         f"{bad[:3] if bad else 'none'}")
    return hosts


def paths_in_kohya(net: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "lora_unet") -> list[str]:
    """The host paths of `net` (nn.Linear/nn.Conv2d) that kohya `tensors` name, under either of their names
    (`diffusers_unet_names`), in `named_modules()` order.

    Raises:
        ValueError: no key names a layer of `net` (a LoRA of another model)."""
    hosts = [name for name, m in net.named_modules() if name and isinstance(m, _HOST_TYPES)]
    groups, _ = _group_kohya(tensors, prefix, hosts, diffusers_unet_names(net))
    if not groups:
        raise ValueError(f"its keys name no layer of this {type(net).__name__}, e.g. {sorted(tensors)[:2]} "
                         f"(a LoRA of another model?)")
    return [name for name in hosts if name in groups]


def lora_delta(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    """Adapter output `scale * up(down(x))`, in fp32 (float64 stays float64).

    Args:
        x: [..., in] (linear) or [B, in, H, W] (conv).
        down: [r, in] or [r, in, kh, kw] (conv with the host's stride/padding/dilation).
        up: [out, r] or [out, r, 1, 1].
        scale: alpha / r (times any strength).

    Returns:
        [..., out] or [B, out, H', W'], fp32.

    Examples:
        >>> lora_delta(torch.ones(2, 5), torch.ones(3, 5), torch.zeros(4, 3), 1.0).shape
        torch.Size([2, 4])
    """
    dtype = _at_least_fp32(x.dtype, down.dtype, up.dtype)
    x = x.to(dtype)
    down, up = down.to(x.device, dtype), up.to(x.device, dtype)  # no-op unless the host moved after attach
    if down.ndim == 2:
        return F.linear(F.linear(x, down), up) * scale
    h = F.conv2d(x, down, stride=stride, padding=padding, dilation=dilation)  # [B, r, H', W']
    return F.conv2d(h, up) * scale


def lora_weight_delta(
    down: torch.Tensor, up: torch.Tensor, alpha: float | torch.Tensor | None = None, strength: float = 1.0
) -> torch.Tensor:
    """The host-weight change `strength * alpha/r * up @ down`, in fp32 (float64 stays float64); kohya merge.

    Args:
        down: [r, in] or [r, in, kh, kw].
        up: [out, r] or [out, r, 1, 1].
        alpha: float or 0-dim tensor; None means alpha = r (scale 1, as ComfyUI does).
        strength: extra multiplier.

    Returns:
        [out, in] or [out, in, kh, kw], fp32.

    Raises:
        ValueError: shapes that do not compose.

    Examples:
        >>> lora_weight_delta(torch.ones(2, 5), torch.ones(3, 2), alpha=1.0).shape
        torch.Size([3, 5])
    """
    r = down.shape[0] if down.ndim in (2, 4) else 0
    if not r or up.ndim != down.ndim or up.shape[1] != r or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        raise ValueError(f"down/up must be [r,in]/[out,r] or [r,in,kh,kw]/[out,r,1,1] with r >= 1, got "
                         f"{tuple(down.shape)} and {tuple(up.shape)}")
    alpha = float(r if alpha is None else alpha)
    dtype = _at_least_fp32(down.dtype, up.dtype)
    w = up.to(dtype).flatten(1) @ down.to(dtype).flatten(1)  # [out, in*kh*kw]
    return (w * (strength * alpha / r)).reshape(up.shape[0], *down.shape[1:])


def _at_least_fp32(*dtypes: torch.dtype) -> torch.dtype:
    out = torch.float32
    for d in dtypes:
        if not _is_fp8(d):  # torch does not promote float8 types; fp32 holds them exactly
            out = torch.promote_types(out, d)
    return out


def _is_fp8(dtype: torch.dtype) -> bool:
    """float8 storage (ComfyUI's fp8_e4m3fn / fp8_e5m2 weight dtypes), computed in a wider dtype per layer."""
    return dtype.is_floating_point and dtype.itemsize == 1


class LoRAAdapter(nn.Module):
    """One adapter: fp32 `down`, `up` in kohya layout, `scale = alpha / rank`; `forward = delta`.

    Args:
        in_features, out_features: the host's in/out features (channels for conv).
        rank: r > 0.
        alpha: > 0.
        kernel_size, stride, padding, dilation: the host conv's (kernel_size None means linear).
        device: where the parameters live.
        generator: for the Kaiming-uniform init of `down` (`up` starts at zero, so the model is unchanged).

    Examples:
        >>> LoRAAdapter(8, 4, rank=2, alpha=1.0).delta(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        *,
        kernel_size: tuple[int, int] | None = None,
        stride: tuple[int, int] | int = 1,
        padding: tuple[int, int] | int | str = 0,
        dilation: tuple[int, int] | int = 1,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _check_rank_alpha(rank, alpha)
        self.rank, self.alpha = rank, float(alpha)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        k = () if kernel_size is None else tuple(kernel_size)
        one = () if kernel_size is None else (1, 1)
        self.down = nn.Parameter(torch.empty(rank, in_features, *k, device=device, dtype=torch.float32))
        self.up = nn.Parameter(torch.zeros(out_features, rank, *one, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5), generator=generator)  # as kohya and nn.Linear

    @classmethod
    def for_module(
        cls, host: nn.Module, rank: int, alpha: float, device=None, generator: torch.Generator | None = None
    ) -> LoRAAdapter:
        """An adapter shaped for `host` (nn.Linear or nn.Conv2d with groups=1, zero padding)."""
        device = host.weight.device if device is None else device
        if isinstance(host, nn.Linear):
            return cls(host.in_features, host.out_features, rank, alpha, device=device, generator=generator)
        if isinstance(host, nn.Conv2d):
            if host.groups != 1:
                raise ValueError(f"host Conv2d must have groups=1 for LoRA, got groups={host.groups}")
            if host.padding_mode != "zeros":
                raise ValueError(f"host Conv2d must have padding_mode='zeros' for LoRA, got {host.padding_mode!r}")
            return cls(
                host.in_channels, host.out_channels, rank, alpha, kernel_size=host.kernel_size,
                stride=host.stride, padding=host.padding, dilation=host.dilation, device=device, generator=generator,
            )
        raise TypeError(f"host must be an nn.Linear or nn.Conv2d, got {type(host).__name__}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] or [B, in, H, W] -> fp32 `scale * up(down(x))`: [..., out] or [B, out, H', W']."""
        return lora_delta(
            x, self.down, self.up, self.scale, stride=self.stride, padding=self.padding, dilation=self.dilation
        )

    forward = delta

    def weight_delta(self, strength: float = 1.0) -> torch.Tensor:
        """fp32 change of the host weight, [out, in] or [out, in, kh, kw]."""
        return lora_weight_delta(self.down, self.up, self.alpha, strength)

    def extra_repr(self) -> str:
        kind = "linear" if self.down.ndim == 2 else f"conv{tuple(self.down.shape[2:])}"
        return f"{self.down.shape[1]}->{self.up.shape[0]}, rank={self.rank}, alpha={self.alpha:g}, {kind}"


def _check_rank_fits(rank: int, names: Sequence[str], hosts: Sequence[nn.Module]) -> None:
    """Refuse a rank above a host's smaller dimension: up @ down is full rank already, so such an adapter is no
    low-rank adapter, only larger (and slower) than the full-rank one."""
    def dims(host):  # down: [r, in] (conv: [r, in, kh, kw], so in * kh * kw), up: [out, r]
        if isinstance(host, nn.Conv2d):
            return host.in_channels * math.prod(host.kernel_size), host.out_channels
        return host.in_features, host.out_features

    name, host = min(zip(names, hosts), key=lambda nh: min(dims(nh[1])))
    n_in, n_out = dims(host)
    if rank > min(n_in, n_out):
        kind = (f"Conv2d {host.in_channels}x{'x'.join(map(str, host.kernel_size))}" if isinstance(host, nn.Conv2d)
                else f"Linear {n_in}")
        raise ValueError(f"rank must be at most {min(n_in, n_out)}, the smaller size of the targeted layer {name!r} "
                         f"({kind} -> {n_out}), got {rank}: a larger rank is no low-rank adapter. Lower the rank, "
                         f"or leave that layer out of targets")


def _check_rank_alpha(rank, alpha) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if rank <= 0:
        raise ValueError(f"rank must be > 0, got {rank}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")


def _kohya_name(prefix: str, path: str) -> str:
    """("lora_unet", "input_blocks.1.1.attn2.to_k") -> "lora_unet_input_blocks_1_1_attn2_to_k"."""
    return f"{prefix}_{path.replace('.', '_')}"


# SD-style UNet (ComfyUI's, LDM layout) -> diffusers names of a ResBlock's layers and of the top-level layers
_RESNET_LAYERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                  "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP_LAYERS = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_ATTENTION_CHILDREN = ("norm", "proj_in", "proj_out", "transformer_blocks")


def diffusers_unet_names(net: nn.Module) -> Callable[[str], str] | None:
    """path -> the same layer's path in a diffusers UNet2DConditionModel, for an SD-style UNet in the LDM layout
    (ComfyUI's: input_blocks / middle_block / output_blocks, with `num_res_blocks`); None for another net.

    kohya's SD1.x/2.x LoRAs name layers this way (`lora_unet_down_blocks_0_attentions_0_..._attn2_to_k`), and
    its tools (merge_lora.py, training on top) find nothing under the LDM names; ComfyUI, A1111 and Forge read
    both. (kohya's SDXL LoRAs keep the LDM names.) Paths it does not know are returned unchanged.

    Examples:
        >>> class U(nn.Module): num_res_blocks, input_blocks, output_blocks = [2, 2, 2, 2], [], []
        >>> diffusers_unet_names(U())("input_blocks.4.1.transformer_blocks.0.attn2.to_k")
        'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k'
        >>> diffusers_unet_names(U())("output_blocks.2.1.conv")
        'up_blocks.0.upsamplers.0.conv'
    """
    res = getattr(net, "num_res_blocks", None)
    if not isinstance(res, (list, tuple)) or not all(hasattr(net, a) for a in ("input_blocks", "output_blocks")):
        return None
    blocks, i = {}, 1  # "input_blocks.4" -> ("down_blocks.1", 0); a down/upsampling block -> (..., None)
    for level, n in enumerate(res):
        for r in range(n):
            blocks[f"input_blocks.{i + r}"] = (f"down_blocks.{level}", r)
        i += n
        if level < len(res) - 1:
            blocks[f"input_blocks.{i}"] = (f"down_blocks.{level}", None)
            i += 1
    j = 0
    for level, n in enumerate(reversed(res)):
        for r in range(n + 1):  # the upsampler sits in the level's last block, after its resnet (and attention)
            blocks[f"output_blocks.{j}"] = (f"up_blocks.{level}", r)
            j += 1

    def name(path: str) -> str:
        for ldm, new in _TOP_LAYERS.items():
            if path == ldm or path.startswith(ldm + "."):
                return new + path[len(ldm):]
        parts = path.split(".")
        if parts[0] == "middle_block" and len(parts) > 2:
            block, r, rest = "mid_block", {"0": 0, "1": 0, "2": 1}.get(parts[1]), ".".join(parts[2:])
        elif len(parts) > 3 and ".".join(parts[:2]) in blocks:
            (block, r), rest = blocks[".".join(parts[:2])], ".".join(parts[3:])
        else:
            return path
        if rest in _RESNET_LAYERS:
            return f"{block}.resnets.{r}.{_RESNET_LAYERS[rest]}"
        if rest.split(".")[0] in _ATTENTION_CHILDREN:
            return f"{block}.attentions.{r}.{rest}"
        if rest in ("op", "conv"):  # Downsample.op, Upsample.conv
            return f"{block}.{'down' if block.startswith('down') else 'up'}samplers.0.conv"
        return path
    return name


def _group_kohya(
    tensors: dict[str, torch.Tensor], prefix: str, paths: Sequence[str],
    alias: Callable[[str], str] | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Group kohya keys by module path: ({path: {"lora_down.weight": t, "lora_up.weight": t, "alpha": t}}, unknown).
    alias: another name each path may be saved under (`diffusers_unet_names`); both are read."""
    by_name = {_kohya_name(prefix, p): p for p in paths}
    if alias is not None:
        by_name.update({_kohya_name(prefix, alias(p)): p for p in paths})
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        name, _, part = key.partition(".")
        if name in by_name and part in (_DOWN, _UP, _ALPHA):
            groups.setdefault(by_name[name], {})[part] = t
        else:
            unknown.append(key)
    return groups, unknown


@torch.no_grad()
def _add_to_weight(host: nn.Module, delta: torch.Tensor) -> None:
    """host.weight += delta, summed in at least fp32, stored back in the host's dtype."""
    w = host.weight
    dtype = _at_least_fp32(w.dtype)
    w.copy_((w.to(dtype) + delta.to(w.device, dtype)).to(w.dtype))


class LoRA(nn.Module):
    """Adapters hooked onto a host network; `parameters()` are the adapters' only.

    Build with `LoRA.attach(net, targets, rank, alpha)`. Each host's output becomes
    `host(x) + strength * (alpha/r) * up(down(x))`, cast back to the host output's dtype.

    Attributes:
        enabled: False -> hooks return the host output untouched (bit-exact).
        strength: multiplier on every adapter's delta.
        module_names: host module paths, in attach order.
        rank, alpha, targets: as attached.
    """

    def __init__(self, module_names: list[str], adapters: list[LoRAAdapter], rank: int, alpha: float, targets) -> None:
        super().__init__()
        assert len(module_names) == len(adapters)
        self.module_names = list(module_names)
        self.adapters = nn.ModuleList(adapters)
        self.rank, self.alpha, self.targets = rank, float(alpha), targets
        self.enabled, self.strength, self.merged = True, 1.0, False
        self._hosts: list[nn.Module] = []  # a plain list, so the host net is not registered as a submodule
        self._handles: list = []
        self._alias: Callable[[str], str] | None = None  # the hosts' diffusers names (`diffusers_unet_names`)

    @classmethod
    def attach(
        cls,
        net: nn.Module,
        targets: str | Sequence[str] = "attn",
        rank: int = 4,
        alpha: float | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        modules: Sequence[str] | None = None,
        saved: bool = False,
    ) -> LoRA:
        """Hook fresh adapters (up = 0: output unchanged) onto the modules `resolve_targets` picks.

        Host classes, weights and `requires_grad` are left alone (the trainer freezes the net).

        Args:
            net: host network (e.g. ComfyUI's `diffusion_model`; its paths become the kohya keys).
            targets: preset name or regex pattern(s), see `resolve_targets`.
            rank: r > 0.
            alpha: > 0; None means alpha = rank (scale 1).
            device: adapter device; None -> each host weight's device.
            generator: for the init of `down`.
            modules: the host paths themselves, in place of resolving `targets` (which are then only recorded,
                e.g. for the saved metadata).
            saved: the rank of a LoRA already trained (a saved file, a resumed state), whose tensors go in next:
                not checked against the layers' sizes. That check guards the choice of a new rank; a trained LoRA
                whose rank is above a layer's smaller size is wasteful but applies exactly (as the stock Load LoRA
                applies it), so it is read, not refused.

        Raises:
            ValueError: rank/alpha <= 0, a new rank above a target's smaller dimension, no match, grouped conv,
                two paths with the same kohya name.

        Examples:
            >>> net = nn.Sequential(nn.Linear(4, 4))
            >>> LoRA.attach(net, "all_linear", rank=2).module_names
            ['0']
        """
        alpha = rank if alpha is None else alpha
        _check_rank_alpha(rank, alpha)
        names = resolve_targets(net, targets) if modules is None else _host_paths(net, modules)
        kohya = [_kohya_name("", n) for n in names]
        if len(set(kohya)) != len(kohya):
            dup = [n for n, k in zip(names, kohya) if kohya.count(k) > 1]
            raise ValueError(f"targets give modules whose kohya names collide: {dup[:4]}")
        by_path = dict(net.named_modules())
        hosts = [by_path[n] for n in names]
        if not saved:
            _check_rank_fits(rank, names, hosts)
        adapters = [LoRAAdapter.for_module(h, rank, alpha, device, generator) for h in hosts]
        lora = cls(names, adapters, rank, alpha, targets)
        lora._alias = diffusers_unet_names(net)
        for host, adapter in zip(hosts, lora.adapters):
            lora._hosts.append(host)
            lora._handles.append(host.register_forward_hook(lora._make_hook(adapter), with_kwargs=True))
        return lora

    def _make_hook(self, adapter: LoRAAdapter):
        def hook(module, args, kwargs, output):
            if not self.enabled:
                return None  # None keeps the host output object itself
            x = args[0] if args else next(iter(kwargs.values()))
            return (output + self.strength * adapter.delta(x)).to(output.dtype)

        return hook

    @classmethod
    def from_kohya(cls, net: nn.Module, tensors: dict[str, torch.Tensor], targets: str | Sequence[str] = "attn",
                   rank: int = 4, alpha: float | None = None, prefix: str = "lora_unet",
                   modules: Sequence[str] | None = None) -> LoRA:
        """`attach` adapters as a saved LoRA was attached (its targets, rank, alpha; or the given `modules`), then
        `load_kohya` its tensors: the saved LoRA, hooked and trainable again (e.g. to continue training it).
        Adapters on CPU.

        Raises:
            ValueError: the tensors do not fit `net` (a LoRA of another model) or these targets/rank; nothing
                stays attached.
        """
        lora = cls.attach(net, targets, rank, alpha, "cpu", modules=modules, saved=True)
        try:
            lora.load_kohya(tensors, prefix, strict=True)
        except BaseException:
            lora.remove()
            raise
        return lora

    @contextmanager
    def disabled(self) -> Iterator[LoRA]:
        """While active, the hosts run as if no adapter were attached (restores the previous state).

        Raises:
            RuntimeError: after `merge()`: the delta is in the weights, so no hook can take it out.
        """
        if self.merged:
            raise RuntimeError("this LoRA is merged into the weights (merge()): it cannot be disabled; use "
                               "MergedWhenNoGrad for a merge that restores, or load the base weights again")
        previous, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = previous

    def remove(self) -> None:
        """Remove all hooks (the adapters stay, e.g. for saving)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_dict_kohya(self, prefix: str = "lora_unet", dtype: torch.dtype | None = None,
                         diffusers_names: bool = False) -> dict[str, torch.Tensor]:
        """kohya tensors on CPU: `<prefix>_<path with _>.lora_down.weight` [r,in(,kh,kw)], `.lora_up.weight`
        [out,r(,1,1)], `.alpha` (0-dim). `dtype` None keeps fp32. diffusers_names: the paths of an LDM-layout
        UNet written as kohya's SD1.x/2.x LoRAs name them (`diffusers_unet_names`; `load_kohya` reads both)."""
        rename = self._alias if diffusers_names and self._alias is not None else (lambda p: p)
        out: dict[str, torch.Tensor] = {}
        for name, a in zip(self.module_names, self.adapters):
            key = _kohya_name(prefix, rename(name))
            out[f"{key}.lora_down.weight"] = a.down.detach().to("cpu", dtype or torch.float32).clone()
            out[f"{key}.lora_up.weight"] = a.up.detach().to("cpu", dtype or torch.float32).clone()
            out[f"{key}.alpha"] = torch.tensor(a.alpha, dtype=dtype or torch.float32)
        return out

    @torch.no_grad()
    def load_kohya(self, tensors: dict[str, torch.Tensor], prefix: str = "lora_unet", strict: bool = True) -> None:
        """Copy kohya tensors into the adapters in place (optimizer references stay valid).

        A missing `.alpha` means alpha = rank. With `strict`, unknown keys and attached modules absent
        from `tensors` are errors; shape mismatches always are.

        Raises:
            ValueError: naming the first few offending keys.
        """
        groups, unknown = _group_kohya(tensors, prefix, self.module_names, self._alias)
        if strict and unknown:
            raise ValueError(
                f"tensors has {len(unknown)} keys this LoRA does not know, e.g. {unknown[:3]} (prefix {prefix!r})"
            )
        missing = [_kohya_name(prefix, n) for n in self.module_names if not {_DOWN, _UP} <= groups.get(n, {}).keys()]
        if strict and missing:
            raise ValueError(f"tensors lacks lora_down/lora_up for {len(missing)} attached modules, e.g. {missing[:3]}")
        adapters = dict(zip(self.module_names, self.adapters))
        bad = [
            f"{path}.{part}: expected {tuple(getattr(adapters[path], attr).shape)}, got {tuple(parts[part].shape)}"
            for path, parts in groups.items()
            for part, attr in ((_DOWN, "down"), (_UP, "up"))
            if part in parts and parts[part].shape != getattr(adapters[path], attr).shape
        ]
        if bad:
            raise ValueError(f"tensors has {len(bad)} shape mismatches, e.g. {bad[:3]}")
        for path, parts in groups.items():
            if _DOWN in parts and _UP in parts:
                a = adapters[path]
                a.down.copy_(parts[_DOWN])
                a.up.copy_(parts[_UP])
                a.alpha = float(parts[_ALPHA]) if _ALPHA in parts else float(a.rank)

    @torch.no_grad()
    def merge(self, strength: float = 1.0) -> None:
        """Fold `strength * alpha/r * up @ down` into the host weights in place (fp32 math) and disable
        the hooks, so the net computes the same thing without them. Final: there is no unmerge (subtracting
        the delta again does not give fp16/bf16/fp32 weights back bit for bit; `MergedWhenNoGrad` keeps the
        originals instead), and `disabled()` is refused afterwards.

        Raises:
            RuntimeError: merged already (merging twice would add the delta twice).
        """
        if self.merged:
            raise RuntimeError("this LoRA is merged already; merging again would add its delta twice")
        for host, a in zip(self._hosts, self.adapters):
            _add_to_weight(host, a.weight_delta(strength))
        self.merged, self.enabled = True, False

    def extra_repr(self) -> str:
        return f"targets={self.targets!r}, modules={len(self.module_names)}, rank={self.rank}, alpha={self.alpha:g}"


@torch.no_grad()
def merge_kohya_into(
    net: nn.Module, tensors: dict[str, torch.Tensor], strength: float = 1.0, prefix: str = "lora_unet"
) -> list[str]:
    """Merge kohya LoRA tensors into `net`'s Linear/Conv2d weights in place (no hooks needed).

    Returns:
        The merged module paths.

    Raises:
        ValueError: keys that name no Linear/Conv2d of `net`, a down without its up, or shapes that
            do not fit the host weight.
    """
    hosts = {n: m for n, m in net.named_modules() if n and isinstance(m, _HOST_TYPES)}
    groups, unknown = _group_kohya(tensors, prefix, list(hosts), diffusers_unet_names(net))
    if unknown:
        raise ValueError(
            f"tensors has {len(unknown)} keys naming no Linear/Conv2d of net, e.g. {unknown[:3]} (prefix {prefix!r})"
        )
    incomplete = [path for path, parts in groups.items() if not {_DOWN, _UP} <= parts.keys()]
    if incomplete:
        raise ValueError(f"tensors lacks lora_down or lora_up for {incomplete[:3]}")
    deltas = {path: lora_weight_delta(parts[_DOWN], parts[_UP], parts.get(_ALPHA), strength)
              for path, parts in groups.items()}
    bad = [f"{p}: delta {tuple(d.shape)} vs weight {tuple(hosts[p].weight.shape)}"
           for p, d in deltas.items() if d.shape != hosts[p].weight.shape]
    if bad:
        raise ValueError(f"tensors do not fit the host weights, e.g. {bad[:3]}")
    for path, d in deltas.items():  # everything was checked first: a bad file leaves net untouched
        _add_to_weight(hosts[path], d)
    return list(deltas)


def _focusfix_version() -> str:
    try:
        from . import __version__  # type: ignore[attr-defined]
    except ImportError:
        return "unknown"
    return str(__version__)


_STABILITY = "https://github.com/Stability-AI/generative-models"
# family -> kohya's ss_base_model_version, the SAI model spec's architecture, its implementation
BASE_FAMILIES = {
    "sd1": ("sd_v1", "stable-diffusion-v1", "diffusers"),
    "sd2": ("sd_v2", "stable-diffusion-v2-512", "diffusers"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base", _STABILITY),
    "sdxl_refiner": ("sdxl_refiner_v1-0", "stable-diffusion-xl-v1-refiner", _STABILITY),
}


FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sdxl_refiner": "the SDXL refiner"}


def metadata_family(metadata: dict) -> str | None:
    """The BASE_FAMILIES key a LoRA file's metadata names (kohya's `ss_base_model_version`, which FocusFix and
    kohya write); None when it names none (the tiny model, or a file without it)."""
    version = metadata.get("ss_base_model_version")
    return next((f for f, (v, _, _) in BASE_FAMILIES.items() if v == version), None)


def family_mismatch(metadata: dict, family: str | None) -> str:
    """Why a LoRA may not fit a model, for an error message: the two families when the LoRA's metadata and the
    model's family (a BASE_FAMILIES key) are both known and differ, else a question.

    Example:
        >>> family_mismatch({"ss_base_model_version": "sdxl_base_v1-0"}, "sd1")
        'this LoRA was trained on SDXL, this MODEL is SD1.x'
    """
    trained = metadata_family(metadata)
    if trained is not None and family in BASE_FAMILIES and trained != family:
        return f"this LoRA was trained on {FAMILY_NAMES[trained]}, this MODEL is {FAMILY_NAMES[family]}"
    return "trained on another model type?"


def base_model_metadata(family: str | None, *, v_prediction: bool = False, width: int = 512, height: int = 512,
                        title: str = "FocusFix LoRA") -> dict[str, str]:
    """The metadata other tools read to tell which base model a LoRA is for: kohya's `ss_base_model_version` /
    `ss_v2` (A1111 and Forge file a LoRA under SD1, SD2 or SDXL by them and hide it for other checkpoints; a file
    with metadata but without them counts as SD1) and the SAI model spec (`modelspec.*`). {} for a family not in
    BASE_FAMILIES (e.g. the tiny model)."""
    if family not in BASE_FAMILIES:
        return {}
    version, arch, impl = BASE_FAMILIES[family]
    if family == "sd2" and v_prediction:
        arch = "stable-diffusion-v2-768-v"
    return {
        "ss_base_model_version": version,
        "ss_v2": str(family == "sd2"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": impl,
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }


def lora_metadata(lora: LoRA, metadata: dict | None = None) -> dict[str, str]:
    """str -> str file metadata: `metadata` (non-str values as JSON) plus kohya's `ss_network_module/dim/alpha`
    (read by A1111/Forge) and `focusfix_version`/`focusfix_targets`, which are set from `lora` and win.

    Raises:
        TypeError: metadata is not a dict with str keys.
    """
    if not isinstance(metadata, (dict, type(None))):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    out = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"metadata keys must be str, got {k!r}")
        out[k] = v if isinstance(v, str) else json.dumps(v, default=str)
    targets = [lora.targets] if isinstance(lora.targets, str) else list(lora.targets)
    out.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": f"{lora.alpha:g}",
        "focusfix_version": _focusfix_version(),
        "focusfix_targets": json.dumps(targets),
    })
    return out


def save_lora(
    path: str | os.PathLike, lora: LoRA, metadata: dict | None = None, overwrite: bool = False,
    prefix: str = "lora_unet", dtype: torch.dtype | None = None, diffusers_names: bool = False,
) -> Path:
    """Save `lora` as a kohya .safetensors file, atomically, with `lora_metadata(lora, metadata)`.

    Args:
        path: target file.
        lora: the adapters.
        metadata: extra entries (method, base model, rewards, lam, K, steps...).
        overwrite: replace an existing file.
        prefix, dtype: see `LoRA.state_dict_kohya`.
        diffusers_names: True for an SD1.x/2.x UNet, as the nodes save it: kohya's names for those models, the
            only ones diffusers reads there; False keeps the LDM names (SDXL's, as kohya's; any other net).

    Raises:
        FileExistsError: `path` exists and not `overwrite`.
    """
    if not isinstance(lora, LoRA):
        raise TypeError(f"lora must be a LoRA, got {type(lora).__name__}")
    path = Path(path)
    if os.path.lexists(path) and not overwrite:  # before the work; the save itself checks again, atomically
        raise FileExistsError(f"LoRA file {str(path)!r} exists; pass overwrite=True or choose another name")
    tensors = lora.state_dict_kohya(prefix, dtype, diffusers_names=diffusers_names)
    return atomic_save_safetensors(tensors, path, lora_metadata(lora, metadata), overwrite)


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(kohya tensors, metadata) from a .safetensors (or weights-only pickle) LoRA file.

    Raises:
        FileNotFoundError / ValueError: no such file, an unreadable file, or tensors no LoRA holds (naming the
            file and the first keys): not float, NaN/inf values, an `.alpha` that is not one number > 0.
    """
    tensors, metadata = load_tensor_file_with_metadata(path)
    _check_lora_tensors(tensors, os.path.basename(str(path)))
    return tensors, metadata


def _check_lora_tensors(tensors: dict[str, torch.Tensor], name: str) -> None:
    """A NaN adapter turns every image it touches NaN (silently, in KSampler), an integer one is no weight delta,
    and a negative `.alpha` flips the delta's sign."""
    try:
        check_float_finite(tensors, "LoRA tensors", " (a corrupt file, or a training run that diverged: use an "
                                                    "earlier checkpoint)")
    except ValueError as e:
        raise ValueError(f"{name!r}: {e}") from None
    # a down/up of another rank (a 0-dim "weight", or r = 0) has no place in any layer: refused here, by name
    bad = [k for k, v in tensors.items() if k.endswith((".lora_down.weight", ".lora_up.weight"))
           and (v.ndim not in (2, 4) or 0 in v.shape)]
    if bad:
        raise ValueError(f"{name!r}: a LoRA's down/up weights are [r,in]/[out,r] (conv: [r,in,kh,kw]/[out,r,1,1]) "
                         f"with r >= 1, got {list(tensors[bad[0]].shape)} for {bad[:3]}")
    bad_alpha = [k for k, v in tensors.items() if k.endswith(f".{_ALPHA}") and (v.numel() != 1 or float(v) <= 0)]
    if bad_alpha:
        raise ValueError(f"{name!r}: each .alpha must be one number > 0, got "
                         f"{tensors[bad_alpha[0]].flatten()[:4].tolist()} for {bad_alpha[:3]}")


@dataclass(frozen=True)
class SavedLoRA:
    """A LoRA file FocusFix saved: kohya tensors (fp32), str metadata, and how it was attached."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    targets: tuple[str, ...]
    rank: int
    alpha: float
    source: str = ""  # the file's name, for errors ("" for a LoRA not read from a file)

    @property
    def method(self) -> str:
        return self.metadata.get("focusfix_method", "focus-n-fix")

    @property
    def config_targets(self) -> str | tuple[str, ...]:
        """The targets as a config takes them: the preset name alone ("attn"), else the tuple."""
        return self.targets[0] if len(self.targets) == 1 else self.targets

    def attach(self, net: nn.Module) -> LoRA:
        """This LoRA hooked onto `net` again, trainable (`LoRA.from_kohya`; ValueError if it does not fit, naming
        `source`).

        Preset targets pick the layers as in the run that saved it. Other targets are regexes read from the file:
        they are never run (a shared file's pattern built to backtrack would hang the process, where no cancel
        reaches); the file's own keys name its layers instead (`paths_in_kohya`)."""
        try:
            modules = None if all(t in TARGET_PRESETS for t in self.targets) else paths_in_kohya(net, self.tensors)
            return LoRA.from_kohya(net, self.tensors, self.config_targets, self.rank, self.alpha, modules=modules)
        except ValueError as e:
            if not self.source:
                raise
            raise ValueError(f"{self.source!r}: {e}") from None


def read_focusfix_lora(path: str | os.PathLike) -> SavedLoRA:
    """Read a LoRA FocusFix saved (its metadata names the targets), to continue training or apply it.

    Raises:
        FileNotFoundError / ValueError: no such file, an unreadable file, tensors no LoRA holds (`load_lora_file`),
            a LoRA FocusFix did not save (no `focusfix_targets`), mixed ranks, or `.alpha` tensors other than
            the metadata's alpha, naming the file and what to do.
    """
    name = os.path.basename(str(path))
    tensors, metadata = load_lora_file(path)
    if "focusfix_targets" not in metadata:
        kind = ("" if name.lower().endswith(".safetensors") else
                " (FocusFix saves .safetensors; this file has no metadata)")
        raise ValueError(f"{name!r} is not a LoRA FocusFix saved{kind} (its metadata has no 'focusfix_targets'). To "
                         f"train a fix on top of another LoRA, apply that LoRA to the model first (in ComfyUI: "
                         f"Load LoRA before the FocusFix Train node)")
    ranks = {int(v.shape[0]) for k, v in tensors.items() if k.endswith(".lora_down.weight")}
    if len(ranks) != 1:
        raise ValueError(f"{name!r}: FocusFix LoRAs have one rank for every layer, found ranks {sorted(ranks)}")
    (rank,) = ranks
    try:
        targets = json.loads(metadata["focusfix_targets"])
        alpha = float(metadata.get("ss_network_alpha", rank))
    except (ValueError, TypeError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        raise ValueError(f"{name!r}: unreadable FocusFix metadata ({e})") from None
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"{name!r}: unreadable FocusFix metadata (focusfix_targets must be a list of layer "
                         f"patterns, got {metadata['focusfix_targets']!r})")
    if not 0 < alpha < math.inf:
        raise ValueError(f"{name!r}: unreadable FocusFix metadata (ss_network_alpha must be a number > 0, got "
                         f"{metadata.get('ss_network_alpha', rank)!r})")
    # FocusFix gives every layer the one alpha its metadata states (rel_tol: a bf16 file rounds it to 3 digits)
    other = [k for k, v in tensors.items()
             if k.endswith(f".{_ALPHA}") and not math.isclose(float(v), alpha, rel_tol=1e-2)]
    if other and "ss_network_alpha" in metadata:
        raise ValueError(f"{name!r}: {len(other)} .alpha tensors differ from the metadata's alpha "
                         f"(ss_network_alpha {alpha:g}), e.g. {other[0]} = {float(tensors[other[0]]):g}: the file "
                         f"was altered after FocusFix saved it")
    # FocusFix always writes .alpha; without them every LoRA loader (ComfyUI's, kohya's) applies alpha = rank
    if not any(k.endswith(f".{_ALPHA}") for k in tensors) and not math.isclose(alpha, rank, rel_tol=1e-2):
        raise ValueError(f"{name!r}: the file has no .alpha tensors, so LoRA loaders apply it with alpha = rank "
                         f"({rank}), but its metadata says ss_network_alpha {alpha:g}: the file was altered after "
                         f"FocusFix saved it")
    targets = tuple(targets)
    # copies: a tensor safetensors maps keeps the file open, and Windows then refuses to replace it (a Save
    # LoRA over the LoRA this run continued)
    return SavedLoRA({k: v.to(torch.float32, copy=True) for k, v in tensors.items()}, dict(metadata), targets, rank,
                     alpha, name)


def steps_trained(metadata: dict) -> int:
    """The steps a saved LoRA was trained (`focusfix_steps_trained`); 0 when absent or unreadable."""
    try:
        return int(metadata.get("focusfix_steps_trained", 0))
    except ValueError:
        return 0


def continued_metadata(metadata: dict, previous: dict) -> dict:
    """LoRA metadata of a run that continued a LoRA with metadata `previous`: `focusfix_steps_trained` counts
    the earlier steps too, and `focusfix_previous_config` keeps the earlier run's settings."""
    out = dict(metadata)
    out["focusfix_steps_trained"] = str(steps_trained(previous) + int(metadata.get("focusfix_steps_trained", 0)))
    if "focusfix_config" in previous:
        out["focusfix_previous_config"] = previous["focusfix_config"]
    return out


class MergedWhenNoGrad:
    """Wrap a denoiser so its graph-free calls run on merged weights (W + scale * up @ down, no hooks) and
    its differentiated calls on the hooks. One merge and one restore per sampled trajectory, instead of
    ~10 extra kernels per adapted layer per call (SD1.5 CFG call: 708 kernels merged vs 1988 hooked). The
    original host weights are kept once, so restoring is bit-exact.

    Args:
        denoiser: the `denoiser(x, sigma, cond) -> x0` whose network the LoRA is attached to.
        lora: the adapters.
        offload: keep the original weights in (pinned) CPU memory, copied back once per trajectory. None:
            when the hosts are on a GPU, where the copy would take device memory (SD1.5 attn: 0.17 GiB
            bf16; SDXL: 1.78 GiB of a 12 GiB card) and the copy back is one host-to-device transfer.

    Hosts stored in float8 (ComfyUI's fp8 weight dtypes) are never merged: 3 mantissa bits would round a
    young LoRA's delta away, so the graph-free calls would sample the base model. There the hooks stay on.

    Always call `restore()` after sampling (a `finally`): an interrupted trajectory may stop merged.
    """

    def __init__(self, denoiser, lora: LoRA, offload: bool | None = None):
        self.denoiser, self.lora, self.merged = denoiser, lora, False
        hosts = lora._hosts
        self.mergeable = not any(_is_fp8(h.weight.dtype) for h in hosts)
        if offload is None:
            offload = any(h.weight.device.type == "cuda" for h in hosts)
        self.offload = bool(offload)
        self.originals = [self._keep(h.weight.detach()) for h in hosts] if self.mergeable else []

    def _keep(self, w: torch.Tensor) -> torch.Tensor:
        if not self.offload:
            return w.clone()
        pin = w.device.type == "cuda"  # pinned: the copy back is an async DMA, not a staged copy
        return torch.empty(w.shape, dtype=w.dtype, device="cpu", pin_memory=pin).copy_(w)

    @torch.no_grad()
    def _merge(self) -> None:
        # the hosts hold the originals here (never merged, or restored): add the delta in place. Marked merged
        # first: a failure part-way (out of memory in a delta) leaves restore() to write back every original,
        # not LoRA deltas baked into a shared MODEL's weights for the rest of the session
        self.merged = True
        for host, adapter in zip(self.lora._hosts, self.lora.adapters):
            w = host.weight
            w.copy_((w.to(_at_least_fp32(w.dtype)) + adapter.weight_delta(self.lora.strength).to(w.device)).to(w.dtype))
        self.lora.enabled = False

    def release(self) -> None:
        """Restore, then drop the copy of the original weights (page-locked beside a GPU: see
        `release_pinned_memory`); later graph-free calls run the hooks, as on fp8 weights."""
        self.restore()
        self.originals, self.mergeable = [], False

    @torch.no_grad()
    def restore(self) -> None:
        if self.merged:
            for host, w0 in zip(self.lora._hosts, self.originals):
                host.weight.copy_(w0, non_blocking=w0.is_pinned())
            self.lora.enabled, self.merged = True, False

    def __call__(self, x, sigma, cond):
        if self.merged and torch.is_grad_enabled():
            self.restore()  # first differentiated call, or its recompute in backward
        elif self.mergeable and not self.merged and self.lora.enabled and not torch.is_grad_enabled():
            self._merge()
        return self.denoiser(x, sigma, cond)


def release_pinned_memory() -> None:
    """Give torch's cached page-locked host memory back (its allocator keeps freed pinned blocks for the life of
    the process): call after a run on a GPU, once `MergedWhenNoGrad.release` dropped its copy. Through
    `torch.accelerator.empty_host_cache` where torch has it, else `torch._C._host_emptyCache` (torch 2.5 to 2.11,
    the GPU machines' build among them); a no-op without CUDA, before CUDA is initialized, or with neither."""
    empty = (getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
             or getattr(torch._C, "_host_emptyCache", None))
    if empty is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        empty()
