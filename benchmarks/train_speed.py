"""Training speed of Focus-N-Fix, DRaFT-1 and Separate-and-Enhance (issue 6): one JSON document on stdout, or
rewritten to --out after every case (a run stopped at a time limit keeps the cases it finished).

Per case: seconds per iteration (median, min), iterations/s, the first iteration's seconds (it also builds
the cached I0 and M), peak memory, FLOPs of one iteration (`torch.utils.flop_counter.FlopCounterMode`),
achieved TFLOP/s and the fraction of the device's peak.

Backends:
    comfy: SD1.5/SDXL-architecture UNet, VAE and CLIP text encoders built with ComfyUI's own classes
        (`COMFYUI_DIR` on sys.path) with random weights (compute does not depend on the weights), driven
        through the node pack's adapter (`nodes/adapters.py`: `ComfyDiffusionModel`, `training_session`)
        exactly as the training nodes do. --size full: the real unet_config of each family; tiny: CPU-sized.
    core: the core's TinyModel (pixel space, no ComfyUI), so CI checks that the harness still works.

Reward: CLIP ViT-L/14 vision tower + LAION aesthetic MLP head (our core implementation, random weights;
a narrow tower at --size tiny).

Settings (issue 6): 512x512 (SDXL 1024x1024), deterministic DDIM 50 steps, CFG 7.5, K = 1, LoRA rank 4 on
attention q/k/v/out (Separate-and-Enhance: cross-attention to_k), bf16 weights on a GPU.

Examples:
    python benchmarks/train_speed.py --backend core --size tiny --iters 2 --warmup 1
    COMFYUI_DIR=/path/ComfyUI python benchmarks/train_speed.py --backend comfy --size full --device cuda \\
        --dtype bf16 --models sd15 --iters 5 --warmup 2
"""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import threading
import time
import traceback
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PACK = "focusfix_bench_pack"  # the node pack imported as a package (its modules use relative imports)

# Dense bf16 tensor-core peaks (TFLOP/s), used for fp16 too (the same dense rate on these parts). H100 and
# H200 (the same compute die): the issue's own figure (~790, the one its reference percentages use; the device
# notes measured about 790 on the H200 too); the rest from the vendors' data sheets (dense, no sparsity).
PEAK_BF16_TFLOPS = {"H100": 790.0, "H200": 790.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0,
                    "RTX 3090": 71.0, "A10G": 70.0, "L4": 121.0, "T4": 65.0}

# name: (trainer, overrides, batch)
CASES = {
    "draft_b1": ("fix", {"mask_source": "none", "lam": 0.0}, 1),
    "fnf_b1": ("fix", {"mask_source": "saliency", "lam": 1.0}, 1),
    "fnf_b4": ("fix", {"mask_source": "saliency", "lam": 1.0}, 4),
    "se_preserve_b4": ("se", {"lam_preserve": 1.0}, 4),
    "se_b4": ("se", {"lam_preserve": 0.0}, 4),
}
DEFAULT_CASES = {"sd15": list(CASES), "sdxl": ["draft_b1", "fnf_b1"], "tiny": list(CASES)}

FIX_PROMPT = "a red circle"
SE_PROMPT, SE_OBJECTS = "a red circle and a blue square", ("circle", "square")  # words the tiny model knows

# -- ComfyUI UNet configs: the real ones (comfy/model_detection.py) and CPU-sized ones of the same layout -----
_UNET_COMMON = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
                "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
                "use_temporal_resblock": False}
UNET_CONFIGS = {
    ("sd15", "full"): {**_UNET_COMMON, "adm_in_channels": None, "model_channels": 320,
                       "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                       "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
                       "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
                       "num_head_channels": -1, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]},
    ("sdxl", "full"): {**_UNET_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "model_channels": 320,
                       "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
                       "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
                       "context_dim": 2048, "num_heads": -1, "num_head_channels": 64,
                       "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]},
    # tiny: as tests/comfy_testing/tiny_models.py (context 32 = its tiny CLIP's width)
    ("sd15", "tiny"): {**_UNET_COMMON, "adm_in_channels": None, "model_channels": 32, "num_res_blocks": [1, 1],
                       "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_middle": 1,
                       "transformer_depth_output": [1, 1, 1, 1], "use_linear_in_transformer": False,
                       "context_dim": 32, "num_heads": 2, "num_head_channels": -1},
    ("sdxl", "tiny"): {**_UNET_COMMON, "num_classes": "sequential", "adm_in_channels": 32 + 6 * 256,
                       "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
                       "transformer_depth": [0, 2], "transformer_depth_middle": 1,
                       "transformer_depth_output": [0, 0, 2, 2], "use_linear_in_transformer": True,
                       "context_dim": 64, "num_heads": -1, "num_head_channels": 16},
}
VAE_DDCONFIG = {  # AutoencoderKL, 8x downscale, 4 latent channels
    "full": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
             "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
    "tiny": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
             "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
}
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
             "projection_dim": 32}

# (model, size) -> image side, sampler steps, Separate-and-Enhance attention resolution
GEOMETRY = {("sd15", "full"): (512, 50, 16), ("sdxl", "full"): (1024, 50, 32),
            ("sd15", "tiny"): (64, 4, 4), ("sdxl", "tiny"): (64, 4, 4), ("tiny", "tiny"): (32, 4, 8)}


# -- small utilities -----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _RSSPeak:
    """Peak resident set size above the value at start, sampled every 2 ms in a thread (CPU runs)."""

    def __init__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def delta(self) -> int:
        return self.peak - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def _memory(device: torch.device):
    """Yields a dict that gets `peak_memory_bytes` (CUDA: max allocated; CPU: RSS growth) on exit, and on CUDA
    `peak_memory_reserved_bytes` (max reserved: what the caching allocator held, what a smaller card must fit)."""
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        out.update(peak_memory_bytes=int(torch.cuda.max_memory_allocated(device)),
                   peak_memory_kind="torch.cuda.max_memory_allocated (weights included)",
                   peak_memory_reserved_bytes=int(torch.cuda.max_memory_reserved(device)))
    else:
        with _RSSPeak() as rss:
            yield out
        out.update(peak_memory_bytes=max(int(rss.delta), 1),
                   peak_memory_kind="RSS growth during the case (weights excluded)")


