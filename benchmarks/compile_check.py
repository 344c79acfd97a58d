"""Can torch.compile / CUDA graphs hold inside ComfyUI? Graph breaks of one UNet call (issue 6), GPU-free.

`torch._dynamo.explain` traces one CFG denoiser call through the pack's adapter (`ComfyDiffusionModel`) on
ComfyUI's own SD1.5 / SDXL UNet classes, as `train_speed.py --backend comfy` builds them, and reports how many
graphs it splits into and why. One graph with no break is what `torch.compile(mode="reduce-overhead")`
needs to capture a whole call in a CUDA graph; every break is a return to Python (and, under CUDA graphs,
a separate graph). Three calls, each with a rank-4 LoRA on attn q/k/v/out:

- `hooks`: a graph-free call with the LoRA's forward hooks on;
- `merged`: a graph-free call with the LoRA merged (`MergedWhenNoGrad`, what the trainer's N - K steps run);
- `grad`: the differentiated call (hooks on, gradients enabled).

`--attention pytorch` (default) is ComfyUI's choice on NVIDIA GPUs (SDPA); `--attention default` is its pick on
this machine (sub-quadratic on a CPU, which the adapter replaces by SDPA: it has no reliable backward, and it
asks psutil for free memory inside every attention call, a graph break each).

Example:
    COMFYUI_DIR=/path/ComfyUI python benchmarks/compile_check.py --models sd15,sdxl --size tiny
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections import Counter
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed as ts  # noqa: E402  (same model configs, ComfyUI import and pack import as the harness)

CALLS = ("hooks", "merged", "grad")


def _where(brk) -> str:
    """The innermost frame of a break outside torch itself, as file:line."""
    frames = [f for f in (brk.user_stack or []) if "/torch/" not in f.filename] or list(brk.user_stack or [])
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


def explain_call(dm, core: str, lora, kind: str, side: int, cond, uncond) -> dict:
    """Graphs, breaks and ops of one CFG call of kind `kind` (CALLS) at batch 1, side x side pixels."""
    denoisers = importlib.import_module(f"{core}.denoisers")
    lora_mod = importlib.import_module(f"{core}.lora")
    cfgd = denoisers.CFGDenoiser(dm.denoise, uncond, 7.5)
    call = lora_mod.MergedWhenNoGrad(cfgd, lora) if kind == "merged" else cfgd
    x = torch.randn(1, dm.latent_channels, side // 8, side // 8, device=dm.device)
    sigma = torch.tensor([5.0], device=dm.device)
    torch._dynamo.reset()
    t = time.perf_counter()
    try:
        with torch.set_grad_enabled(kind == "grad"):
            ex = torch._dynamo.explain(call)(x, sigma, cond)
    finally:
        if kind == "merged":
            call.restore()
    reasons = Counter(f"{_where(b)}: {' '.join(str(b.reason).split())[:240]}" for b in ex.break_reasons)
    off = off_device_nodes(ex.graphs, dm.device)
    return {"graphs": ex.graph_count, "graph_breaks": ex.graph_break_count, "ops": ex.op_count,
            "break_reasons": [{"count": n, "where_and_why": r} for r, n in reasons.most_common(10)],
            "off_device_nodes": sum(off.values()),
            "off_device_examples": [{"count": n, "node": k} for k, n in off.most_common(5)],
            "seconds": time.perf_counter() - t}


def off_device_nodes(graphs, device: torch.device) -> Counter:
    """Graph nodes whose tensor values live on another device type than the model: work on the CPU inside a
    GPU call (a host sync or a copy each call), and the reason CUDA graphs would be skipped for the graph."""
    out = Counter()
    for gm in graphs:
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            for v in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(v, torch.Tensor) and v.device.type != device.type:
                    out[f"{node.op} {str(node.target)[:60]} -> {v.device.type} {tuple(v.shape)}"] += 1
    return out


@contextmanager
def on_meta(family: str):
    """(dm, adapters, core) of the full architecture on PyTorch's meta device (cost_model's build; no data):
    ComfyUI's compute device is meta meanwhile, so the adapter puts conds and latents there."""
    import cost_model as cm  # noqa: E402  (builds the same configs on meta)
    dm, _, core = cm.build(family, torch.bfloat16)
    import comfy.model_management as mm
    real = mm.get_torch_device
    mm.get_torch_device = lambda: cm.META
    try:
        yield dm, ts._import_pack(), core
    finally:
        mm.get_torch_device = real


