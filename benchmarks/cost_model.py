"""GPU-free cost model of a training iteration at full SD1.5 / SDXL size (issue 6): memory and kernel counts.

Everything runs on PyTorch's `meta` device: tensors have shapes and dtypes but no data, so the real
architectures (built with ComfyUI's own classes, as `train_speed.py --backend comfy --size full` builds them)
run in seconds on any machine. What it measures, per family:

- **weights**: bytes of the UNet, the VAE, the reward (CLIP ViT-L/14 + aesthetic head) and the LoRA.
- **kernels per UNet call**: non-view aten ops of one batched CFG call (cond + uncond), with the LoRA's hooks
  on and with the LoRA merged (what `MergedWhenNoGrad` gives the graph-free steps). In eager mode each is
  at least one kernel launch, so this is what CUDA graphs / torch.compile would remove.
- **peak memory of the differentiated tail** (`LiveBytes`, below: storages alive at once): the part of
  `FixTrainer.train_step` that holds a graph, i.e. the last (K = 1) denoiser call with gradients
  and the differentiable decode, both checkpointed block by block as the trainer does (`--variants`: also
  the decode checkpointed as a whole; whole-call checkpointing, the trainer before block-wise
  checkpointing; no checkpointing), the reward, the region loss against the cached I0 and M,
  backward and the AdamW step. The N - K graph-free calls before it hold one call's activations at a time,
  measured separately ("graph-free call").

Attention is ComfyUI's PyTorch SDPA path (its default on NVIDIA). On `meta` SDPA has no flash kernel, so
the attention matrices would count as materialised; `--attention flash` (default) routes SDPA to the flash
kernel's own op (`aten._scaled_dot_product_flash_attention`, which has meta and autograd support), which
keeps only the output and its log-sum-exp, as the GPU does. `--attention math` shows the materialising case.

Not counted: the CUDA context, the caching allocator's rounding and fragmentation, cuBLAS/cuDNN workspaces,
and models ComfyUI keeps on the GPU beside ours (text encoders: SD1.5 0.25 GB, SDXL 1.6 GB in fp16).

Example:
    COMFYUI_DIR=/path/ComfyUI python benchmarks/cost_model.py --models sd15,sdxl --batches 1,4
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import sys
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed as ts  # noqa: E402  (same model configs, ComfyUI import and pack import as the harness)

META = torch.device("meta")
GIB = 2**30
# aten ops that only make a view or allocate (no kernel launch in eager CUDA)
_VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
             "squeeze", "split", "split_with_sizes", "chunk", "reshape", "detach", "alias", "as_strided",
             "unbind", "narrow", "view_as", "_reshape_alias", "unflatten", "flatten",
             # allocation only: no kernel either (CFGDenoiser's empty CFG_PAIR marker is one)
             "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created while active (tensors made before, e.g. weights, are not counted):
    each op output's storage counts from its creation until Python frees it (weak references)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _free(self, nbytes, _ref):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: no new storage
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self._seen:
                    n = st.nbytes()
                    self._seen[st] = weakref.ref(st, functools.partial(self._free, n))
                    self.live += n
                    self.peak = max(self.peak, self.live)
        return out


class OpCounter(TorchDispatchMode):
    """Counts aten ops that are not views or bare allocations (each is >= 1 kernel launch in eager mode)."""

    def __init__(self):
        super().__init__()
        self.kernels, self.views = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__.split(".")[0] in _VIEW_OPS:
            self.views += 1
        else:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA through the flash kernel's op, whose saved tensors are what a GPU keeps (out + logsumexp)."""
    if attn_mask is not None or dropout_p or is_causal:
        raise NotImplementedError("the cost model's flash SDPA covers ComfyUI's plain attention only")
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[0]


@contextmanager
def attention_mode(mode: str):
    if mode != "flash":
        yield
        return
    orig = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