def cuda_allocator_backend() -> str | None:
    """torch's CUDA allocator backend: "native", or "cudaMallocAsync" (PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync,
    which ComfyUI's main.py sets for CUDA builds of torch on most NVIDIA GPUs: this harness does not import it, so a
    run measures torch's native allocator unless the variable is set). None on a torch built without CUDA."""
    get = getattr(getattr(torch.cuda, "memory", None), "get_allocator_backend", None)
    try:
        return None if get is None else get()
    except (AttributeError, RuntimeError):
        return None


CUDAGRAPH_LOG = "torch._inductor.cudagraph_utils.__cudagraphs"  # inductor's "cudagraphs" log: why it skipped them


class _Messages(logging.Handler):
    """The first few distinct messages of a logger, on one line each."""

    def __init__(self, keep: int = 8):
        super().__init__(logging.WARNING)
        self.keep, self.messages = keep, []

    def emit(self, record):
        msg = " ".join(record.getMessage().split())[:300]
        if msg not in self.messages and len(self.messages) < self.keep:
            self.messages.append(msg)


@contextmanager
def _cudagraph_skips(enabled: bool):
    """Yields a dict that gets, with `enabled`, `cudagraph_skips`: the change of Inductor's
    `counters["inductor"]["cudagraph_skips"]` over the block (graphs compiled without the CUDA graphs their mode
    asked for; on a CPU every reduce-overhead graph), and `cudagraph_skip_reasons`, what Inductor logged."""
    out: dict = {}
    if not enabled:
        yield out
        return
    from torch._dynamo.utils import counters
    handler, logger = _Messages(), logging.getLogger(CUDAGRAPH_LOG)
    before = counters["inductor"]["cudagraph_skips"]
    logger.addHandler(handler)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        out.update(cudagraph_skips=counters["inductor"]["cudagraph_skips"] - before,
                   cudagraph_skip_reasons=handler.messages)


def device_peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None) -> tuple[float, str]:
    """(peak TFLOP/s, where it came from): --peak-tflops, the spec table (bf16 and fp16 on known GPUs), or a
    measured matmul (fp32, other GPUs, CPU)."""
    if override:
        return float(override), "--peak-tflops"
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_BF16_TFLOPS.items():
            if key in name:
                return peak, f"spec sheet ({key}, dense bf16/fp16)"
    n = 2048 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        for _ in range(4):
            a @ a
        _sync(device)
        best = min(best, (time.perf_counter() - t) / 4)
    return 2 * n**3 / best / 1e12, f"measured {n}x{n} {str(dtype).removeprefix('torch.')} matmul"


# -- models ---------------------------------------------------------------------------------------------------
def build_core(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(TinyModel on device, core package prefix). Weights stay fp32: bf16 runs use autocast."""
    if size != "tiny":
        raise SystemExit("--backend core has --size tiny only (the core's TinyModel)")
    from focusfix_core.tiny.model import TinyConfig, TinyModel
    return TinyModel.random(seed, config=TinyConfig()).to(device).eval(), "focusfix_core"


def parse_models(parser: argparse.ArgumentParser, value: str) -> list[str]:
    """--models "sd15,sdxl" -> ["sd15", "sdxl"]; an unknown family is a usage error."""
    models = value.split(",")
    unknown = set(models) - {"sd15", "sdxl"}
    if unknown:
        parser.error(f"unknown --models {sorted(unknown)}; known: sd15, sdxl")
    return models


_COMFY_ARGS = [""]  # the --comfy-args ComfyUI was imported with (its modules read them once)


def _import_comfy(device: torch.device, attention: str = "default", comfy_args: str = ""):
    root = os.environ.get("COMFYUI_DIR", "")
    if not root or not Path(root, "comfy").is_dir():
        raise SystemExit(f"--backend comfy needs COMFYUI_DIR pointing at a ComfyUI checkout (got {root!r})")
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args
    args = comfy.cli_args.args
    if "comfy.model_management" in sys.modules:  # imported for an earlier model: those flags stay
        if comfy_args != _COMFY_ARGS[0]:
            raise SystemExit(f"--comfy-args {comfy_args!r}: ComfyUI was already imported with {_COMFY_ARGS[0]!r}")
    elif comfy_args:  # ComfyUI's own launch flags, as an artist starts it (read when its modules are imported)
        _COMFY_ARGS[0] = comfy_args
        parser = comfy.cli_args.parser
        given = parser.parse_args(shlex.split(comfy_args))
        for k, v in vars(given).items():
            if v != parser.get_default(k):
                setattr(args, k, v)
        if isinstance(args.fast, list):  # as comfy.cli_args post-processes it: --fast alone = every feature
            args.fast = set(args.fast) if args.fast else set(comfy.cli_args.PerformanceFeature)
    args.cpu = device.type == "cpu"  # read once when model_management is imported
    if attention == "pytorch":  # ComfyUI's own default on NVIDIA GPUs; on CPU it picks sub-quadratic attention
        args.use_pytorch_cross_attention = True
    import comfy.model_management as mm
    return mm


def _import_pack():
    """The node pack as package `PACK` (its modules use relative imports), so ComfyDiffusionModel is the
    adapter the nodes use and the core it runs is the pack's own copy."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module(f"{PACK}.nodes.adapters")


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """ComfyUI ops leave weights as torch.empty: fill them like tests/comfy_testing.randomize (1/sqrt(fan_in)
    matrices, unit norm weights, small biases), generated on the weights' own device (SDXL has 2.6e9)."""
    gens = {}
    for name, p in module.named_parameters():
        if p.device not in gens:  # one generator per device (setdefault would build one per parameter)
            gens[p.device] = torch.Generator(p.device).manual_seed(seed)
        g = gens[p.device]
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=g, device=p.device) / p[0].numel() ** 0.5)
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=g, device=p.device) * 0.01)
    return module