def _meta_cond(dm, adapters, family: str, side: int) -> dict:
    """A prepared cond on meta, as `prepare_cond` leaves it (its encode_adm cannot read meta data)."""
    cond = {"context": torch.randn(1, 77, 768 if family == "sd15" else 2048, device=dm.device)}
    if dm.is_adm:
        cond[adapters._y_key((side // 8, side // 8))] = torch.randn(1, dm.base.adm_channels, device=dm.device)
    return cond


def run(family: str, args) -> dict:
    with ExitStack() as stack:
        if args.device == "meta":
            dm, adapters, core = stack.enter_context(on_meta(family))
        else:
            device = torch.device(args.device)
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            dm, adapters, core = ts.build_comfy(family, args.size, device, dtype, inference_weights=True,
                                                attention=args.attention)
        return _run_calls(family, dm, adapters, core, args)


def _run_calls(family: str, dm, adapters, core: str, args) -> dict:
    import comfy.ldm.modules.attention as comfy_attention
    size = "full" if args.device == "meta" else args.size
    side = args.size_px or {"tiny": 64, "full": 512 if family == "sd15" else 1024}[size]
    lora = importlib.import_module(f"{core}.lora").LoRA.attach(dm.net, "attn", rank=4, device=dm.device)
    out = {"family": family, "size": size, "image": side,
           "comfy_attention": comfy_attention.optimized_attention.__name__, "calls": {}}
    try:
        # the trainer's setting: plain weights, model loaded (on meta: built that way)
        with adapters.training_session(dm) if args.device != "meta" else nullcontext():
            # prepared as the trainers prepare them: on the device, SDXL's y built once (CPU ops otherwise)
            cond, uncond = ((_meta_cond(dm, adapters, family, side) for _ in range(2)) if args.device == "meta" else
                            (dm.prepare_cond(dm.encode_prompts([p]), (side // 8, side // 8))
                             for p in ("a cat and a dog", "")))
            for kind in args.calls:
                row = explain_call(dm, core, lora, kind, side, cond, uncond)
                out["calls"][kind] = row
                print(f"[compile_check] {family} {kind}: {row['graphs']} graph(s), {row['graph_breaks']} break(s), "
                      f"{row['ops']} ops, {row['off_device_nodes']} off-device node(s), {row['seconds']:.1f} s",
                      file=sys.stderr, flush=True)
    finally:
        lora.remove()
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sd15,sdxl", help="comma list of sd15, sdxl")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny")
    p.add_argument("--size-px", type=int, default=None, help="image side (default: tiny 64, full 512 / 1024)")
    p.add_argument("--attention", choices=("pytorch", "default"), default="pytorch",
                   help="pytorch: SDPA, ComfyUI's pick on NVIDIA; default: ComfyUI's pick on this machine")
    p.add_argument("--calls", default=",".join(CALLS), help=f"comma list of {', '.join(CALLS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda | cpu | meta (the full architectures with no data, ~3 minutes on 2 cores: checks that "
                        "each call stays on the model's device, which a CPU run cannot show; --size is ignored)")
    args = p.parse_args(argv)
    args.calls = args.calls.split(",")
    unknown = set(args.calls) - set(CALLS)
    if unknown:
        p.error(f"unknown --calls {sorted(unknown)}; known: {', '.join(CALLS)}")
    args.models = ts.parse_models(p, args.models)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t = time.perf_counter()
    doc = {"benchmark": "compile_check (issue 6)", "torch": torch.__version__, "device": args.device,
           "models": [run(f, args) for f in args.models]}
    doc["seconds"] = time.perf_counter() - t
    return doc


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