def build(family: str, dtype: torch.dtype, reward_dtype: torch.dtype = torch.float32):
    """(ComfyDiffusionModel on meta, reward on meta, core package). Same configs as train_speed's full size."""
    ts._import_comfy(torch.device("cpu"), "pytorch")  # SDPA: ComfyUI's own choice on NVIDIA GPUs
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models as sm
    adapters = ts._import_pack()
    cfg = dict(ts.UNET_CONFIGS[(family, "full")])
    mc = (sm.SD15 if family == "sd15" else sm.SDXL)(cfg)
    mc.set_inference_dtype(dtype, None)
    mc.unet_config.update(cfg)
    mc.unet_config["dtype"] = dtype
    base = mc.get_model({}, device=META)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=META, offload_device=META)
    logging.disable(logging.WARNING)
    try:
        vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": ts.VAE_DDCONFIG["full"]}},
                           dtype=dtype, device=META)
    finally:
        logging.disable(logging.NOTSET)
    vae.first_stage_model.to(META)
    dm = adapters.ComfyDiffusionModel(patcher, None, vae)  # reads the real sigma table first
    base.model_sampling.to(META)
    core = f"{ts.PACK}.focusfix_core"
    reward = ts.build_reward(core, "full", META, reward_dtype)  # the tower as Load Reward's precision loads it
    for m in (base, vae.first_stage_model, reward):  # frozen, as in the trainer's step (and the adapter's clones)
        m.requires_grad_(False)
    return dm, reward, core


def _bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def _cond(family: str, B: int) -> dict:
    ctx = torch.randn(B, 77, 768 if family == "sd15" else 2048, device=META)
    return {"context": ctx} if family == "sd15" else {"context": ctx, "y": torch.randn(B, 2816, device=META)}