def build_comfy(family: str, size: str, device: torch.device, dtype: torch.dtype, inference_weights: bool,
                seed: int = 0, attention: str = "default", weight_dtype: torch.dtype | None = None,
                comfy_args: str = ""):
    """(ComfyDiffusionModel, adapters module, core package prefix) for family sd15|sdxl at size full|tiny.

    inference_weights: build under torch.inference_mode(), as ComfyUI's loader nodes do (the adapter then
    clones the weights in the gradient path for the run; that copy shows in the peak memory).
    weight_dtype: store the UNet's weights in this dtype (fp8) and compute in `dtype`, as ComfyUI's
    "Load Diffusion Model" node does with weight_dtype fp8_e4m3fn (manual cast per layer)."""
    mm = _import_comfy(device, attention, comfy_args)
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb
    adapters = _import_pack()
    load = mm.get_torch_device()
    with torch.inference_mode() if inference_weights else nullcontext():
        cfg = dict(UNET_CONFIGS[(family, size)])
        mc = (sm.SD15 if family == "sd15" else sm.SDXL)(cfg)
        store = weight_dtype or dtype
        mc.set_inference_dtype(store, None if store == dtype else dtype)
        mc.unet_config.update(cfg)  # unet_extra_config overrides num_heads/num_head_channels: put ours back
        mc.unet_config["dtype"] = store
        base = mc.get_model({}, device=load)
        randomize(base.diffusion_model, seed)
        model = comfy.model_patcher.ModelPatcher(base, load_device=load, offload_device=mm.unet_offload_device())
        logging.disable(logging.WARNING)  # "Missing VAE keys": expected, the weights are randomised next
        # the SD VAE's working dtypes are bf16/fp32 (comfy.sd.VAE): in an fp16 run ComfyUI decodes in bf16
        vae_dtype = mm.vae_dtype(load, [torch.bfloat16, torch.float32]) if dtype == torch.float16 else dtype
        try:
            vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": VAE_DDCONFIG[size]}},
                               dtype=vae_dtype, device=load)
        finally:
            logging.disable(logging.NOTSET)
        randomize(vae.first_stage_model.to(load), seed + 2)
        if family == "sd15":
            target = smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
            opts = {"clip_l_model_config": dict(TINY_CLIP)} if size == "tiny" else {}
        else:
            target = smb.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
            opts = {"clip_l_model_config": dict(TINY_CLIP), "clip_g_model_config": dict(TINY_CLIP)}
            opts = opts if size == "tiny" else {}
        clip = comfy.sd.CLIP(target, model_options=opts)
        randomize(clip.cond_stage_model, seed + 1)
    return adapters.ComfyDiffusionModel(model, clip, vae), adapters, f"{PACK}.focusfix_core"


# the reward's CLIP tower precisions (FocusFix Load Reward's `precision`)
REWARD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_reward(core: str, size: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """CLIP ViT-L/14 tower in `dtype` + fp32 aesthetic head (random weights), as Load Reward's precision loads
    them; a narrow tower at --size tiny."""
    clip_vision = importlib.import_module(f"{core}.rewards.clip_vision")
    aesthetic = importlib.import_module(f"{core}.rewards.aesthetic")
    if size == "full":
        cfg, widths = clip_vision.CLIPVisionConfig(), (768, 1024, 128, 64, 16)
    else:
        cfg = clip_vision.CLIPVisionConfig(width=64, layers=2, heads=2, patch=8, image_size=32, proj_dim=16,
                                           mlp_width=256)
        widths = (16, 32, 16, 8, 4)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)  # scoped by fork_rng (the CUDA generator too, on cuda)
        reward = aesthetic.AestheticReward(clip_vision.CLIPVisionTower(cfg), aesthetic.AestheticHead(widths))
    reward.tower.to(dtype)
    return reward.eval().requires_grad_(False)


# -- one case ---------------------------------------------------------------------------------------------------
def make_trainer(core: str, kind: str, overrides: dict, batch: int, model, reward, geometry, args, iterations: int):
    trainers = importlib.import_module(f"{core}.trainers")
    side, steps, resolution = geometry
    side = args.size_px or side
    common = dict(rank=4, lr=1e-4, iterations=iterations, batch_size=batch, seed=0, height=side, width=side)
    if kind == "fix":
        cfg = trainers.FixConfig(prompts=(FIX_PROMPT,), seeds=tuple(range(batch)), steps=args.steps or steps,
                                 sampler_name=args.sampler_name, scheduler=args.scheduler, cfg_scale=7.5, K=1, targets="attn",
                                 compile=args.compile, **common, **overrides)
        return trainers.FixTrainer(model, reward, cfg)
    cfg = trainers.SeparateEnhanceConfig(prompts=(SE_PROMPT,), objects=(SE_OBJECTS,), targets="to_k",
                                         resolution=args.resolution or resolution, preservation=args.preservation,
                                         **common, **overrides)
    return trainers.SeparateEnhanceTrainer(model, cfg)


def MergeWhenNoGrad(denoiser, lora):
    """The core's `lora.MergedWhenNoGrad` (LoRA merged for graph-free calls), from the LoRA's own core copy
    (the comfy backend runs the pack's `focusfix_core`). FixTrainer uses it in every step since 0eafaf0; the
    breakdown still times hooks on / off / merged side by side."""
    return importlib.import_module(type(lora).__module__).MergedWhenNoGrad(denoiser, lora)


@contextmanager
def levers(core: str, model, args):
    """Harness-side switches for levers whose home is the core (measured here, proposed there). The block lists
    of --no-checkpoint / --checkpoint-decode are set on the built trainer (`checkpoint_levers`)."""
    with ExitStack() as stack:
        if args.no_checkpoint:  # K = 1: checkpointing the one differentiated call only recomputes it
            trainers = importlib.import_module(f"{core}.trainers")
            orig = trainers.sample
            # train_step passes checkpoint= itself: a partial's keyword would lose to it
            trainers.sample = lambda *a, **k: orig(*a, **{**k, "checkpoint": False})
            stack.callback(setattr, trainers, "sample", orig)
        if args.allocator_check == "off":  # CUDA graphs tried under cudaMallocAsync too: does the fallback hold?
            sampler = importlib.import_module(f"{core}.sampler")
            if hasattr(sampler, "cuda_graphs_blocked"):
                stack.callback(setattr, sampler, "cuda_graphs_blocked", sampler.cuda_graphs_blocked)
                sampler.cuda_graphs_blocked = lambda mode, device: None
        if args.checkpoint_decode:  # the whole decode checkpointed as one, instead of the decoder's blocks
            decode = model.decode

            def checkpointed(z):
                if not torch.is_grad_enabled():
                    return decode(z)
                return torch.utils.checkpoint.checkpoint(decode, z, use_reentrant=False)

            model.decode = checkpointed
            stack.callback(delattr, model, "decode")
        yield


def checkpoint_levers(trainer, model, args) -> None:
    """On a built FixTrainer: its block list (the UNet's blocks and the VAE decoder's) is what a training step
    checkpoints one by one. --no-checkpoint empties it; --checkpoint-decode drops the decoder's blocks (the
    `levers` decode wrapper checkpoints the decode whole instead, not nested over them)."""
    blocks = getattr(trainer, "_checkpoint_modules", None)
    if blocks is None:  # S&E: no sampler, nothing checkpointed
        return
    if args.no_checkpoint:
        trainer._checkpoint_modules = []
        trainer._checkpoint_calls = False  # nor whole calls (since session 23 the trainer's, not `sample`'s)
    elif args.checkpoint_decode:
        decoder = getattr(getattr(getattr(model, "vae", None), "first_stage_model", None), "decoder", None)
        inside = {id(m) for m in decoder.modules()} if isinstance(decoder, torch.nn.Module) else set()
        trainer._checkpoint_modules = [m for m in blocks if id(m) not in inside]