def unet_call(dm, core, family, lora, side: int, B: int, merged: bool) -> dict:
    """Kernels of one graph-free CFG call at batch B (2B rows through the UNet). merged: the second call's
    count (the first one also merges, once per trajectory), and the merge's own kernels."""
    denoisers = importlib.import_module(f"{core}.denoisers")
    lora_mod = importlib.import_module(f"{core}.lora")
    cfgd = denoisers.CFGDenoiser(dm.denoise, _cond(family, B), 7.5)
    call = lora_mod.MergedWhenNoGrad(cfgd, lora) if merged else cfgd
    x, sigma = torch.randn(B, 4, side // 8, side // 8, device=META), torch.full((B,), 5.0, device=META)
    try:
        with torch.no_grad():
            with OpCounter() as first:
                call(x, sigma, _cond(family, B))
            with OpCounter() as n:
                call(x, sigma, _cond(family, B))
    finally:
        if merged:
            call.restore()
    out = {"kernels": n.kernels, "views": n.views}
    if merged:
        out["merge_kernels"] = first.kernels - n.kernels
    return out


def graph_free_peak(dm, core, family, lora, side: int, B: int) -> int:
    """Peak activation bytes (weights excluded) of one graph-free CFG call, merged LoRA."""
    denoisers = importlib.import_module(f"{core}.denoisers")
    lora_mod = importlib.import_module(f"{core}.lora")
    call = lora_mod.MergedWhenNoGrad(denoisers.CFGDenoiser(dm.denoise, _cond(family, B), 7.5), lora)
    x, sigma, cond = (torch.randn(B, 4, side // 8, side // 8, device=META), torch.full((B,), 5.0, device=META),
                      _cond(family, B))
    try:
        with torch.no_grad(), LiveBytes() as live:
            call(x, sigma, cond)
    finally:
        call.restore()
    return live.peak


def tail_peak(dm, reward, core, family, lora, side: int, B: int, checkpoint: str = "blocks",
              checkpoint_decode: bool = False) -> int:
    """Peak bytes above the weights of FixTrainer.train_step's differentiated part (module docstring):
    activations, LoRA gradients and AdamW state, the cached I0 and M."""
    denoisers = importlib.import_module(f"{core}.denoisers")
    lora_mod = importlib.import_module(f"{core}.lora")
    sampler = importlib.import_module(f"{core}.sampler")
    losses = importlib.import_module(f"{core}.losses")
    blocks = dm.checkpoint_modules() if checkpoint == "blocks" else []
    decode = dm.decode
    if checkpoint_decode:
        def decode(z):
            return torch.utils.checkpoint.checkpoint(dm.decode, z, use_reentrant=False)
    sigmas = torch.tensor([5.0, 0.0])  # the last step: the only one whose activations are kept
    train = None
    try:
        with LiveBytes() as live:
            # built inside: FixTrainer keeps both for the whole run (MergedWhenNoGrad: a copy of the host weights)
            train = lora_mod.MergedWhenNoGrad(denoisers.CFGDenoiser(dm.denoise, _cond(family, B), 7.5), lora)
            opt = torch.optim.AdamW(list(lora.parameters()), lr=1e-4, weight_decay=0.0)
            I0 = torch.rand(B, 3, side, side, device=META)  # cached base image and mask (FixTrainer.base)
            M = torch.rand(B, side, side, device=META)
            with torch.enable_grad(), sampler.checkpointed_modules(blocks):
                z = sampler.sample(train, torch.randn(B, 4, side // 8, side // 8, device=META), sigmas,
                                   _cond(family, B), K=1, checkpoint=checkpoint == "call")
                I = decode(z).float()
                # reward_loss(reward(I)) + region_loss(I, I0, M).mean(), without their input checks (they need data)
                region = losses._safe_norm(((1 - M[:, None]) * (I0 - I)).square().flatten(1).sum(1))
                loss = -reward.score(I).mean() + region.mean()
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        if train is not None:
            train.restore()
    return live.peak


def run(family: str, args) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    side = args.size_px or {"sd15": 512, "sdxl": 1024}[family]
    dm, reward, core = build(family, dtype, ts.REWARD_DTYPES[args.reward_dtype])
    lora_mod = importlib.import_module(f"{core}.lora")
    lora = lora_mod.LoRA.attach(dm.net, "attn", rank=4, device=META)
    try:
        weights = {"unet": _bytes(dm.net), "vae": _bytes(dm.vae.first_stage_model), "reward": _bytes(reward),
                   "lora": _bytes(lora)}
        # MergedWhenNoGrad's copy of the adapted weights: on meta it stays on the device (counted in each
        # tail); on a GPU it is offloaded to pinned CPU memory, so the GPU peak is the tail's minus this
        originals = sum(h.weight.numel() * h.weight.element_size() for h in lora._hosts)
        out = {"family": family, "image": side, "dtype": args.dtype, "reward_dtype": args.reward_dtype,
               "attention": args.attention,
               "weights_gib": {k: v / GIB for k, v in weights.items()}, "merge_originals_gib": originals / GIB,
               "unet_parameters": sum(p.numel() for p in dm.net.parameters()), "per_batch": {}}
        with attention_mode(args.attention):
            for B in args.batches:
                row = {"unet_call_hooks": unet_call(dm, core, family, lora, side, B, merged=False),
                       "unet_call_merged": unet_call(dm, core, family, lora, side, B, merged=True),
                       "graph_free_call_activation_gib": graph_free_peak(dm, core, family, lora, side, B) / GIB}
                for name, kw in (("tail", {}), ("tail_decode_checkpointed", {"checkpoint_decode": True}),
                                 ("tail_call_checkpoint", {"checkpoint": "call"}),
                                 ("tail_no_checkpoint", {"checkpoint": "none"})):
                    if name != "tail" and not args.variants:
                        continue
                    above = tail_peak(dm, reward, core, family, lora, side, B, **kw) / GIB
                    peak = above + sum(weights.values()) / GIB
                    row[name] = {"above_weights_gib": above, "peak_gib": peak,
                                 "peak_gib_originals_offloaded": peak - originals / GIB}
                out["per_batch"][str(B)] = row
                print(f"[cost_model] {family} b{B}: tail peak {row['tail']['peak_gib_originals_offloaded']:.2f} GiB, "
                      f"{row['unet_call_hooks']['kernels']} kernels/call with hooks, "
                      f"{row['unet_call_merged']['kernels']} merged", file=sys.stderr, flush=True)
    finally:
        lora.remove()
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sd15,sdxl", help="comma list of sd15, sdxl")
    p.add_argument("--batches", default="1,4", help="comma list of batch sizes")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="UNet and VAE weights")
    p.add_argument("--size-px", type=int, default=None, help="image side (default 512 / 1024)")
    p.add_argument("--reward-dtype", choices=tuple(ts.REWARD_DTYPES), default="fp32",
                   help="the reward's CLIP tower, as FocusFix Load Reward's precision (default fp32)")
    p.add_argument("--attention", choices=("flash", "math"), default="flash")
    p.add_argument("--variants", action="store_true",
                   help="also the tails with the decode checkpointed as a whole, with whole-call checkpointing, "
                        "without checkpointing")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if any(b < 1 for b in args.batches):
        p.error("--batches must be positive")
    args.models = ts.parse_models(p, args.models)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t = time.perf_counter()
    doc = {"benchmark": "cost_model (issue 6)", "device": "meta (no data: shapes and dtypes only)",
           "torch": torch.__version__, "models": [run(f, args) for f in args.models]}
    doc["seconds"] = time.perf_counter() - t
    return doc


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