@torch.no_grad()
def _time(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def breakdown(trainer, core: str, device, autocast, reps: int = 3) -> dict:
    """Where a Focus-N-Fix/DRaFT iteration goes (best of `reps`, the variants interleaved): the N-step
    graph-free sampling with the LoRA hooks on, off, and merged into the weights (MergeWhenNoGrad, merge and
    restore included), and decode + reward forward and backward on a fixed latent."""
    sampler = importlib.import_module(f"{core}.sampler")
    how = dict(K=0, sampler_name=trainer.cfg.sampler_name)  # the trainer's own sampler
    idx = list(range(trainer.cfg.batch_size))
    x, cond = trainer._noise(idx), trainer._cond(idx)
    z = trainer.base(idx)[1].detach()
    denoiser = trainer.denoiser
    merge = MergeWhenNoGrad(denoiser, trainer.lora)

    def merged():
        sampler.sample(merge, x, trainer.sigmas, cond, **how)
        merge.restore()

    def off():
        with trainer.lora.disabled():
            sampler.sample(denoiser, x, trainer.sigmas, cond, **how)

    def tail():
        with torch.enable_grad():
            zg = z.clone().requires_grad_(True)
            torch.autograd.grad(trainer.reward(trainer.model.decode(zg).float()).sum(), zg)  # no weight grads

    runs = {"sample_no_grad_lora_on": lambda: sampler.sample(denoiser, x, trainer.sigmas, cond, **how),
            "sample_no_grad_lora_off": off, "sample_no_grad_lora_merged": merged, "decode_reward_fwd_bwd": tail}
    if trainer.sampling_denoiser is not denoiser:  # --compile: the trainer's compiled graph-free steps
        compiled = MergeWhenNoGrad(trainer.sampling_denoiser, trainer.lora)

        def merged_compiled():
            sampler.sample(compiled, x, trainer.sigmas, cond, **how)
            compiled.restore()

        runs["sample_no_grad_lora_merged_compiled"] = merged_compiled
    if hasattr(trainer.model, "patcher"):  # comfy backend: the same sampling by ComfyUI's own KSampler
        runs["ksampler_comfy_lora_off"] = ksampler_reference(trainer)
    # the graph-free sampling as a training step runs it (`_as_in_a_step`: net frozen, its blocks' checkpoint
    # wrappers in place and idle without grad): a compiled sampler's guards then hold and it reuses the step's
    # graph (outside, they failed and it compiled a second one). The tail and ComfyUI's KSampler stay outside.
    in_a_step = getattr(trainer, "_as_in_a_step", nullcontext)
    sampling = [k for k in runs if k.startswith("sample_")]
    out = {k: math.inf for k in runs}
    with autocast:
        for _ in range(reps):
            with in_a_step():
                for k in sampling:
                    out[k] = min(out[k], _time(runs[k], device))
            for k, fn in runs.items():
                if k not in sampling:
                    out[k] = min(out[k], _time(fn, device))
    return {k: out[k] for k in runs}


def ksampler_reference(trainer):
    """ComfyUI's own KSampler (`comfy.sample.sample`: the sampler KSampler runs, CFG, its model calls) drawing the
    trainer's first batch with its prompt, negative prompt, steps, cfg, sampler and scheduler, the LoRA off: the
    eager sampling an artist's graph already pays for one image, to read `sample_no_grad_lora_off` against."""
    import comfy.sample
    cfg, dm = trainer.cfg, trainer.model
    if cfg.sigmas:
        raise ValueError("the KSampler reference needs steps and a scheduler, not SIGMAS")

    def encode(text):
        out = dm.clip.encode_from_tokens(dm.clip.tokenize(text), return_pooled=True, return_dict=True)
        return [[out.pop("cond"), out]]

    positive, negative = encode(trainer.items[0][0]), encode(cfg.negative_prompt)
    noise = torch.randn(cfg.batch_size, *trainer.latent_shape, generator=torch.Generator().manual_seed(0))
    latent = torch.zeros_like(noise)

    def run():
        with trainer.lora.disabled(), torch.inference_mode():  # KSampler runs in inference mode, as every node
            comfy.sample.sample(dm.patcher, noise, cfg.steps, cfg.cfg_scale, cfg.sampler_name, cfg.scheduler, positive,
                                negative, latent, disable_pbar=True, seed=0)
    return run


# host-side launch calls (the profiler's cuda runtime/driver rows): kernels one by one, and CUDA-graph replays
HOST_KERNEL_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel")
HOST_GRAPH_LAUNCHES = ("cudaGraphLaunch", "cuGraphLaunch")


def profile_iteration(step, device: torch.device, top: int = 12, median: float | None = None) -> dict:
    """One training iteration `step()` under torch.profiler: how busy the device was, how many kernels the host
    launched, and the ops that took the time (device time on cuda, host time on cpu). The profile that says
    whether an iteration waits on the host (launches) or on the device (FLOPs, memory traffic).

    median: the unprofiled s/it; the busy time over it is the fairer fraction, as the profiler's per-op
    recording lengthens the profiled iteration's own wall time most where the host is the bottleneck."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    _sync(device)
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        _sync(device)
    wall = time.perf_counter() - t
    events = prof.key_averages()
    ops = [e for e in events if e.key.startswith("aten::")]
    out = {"wall_seconds": wall, "aten_op_calls": sum(e.count for e in ops),
           "host_seconds_in_ops": sum(e.self_cpu_time_total for e in events) / 1e6}
    if cuda:  # kernel rows carry the device time; the ops that launched them carry it too, so count kernels only
        kernels = [e for e in events if e.device_type == DeviceType.CUDA] or [  # else: rows with time, not ops
            e for e in events if e.self_device_time_total > 0 and not e.key.startswith(("aten::", "cuda"))]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        # kernel_launches: kernels the device ran (a CUDA-graph replay's too); host_*: the launch calls the host
        # made, which CUDA graphs collapse to one cudaGraphLaunch per replay
        out.update(kernel_launches=sum(e.count for e in kernels), device_busy_seconds=busy,
                   device_busy_fraction=busy / wall,
                   host_kernel_launches=sum(e.count for e in events if e.key.startswith(HOST_KERNEL_LAUNCHES)),
                   host_graph_launches=sum(e.count for e in events if e.key.startswith(HOST_GRAPH_LAUNCHES)))
        if median:
            out["device_busy_fraction_of_median"] = busy / median
        ranked, key = kernels, "self_device_time_total"
    else:
        ranked, key = ops, "self_cpu_time_total"
    ranked = sorted(ranked, key=lambda e: getattr(e, key), reverse=True)[:top]
    out["top"] = [{"name": e.key[:120], "calls": e.count, "self_ms": getattr(e, key) / 1e3} for e in ranked]
    return out


def _error(e: BaseException, limit: int = 500) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"


def _print_failure(what: str) -> None:
    """The exception being handled, with its traceback, on stderr (the run's log): the JSON keeps one line."""
    print(f"[train_speed] {what} FAILED:", file=sys.stderr, flush=True)
    traceback.print_exc(file=sys.stderr)
    sys.stderr.flush()


def _diagnostic(fn, what: str = "diagnostic") -> dict:
    """fn() for a diagnostic (profile, breakdown): a failure gives {"error"} and never costs the case its figures;
    its traceback goes to stderr."""
    try:
        return fn()
    except Exception as e:
        _print_failure(what)
        return {"error": _error(e, 300)}


def release_idle(model, device: torch.device) -> int | None:
    """comfy: unload what the run does not use (the text encoders ComfyUI loaded to encode the prompts), as the
    training nodes do once the trainer is built (nodes/runs.py), then count the peak from here. None on core."""
    if not hasattr(model, "patcher"):
        return None
    released = _import_pack().release_idle_models(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return released


def _force_eager():
    """`torch.compiler.set_stance("force_eager")`; before torch 2.6, which lacks it, nothing is compiled to keep
    eager (`--compile` is refused there)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return nullcontext() if set_stance is None else set_stance("force_eager")


def _compiled_counts(trainer) -> tuple[int, int] | None:
    """(compiled, eager) graph-free calls so far of the trainer's CompiledWhenNoGrad; None when not compiling."""
    inner = getattr(trainer.sampling_denoiser, "inner", None) if hasattr(trainer, "sampling_denoiser") else None
    if not hasattr(inner, "compiled_calls"):
        return None
    return inner.compiled_calls, inner.eager_calls


def run_case(name: str, model, reward, core: str, geometry, args, device: torch.device, dtype: torch.dtype) -> dict:
    kind, overrides, batch = CASES[name]
    iterations = args.warmup + args.iters + 1 + int(args.profile)  # + 1 counted for FLOPs (+ 1 profiled)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if args.autocast or (args.backend == "core" and dtype == torch.bfloat16) else nullcontext())
    times, cpu_times, first, profiled, parts, bmem, timed0, timed1 = [], [], None, None, None, {}, None, None
    with ExitStack() as stack:
        stack.enter_context(levers(core, model, args))
        skips = stack.enter_context(_cudagraph_skips(args.compile != "off"))
        with _memory(device) as mem:
            trainer = make_trainer(core, kind, overrides, batch, model, reward, geometry, args, iterations)
            stack.callback(trainer.lora.remove)
            checkpoint_levers(trainer, model, args)
            released = release_idle(model, device)
            if args.fused_adam:
                fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
                trainer.optimizer = torch.optim.AdamW(trainer.params, lr=trainer.cfg.lr, weight_decay=0.0, **fused)
            it = iter(trainer)
            for i in range(args.warmup + args.iters):
                if args.no_cache and kind == "fix":
                    trainer._cache.clear()  # I0 and M rebuilt every iteration, as the reference does
                if i == args.warmup:
                    timed0 = _compiled_counts(trainer)
                _sync(device)
                t, c = time.perf_counter(), time.process_time()
                with autocast:
                    next(it)
                _sync(device)
                dt, dc = time.perf_counter() - t, time.process_time() - c
                print(f"[train_speed] {name} iteration {i}{' (warm-up)' if i < args.warmup else ''}: {dt:.3f} s",
                      file=sys.stderr, flush=True)
                first = dt if first is None else first
                if i >= args.warmup:
                    times.append(dt)
                    cpu_times.append(dc)
            timed1 = _compiled_counts(trainer)
            med = statistics.median(times)
            from torch.utils.flop_counter import FlopCounterMode
            # counted with I0 and M cached, also under --no-cache: FlopCounterMode's module hooks cannot run
            # through the torch.autograd.grad of the saliency mask. Eagerly: dynamo never compiles under a
            # dispatch mode and would mark the compiled sampler's code as skipped for the rest of the process
            with _force_eager(), FlopCounterMode(display=False) as counter, autocast:
                next(it)
            flops = counter.get_total_flops()
            if args.profile:
                with autocast:
                    profiled = _diagnostic(lambda: profile_iteration(lambda: next(it), device, median=med),
                                           f"{name} profile")
            last = trainer.history[-1]
            history = [{k: v for k, v in r.as_dict().items() if v is not None and k not in ("total", "seconds")}
                       for r in trainer.history]
        if args.breakdown and kind == "fix":  # after the training peak is read: its own peak (no block checkpoints)
            with _memory(device) as bmem:
                parts = _diagnostic(lambda: breakdown(trainer, core, device, autocast, reps=args.breakdown_reps),
                                    f"{name} breakdown")
        compiled = _compiled_counts(trainer)
    out = {"case": name, "method": trainer.method, "batch": batch, "iterations_timed": len(times),
           "seconds_per_iteration": {"median": med, "min": min(times), "all": times},
           "iterations_per_second": 1.0 / med, "first_iteration_seconds": first,
           # process CPU seconds: on a shared CPU machine, steadier than wall time for before/after comparisons
           "cpu_seconds_per_iteration": {"median": statistics.median(cpu_times), "min": min(cpu_times)},
           "tflop_per_iteration": flops / 1e12, "achieved_tflops": flops / med / 1e12,
           "last_loss": last.loss, "history": history, **mem}
    if released is not None:
        out["idle_models_released"] = released
    if compiled is not None:  # graph-free sampler calls that ran the compiled graph: a silent eager fallback shows
        (c0, e0), (c1, e1) = timed0, timed1
        out["compiled_sampler_calls"] = {"timed": {"compiled": c1 - c0, "eager": e1 - e0},
                                         "whole_case": {"compiled": compiled[0], "eager": compiled[1]},
                                         "failure": trainer.sampling_denoiser.inner.failure,
                                         # compiled in this case without CUDA graphs (a graph an earlier case
                                         # compiled, reused here, is counted there)
                                         **skips}
    if kind == "se":
        out["preservation"] = trainer.preservation  # what auto resolved to (none without the term)
    if parts is not None:
        out["breakdown_seconds"] = parts
        out["breakdown_peak_memory_bytes"] = bmem["peak_memory_bytes"]
        if "peak_memory_reserved_bytes" in bmem:
            out["breakdown_peak_memory_reserved_bytes"] = bmem["peak_memory_reserved_bytes"]
    if profiled is not None:
        out["profile"] = profiled
    out["peak_memory_gib"] = out["peak_memory_bytes"] / 2**30
    if "peak_memory_reserved_bytes" in out:
        out["peak_memory_reserved_gib"] = out["peak_memory_reserved_bytes"] / 2**30
    return out


def run_case_kept(name: str, *args) -> dict:
    """`run_case`, but a case that fails (CUDA out of memory, a kernel or compile error) gives {"case", "error"}
    and the run goes on with the next case, so one failure costs no other case's figures (device time is
    scarce). Ctrl-C still stops the run."""
    try:
        return run_case(name, *args)
    except Exception as e:
        _print_failure(name)  # the whole traceback in the log; the JSON keeps "Type: message"
        out = {"case": name, "error": _error(e)}
    # out of the except block: its traceback no longer holds the failed case's frames and tensors
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what the failed case held, before the next one's peak
    return out


# -- main -------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("comfy", "core"), default="comfy")
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--models", default=None, help="comma list of sd15, sdxl (comfy backend); default both")
    p.add_argument("--cases", default=None, help=f"comma list of {', '.join(CASES)}; default per model")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="default bf16 on cuda (the issue's setting), fp32 on cpu; fp16 is ComfyUI's own pick for SD1.5 "
                        "and SDXL UNets on most GPUs (the trainer then scales the loss)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None,
                   help="write the JSON here (atomically) after every case instead of stdout at the end, so a run "
                        "stopped at a time limit keeps the cases it finished")
    p.add_argument("--steps", type=int, default=None, help="override sampler steps (default 50; tiny 4)")
    p.add_argument("--sampler-name", "--sampler", choices=("ddim", "euler", "dpmpp_2m"), default="ddim",
                   help="Focus-N-Fix/DRaFT cases' sampler (FixConfig.sampler_name)")
    p.add_argument("--scheduler", default="normal", help="their scheduler (ComfyUI's names; the core's for --backend core)")
    p.add_argument("--size-px", type=int, default=None, help="override the image side (default 512/1024; tiny 32/64)")
    p.add_argument("--resolution", type=int, default=None, help="override the S&E attention-map side")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for the fraction (default: table/measured)")
    p.add_argument("--inference-weights", choices=("on", "off"), default="on",
                   help="comfy: build weights under inference_mode like ComfyUI's loaders (default on)")
    p.add_argument("--weight-dtype", choices=("default", "fp8_e4m3fn", "fp8_e5m2"), default="default",
                   help="comfy: UNet weight storage (fp8: computed in --dtype, cast per layer, as ComfyUI's "
                        "Load Diffusion Model weight_dtype); default: --dtype")
    p.add_argument("--reward-dtype", choices=tuple(REWARD_DTYPES), default="fp32",
                   help="the reward's CLIP tower weights, as FocusFix Load Reward's precision (default fp32); the "
                        "head stays fp32")
    p.add_argument("--comfy-attention", choices=("default", "pytorch"), default="default",
                   help="comfy: ComfyUI's attention choice (default: its own pick, SDPA on NVIDIA, sub-quadratic on "
                        "CPU)"
                        " or pytorch (--use-pytorch-cross-attention: SDPA everywhere)")
    p.add_argument("--comfy-args", default="",
                   help="comfy: ComfyUI launch flags the run inherits, written with '=' as they start with dashes: "
                        "--comfy-args='--fast autotune' (cuDNN autotuning) or --comfy-args=--force-channels-last")
    g = p.add_argument_group("levers (before/after switches)")
    g.add_argument("--no-checkpoint", action="store_true",
                   help="no gradient checkpointing at all (neither the UNet's and VAE decoder's blocks nor whole "
                        "calls): no recompute, every activation kept")
    g.add_argument("--fused-adam", action="store_true", help="AdamW(fused=True)")
    g.add_argument("--autocast", action="store_true", help="bf16 autocast around each iteration (adapters stay fp32)")
    g.add_argument("--compile", choices=("off", "default", "reduce-overhead", "max-autotune"), default="off",
                   help="FixConfig.compile: torch.compile the graph-free sampler steps (LoRA merged, no hooks; "
                        "reduce-overhead = CUDA graphs); the first iteration compiles. S&E steps all carry gradients: "
                        "unaffected")
    g.add_argument("--allocator-check", choices=("on", "off"), default="on",
                   help="off: the core tries CUDA graphs (--compile reduce-overhead / max-autotune) under the "
                        "cudaMallocAsync allocator too, instead of sampling eagerly at once "
                        "(sampler.cuda_graphs_blocked), so a run shows whether they fail there and whether the "
                        "fallback at their first run holds")
    g.add_argument("--no-cache", action="store_true", help="rebuild I0 and M every iteration (the 'before' of caching)")
    g.add_argument("--preservation", choices=("auto", "keys", "outputs"), default="auto",
                   help="S&E preservation term: keys (the core's auto for a to_k LoRA; no UNet pass) or outputs "
                        "(x0 MSE against the adapters-off model: two more UNet passes per step, the 'before')")
    g.add_argument("--checkpoint-decode", action="store_true",
                   help="checkpoint the VAE decode as one call instead of the decoder's blocks one by one (the "
                        "'before' of block-wise decoder checkpointing)")
    g.add_argument("--se-early-exit", action="store_true", help="accepted for older commands: the core's "
                   "S&E maps pass always stops after the last attention layer the maps need (since 0eafaf0)")
    g.add_argument("--merge-nograd", action="store_true", help="accepted for older commands: FixTrainer always "
                   "merges the LoRA for the graph-free sampler steps (core MergedWhenNoGrad, since 0eafaf0)")
    p.add_argument("--breakdown", action="store_true",
                   help="Focus-N-Fix/DRaFT cases: time sampling (LoRA hooks on/off/merged) and decode+reward, after "
                        "the case's figures (its peak memory apart: breakdown_peak_memory_bytes)")
    p.add_argument("--breakdown-reps", type=int, default=3, help="the breakdown's best of N (default 3)")
    p.add_argument("--profile", action="store_true",
                   help="profile one more iteration per case (torch.profiler): kernel launches, device-busy fraction "
                        "(cuda) and the top ops; says whether an iteration waits on the host or on the device")
    args = p.parse_args(argv)
    unknown = [n for n in (args.cases or "").split(",") if n and n not in CASES]
    if unknown:
        p.error(f"unknown --cases {unknown}; known: {list(CASES)}")
    if args.iters < 1 or args.warmup < 0 or args.breakdown_reps < 1:
        p.error(f"--iters and --breakdown-reps must be >= 1 and --warmup >= 0, got {args.iters}, "
                f"{args.breakdown_reps} and {args.warmup}")
    if args.models is not None:
        if args.backend == "core":  # silently ignored before: a run timed the tiny model under another name
            p.error("--models picks the comfy backend's models; --backend core runs its tiny model only")
        args.models = parse_models(p, args.models)  # a typo fails here, not after the first family's build
    return args


def run_family(family: str, args, device: torch.device, dtype: torch.dtype, doc: dict, save) -> None:
    """Build one family's models, run its cases into doc["cases"] (with `save()` after each)."""
    if args.backend == "core":
        model, core = build_core(args.size, device, dtype)
        adapters, session = None, nullcontext()
    else:
        weight_dtype = None if args.weight_dtype == "default" else getattr(torch, args.weight_dtype.replace("fp8", "float8"))
        model, adapters, core = build_comfy(family, args.size, device, dtype, args.inference_weights == "on",
                                            attention=args.comfy_attention, weight_dtype=weight_dtype,
                                            comfy_args=args.comfy_args)
    geometry = GEOMETRY[(family, args.size)]
    # the tower in fp32 by default, as Load Reward loads it; --reward-dtype bf16 = its precision input
    reward = build_reward(core, args.size, device, REWARD_DTYPES[args.reward_dtype])
    if adapters is not None:
        session = adapters.training_session(model, [reward])
    side, steps, res = geometry
    settings = doc["settings"][family] = {
        "image": args.size_px or side, "steps": args.steps or steps, "sampler_name": args.sampler_name,
        "scheduler": args.scheduler, "cfg_scale": 7.5, "K": 1, "lora": "rank 4 on attn q/k/v/out (S&E: attn2 to_k)",
        "se_resolution": args.resolution or res, "unet_parameters": sum(p.numel() for p in model.net.parameters()),
        "reward": reward.describe()}
    if adapters is not None:
        settings["vae_dtype"] = str(model.vae.vae_dtype).removeprefix("torch.")
    print(f"[train_speed] {family}: built ({settings['unet_parameters'] / 1e6:.1f} M UNet parameters)",
          file=sys.stderr, flush=True)
    names = args.cases.split(",") if args.cases else DEFAULT_CASES[family]
    mem0 = torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss()
    with session:
        # entering the session may copy weights (inference tensors -> plain clones): what that costs
        mem1 = torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss()
        settings["session_enter_bytes"] = int(mem1 - mem0)
        for name in names:
            r = {"model": family, **run_case_kept(name, model, reward, core, geometry, args, device, dtype)}
            if "error" not in r:
                r["fraction_of_peak"] = r["achieved_tflops"] / doc["peak_tflops"]
            doc["cases"].append(r)
            save()


def _unload_comfy() -> None:
    """ComfyUI keeps loaded models: free them before the next family's peaks."""
    mm = sys.modules.get("comfy.model_management")
    if mm is not None:
        mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache()


def strict_json(x):
    """x with every non-finite float as None: strict JSON (jq and other readers refuse Infinity and NaN; an
    fp16 step skipped on an overflow records grad_norm inf)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return x


def dumps(doc: dict) -> str:
    return json.dumps(strict_json(doc), indent=1, allow_nan=False)


def save(doc: dict, path: str | None) -> None:
    """Bring doc's summary up to date and, with --out, rewrite the file (a whole document at every moment)."""
    doc["failed_cases"] = [f"{r['model']}/{r['case']}" for r in doc["cases"] if "error" in r]
    attention = sys.modules.get("comfy.ldm.modules.attention")
    doc["comfy_attention"] = attention.optimized_attention.__name__ if attention is not None else None
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(dumps(doc) + "\n")
        os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compile != "off" and not hasattr(torch.compiler, "set_stance"):  # this machine's torch, not the plan's
        sys.exit(f"train_speed: --compile needs torch 2.6 or newer (the FLOP count keeps compiled code eager with "
                 f"torch.compiler.set_stance), this is {torch.__version__}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    families = ["tiny"] if args.backend == "core" else (args.models or ["sd15", "sdxl"])
    peak, source = device_peak_tflops(device, dtype, args.peak_tflops)  # first: later, a CUDA error would cost it
    doc = {
        "benchmark": "train_speed (issue 6)", "backend": args.backend, "size": args.size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "python": platform.python_version(), "dtype": str(dtype).removeprefix("torch."),
        "peak_tflops": peak, "peak_source": source, "comfy_attention": None,
        # ComfyUI's main.py sets backend:cudaMallocAsync on most GPUs; this harness runs what the variable says
        "cuda_allocator_backend": cuda_allocator_backend(),
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "reward_dtype": args.reward_dtype, "weight_dtype": args.weight_dtype, "comfy_args": args.comfy_args,
        "levers": {"no_checkpoint": args.no_checkpoint, "fused_adam": args.fused_adam, "autocast": args.autocast,
                   "no_cache": args.no_cache, "checkpoint_decode": args.checkpoint_decode,
                   "merge_nograd": args.merge_nograd, "se_early_exit": args.se_early_exit, "compile": args.compile,
                   "allocator_check": args.allocator_check,
                   "preservation": args.preservation,
                   "inference_weights": args.inference_weights == "on" if args.backend == "comfy" else None},
        "iters": args.iters, "warmup": args.warmup, "out": args.out, "settings": {}, "cases": [],
        "failed_cases": [], "failed_models": {},  # a family whose build or session failed: its error
        "finished": False,  # True once every family ran: a file cut off at a time limit says False
    }
    for family in families:
        try:
            run_family(family, args, device, dtype, doc, lambda: save(doc, args.out))
        except Exception as e:  # the other family's figures are kept
            _print_failure(family)
            doc["failed_models"][family] = _error(e)
        try:  # out of the except block: its traceback no longer holds the family's models
            _unload_comfy()
        except Exception as e:
            _print_failure(f"{family} unloading")
            doc["failed_models"].setdefault(family, f"unloading: {_error(e)}")
        save(doc, args.out)
    doc["finished"] = True
    save(doc, args.out)
    return doc


if __name__ == "__main__":
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    doc = main()
    if doc["out"]:
        print(f"[train_speed] wrote {doc['out']} ({len(doc['cases'])} cases, failed: {doc['failed_cases']}, "
              f"{sorted(doc['failed_models'])})", file=sys.stderr, flush=True)
    else:
        print(dumps(doc))
    # the JSON still holds every other case's figures
    sys.exit(1 if doc["failed_cases"] or doc["failed_models"] else 0)
