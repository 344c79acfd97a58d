"""Differentiable deterministic samplers (DDIM eta = 0, i.e. Euler in sigma space; DPM-Solver++(2M)) with
DRaFT-K truncation.

References: Song et al. 2021 (DDIM); Karras et al. 2022 (the sigma view: DDIM eta=0 == Euler);
Lu et al. 2022, "DPM-Solver++" (2M: second order from the previous step's x0);
Clark et al. 2024, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards" (DRaFT-K, DRaFT-LV).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from .denoisers import Cond, Denoiser, repeat_cond
from .schedules import scheduler_sigmas

__all__ = ["sample", "seed_noise", "sampling_sigmas", "check_sigmas", "check_steps", "checkpointed_modules",
           "CompiledWhenNoGrad", "compile_denoiser", "cuda_allocator_backend", "cuda_graphs_blocked", "COMPILE_MODES",
           "CUDA_GRAPH_MODES", "SAMPLERS"]

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the compile modes that run CUDA graphs (torch.compile's own)
# deterministic samplers, by KSampler's names: "ddim" and "euler" take the same step (as in ComfyUI)
SAMPLERS = ("ddim", "euler", "dpmpp_2m")


def check_steps(steps: int, K: int, least_K: int = 0) -> None:
    """Raise ValueError unless least_K <= K <= steps (K = number of differentiated denoiser calls; training
    needs least_K=1, as K=0 builds no graph)."""
    if steps < 1:
        raise ValueError(f"steps ({steps}) must be at least 1")
    if not least_K <= K <= steps:
        # "(now N)": the command line names a setting before it as its flag (--K, --steps)
        raise ValueError(f"K (now {K}) must be between {least_K} and steps (now {steps}): K counts the last sampler "
                         f"steps differentiated")


def sampling_sigmas(model, steps: int, scheduler: str = "normal") -> torch.Tensor:
    """`steps` sampling sigmas for a model -> [steps + 1], descending, last 0.

    A model with its own `sampling_sigmas(steps, scheduler)` (the ComfyUI adapter: ComfyUI's scheduler list,
    computed as KSampler computes it) gives them; otherwise `schedules.scheduler_sigmas` on `model.sigmas`."""
    own = getattr(model, "sampling_sigmas", None)
    sigmas = own(steps, scheduler) if own is not None else scheduler_sigmas(scheduler, model.sigmas, steps)
    try:
        check_sigmas(sigmas, f"the {scheduler!r} scheduler's sigmas")
    except ValueError as e:  # e.g. kl_optimal divides by steps - 1: its 1-step schedule is NaN
        raise ValueError(f"{e}{' (with steps 1: give steps 2 or more, or another scheduler)' if steps == 1 else ''}") \
            from None
    return sigmas


def check_sigmas(sigmas, name: str = "sigmas") -> None:
    """Raise ValueError unless `sigmas` is a full denoise: 1-D, >= 2 finite values, positive and non-increasing,
    ending at 0."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if s.ndim != 1 or len(s) < 2:
        raise ValueError(f"{name} must be a 1-D list of at least 2 values (steps + 1), got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name} must be finite, got {s.tolist()}")
    if float(s[-1]) != 0.0 or not bool((s[:-1] > 0).all()):
        raise ValueError(f"{name} must be positive and end at 0 (a full denoise), got first {float(s[0]):.4g}, "
                         f"last {float(s[-1]):.4g}: a partial schedule (e.g. from SplitSigmas) cannot be trained on")
    if not bool((s[1:] <= s[:-1]).all()):
        raise ValueError(f"{name} must not increase, got {[round(v, 4) for v in s.tolist()]}")


def seed_noise(seeds: Sequence[int], shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """One standard-normal sample per seed, each from its own CPU generator, so an image depends on its
    seed only (not on batch size or device). shape = (C, h, w) -> [len(seeds), C, h, w]."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        out.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(out).to(device=device, dtype=dtype)


@contextmanager
def checkpointed_modules(modules: Sequence[nn.Module]) -> Iterator[None]:
    """While active, each module's forward runs under (non-reentrant) gradient checkpointing when grad is
    on: backward keeps only each module's inputs and recomputes its activations one module at a time.

    Used on a UNet's residual/attention blocks (with `sample(checkpoint=False)`), this costs the same FLOPs
    as checkpointing the whole denoiser call (one recompute of the forward), and the backward peak holds
    one block's activations instead of the whole network's; on a VAE decoder's blocks it costs one more
    decode forward. Graph-free calls run the plain forward. The recompute calls the forward captured
    here, so leaving the context before backward is fine.
    """
    patched = []
    try:
        for m in modules:
            own = m.__dict__.get("forward")  # an instance-level forward someone else set, kept as is
            orig = m.forward

            def forward(*args, _orig=orig, **kwargs):
                if torch.is_grad_enabled():
                    return _checkpoint(_orig, *args, use_reentrant=False, **kwargs)
                return _orig(*args, **kwargs)

            m.forward = forward
            patched.append((m, own))
        yield
    finally:
        for m, own in reversed(patched):
            if own is None:
                del m.forward
            else:
                m.forward = own


def compile_denoiser(denoiser: Denoiser, mode: str) -> Denoiser:
    """`torch.compile` a denoiser for graph-free calls: static shapes (one graph per batch size; sigma is a
    tensor, so the steps of a trajectory share it). mode: one of COMPILE_MODES other than "off"."""
    def graph_free_call(x, sigma, cond):  # a function, not the module: module-level hooks then fire once
        return denoiser(x, sigma, cond)

    return torch.compile(graph_free_call, mode=None if mode == "default" else mode, dynamic=False)


def cuda_allocator_backend() -> str | None:
    """torch's CUDA allocator backend, "native" or "cudaMallocAsync" (`PYTORCH_CUDA_ALLOC_CONF=backend:...`, read
    without initializing CUDA); None on a torch built without CUDA."""
    get = getattr(getattr(torch.cuda, "memory", None), "get_allocator_backend", None)
    try:
        return None if get is None else get()
    except (AttributeError, RuntimeError):  # a CPU-only build lacks torch._C._cuda_getAllocatorBackend
        return None


def cuda_graphs_blocked(mode: str, device) -> str | None:
    """Why a compile `mode` cannot run its CUDA graphs on `device`, or None where it can (or runs none).

    ComfyUI's main.py (`cuda_malloc.py`) sets `PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync` for CUDA builds of
    torch on most NVIDIA GPUs, and torch's cudaMallocAsync allocator lacks what CUDA-graph trees call on their
    first run (`checkPoolLiveAllocations`, graph memory pools): "reduce-overhead" and "max-autotune" raise a
    RuntimeError there (Comfy-Org/ComfyUI#6831)."""
    if mode not in CUDA_GRAPH_MODES or torch.device(device).type != "cuda":
        return None
    if cuda_allocator_backend() != "cudaMallocAsync":
        return None
    return (f"cudaMallocAsync allocator: compile mode {mode!r} runs CUDA graphs, which torch's cudaMallocAsync "
            f"allocator (PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync, ComfyUI's default on most NVIDIA GPUs) "
            f"does not support; start ComfyUI with --disable-cuda-malloc for them, or use compile mode 'default'")


def _reason(e: BaseException) -> str:
    """A failure as `CompiledWhenNoGrad.failure` gives it: "Type: message", on one line, cut to 300 characters."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


class CompiledWhenNoGrad:
    """A denoiser whose graph-free calls run compiled and whose differentiated calls run eagerly.

    The graph-free calls are the N - K steps of every trajectory (>= 90 % of a Focus-N-Fix iteration's
    FLOPs at 50 steps); with the LoRA merged (`MergedWhenNoGrad`) they carry no hooks, and the merge writes
    the weights in place, so a compiled graph (and a CUDA graph under "reduce-overhead", which reads the
    weights by address) sees each iteration's LoRA without recompiling. The differentiated calls stay eager:
    they run under block-wise checkpointing and build the graph backward needs.

    `FixTrainer` wraps the model's own call, inside its `CFGDenoiser`: the guidance scale stays outside the
    graph and prompts, sigmas and weights are its inputs, so a later run with other settings (same model,
    size and batch) reuses the compiled graph.

    If compiling fails (no working Triton or C++ compiler on this machine), it logs a warning once and runs
    eagerly from then on: the results are the same, only slower. So does a compiled call that raises a
    RuntimeError (CUDA graphs under an allocator that cannot hold them, at their first run): the same call then
    runs eagerly, and an error of the model itself comes back from that eager call. A CUDA-graph mode on a CUDA
    input under the cudaMallocAsync allocator (ComfyUI's default, `cuda_graphs_blocked`) is not tried at all.
    `failure` then says why ("Type: message").

    `compiled_calls` / `eager_calls` count the graph-free calls that ran the traced graph and those that ran
    eagerly. Dynamo may run a compiled function's plain code with no error (a frame it skips for good, e.g.
    after a call under a TorchDispatchMode, or `set_stance("force_eager")`): the counts show it. The call the
    compiler gets returns `(x0, torch.compiler.is_compiling())`, True only as traced (no graph input or output).

    Args:
        denoiser: `denoiser(x, sigma, cond) -> x0`.
        mode: "default" | "reduce-overhead" (CUDA graphs) | "max-autotune" (see `torch.compile`).
        compiler: `compiler(denoiser, mode) -> callable`, `compile_denoiser` by default.
    """

    def __init__(self, denoiser: Denoiser, mode: str, compiler: Callable = compile_denoiser):
        if mode not in COMPILE_MODES[1:]:
            raise ValueError(f"compile mode must be one of {list(COMPILE_MODES[1:])}, got {mode!r}")
        from torch._dynamo.exc import TorchDynamoException  # also Inductor's and Triton's failures

        self.denoiser, self.mode, self._compile_error = denoiser, mode, TorchDynamoException

        def probed(x, sigma, cond):  # the flag is a constant of the traced code: True only when it ran
            return denoiser(x, sigma, cond), torch.compiler.is_compiling()

        self.failure: str | None = None  # why compiling failed, when it did
        self._allocator_checked = False  # cuda_graphs_blocked, asked at the first graph-free call (its device)
        try:  # refused up front where torch.compile has no support (older torch on Windows, Python 3.15+)
            self.compiled: Callable | None = compiler(probed, mode)
        except RuntimeError as e:
            self._give_up(_reason(e), "torch.compile is not available here")
        self.compiled_calls = self.eager_calls = 0  # graph-free calls that ran the traced graph / eagerly

    def _give_up(self, failure: str, what: str) -> None:
        """Sample eagerly from now on, saying why once."""
        self.compiled, self.failure = None, failure
        log.warning("%s (%s); sampling without it", what, failure)

    def __call__(self, x, sigma, cond):
        if torch.is_grad_enabled():
            return self.denoiser(x, sigma, cond)
        if self.compiled is not None and not self._allocator_checked:
            self._allocator_checked = True
            blocked = cuda_graphs_blocked(self.mode, x.device)
            if blocked is not None:
                self._give_up(blocked, "torch.compile skipped")
        if self.compiled is None:
            self.eager_calls += 1
            return self.denoiser(x, sigma, cond)
        try:
            out, traced = self.compiled(x, sigma, cond)
        except self._compile_error as e:  # the compiler or tracer failed; a model error recurs eagerly below
            cause = getattr(e, "inner_exception", None) or e  # the backend's own error, not dynamo's wrapper
            self._give_up(_reason(cause), "torch.compile failed")
            self.eager_calls += 1
            return self.denoiser(x, sigma, cond)
        except RuntimeError as e:  # the compiled code's run failed (CUDA graphs' first run under cudaMallocAsync)
            self._give_up(_reason(e), f"torch.compile's {self.mode!r} code failed at its run")
            self.eager_calls += 1
            return self.denoiser(x, sigma, cond)  # a model error (out of memory, a shape) is raised again here
        if traced:
            self.compiled_calls += 1
        else:
            self.eager_calls += 1
        # under CUDA graphs the output lives in the graph's memory, overwritten by the next replay
        return out.clone() if self.mode == "reduce-overhead" else out


def _multistep_weights(sigmas: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M)'s weight w_i of the previous x0 at each step: x0_i' = (1 + w_i) x0_i - w_i x0_{i-1}, with
    w_i = 1 / (2 r_i), r_i = h_{i-1} / h_i, h_i = log(sigma_i / sigma_{i+1}). 0 at the first step and the
    last (to sigma 0), as in k-diffusion. sigmas: [N+1] -> [N], on the sigmas' device (no host sync)."""
    h = (sigmas[:-1] / sigmas[1:]).log()                     # [N]; inf at the last step
    w = torch.zeros_like(h)
    if len(h) > 1:
        r = h[:-1] / h[1:]
        ok = (sigmas[2:] > 0) & (r > 0) & torch.isfinite(r)  # a repeated sigma would divide by 0: first order
        w[1:] = torch.where(ok, 0.5 / torch.where(ok, r, torch.ones_like(r)), torch.zeros_like(r))
    return w


def _call(denoiser: Denoiser, x, sigma, cond, use_checkpoint: bool):
    if use_checkpoint and torch.is_grad_enabled():
        # Recompute activations in backward: memory stays flat in K (one call's activations at a time).
        return _checkpoint(denoiser, x, sigma, cond, use_reentrant=False)
    return denoiser(x, sigma, cond)


def sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Cond,
    *,
    K: int = 0,
    lv_copies: int = 0,
    generator: torch.Generator | None = None,
    checkpoint: bool = True,
    callback: Callable[[dict], None] | None = None,
    sampler_name: str = "ddim",
) -> torch.Tensor:
    """A deterministic sampler (DDIM = Euler in sigma space, or DPM-Solver++(2M)); gradients flow through the
    last K denoiser calls only.

    Args:
        denoiser: `denoiser(x, sigma, cond) -> x0` (CFG already folded in, e.g. `CFGDenoiser`).
        x: [B,C,h,w] initial state, already scaled by sigmas[0] (x = sigma_max * noise).
        sigmas: [N+1] descending, sigmas[-1] == 0.
        K: differentiated calls (DRaFT-K). K=0 builds no graph at all.
        lv_copies: DRaFT-LV: if n > 0 (K must be 1), the whole loop runs graph-free, then n re-noised copies of
            the final sample are denoised at the last nonzero sigma with gradients; returns [B*n] (copies of an
            image adjacent).
        generator: noise for DRaFT-LV re-noising.
        checkpoint: gradient-checkpoint each differentiated call (off when the caller checkpoints the
            network's blocks instead, see `checkpointed_modules`).
        callback: called after each step with {"i", "x", "sigma", "sigma_next", "denoised"}.
        sampler_name: one of SAMPLERS (KSampler's names). "ddim" / "euler": x' = x0 + (x - x0) sigma'/sigma.
            "dpmpp_2m": the same step with x0 extrapolated from the previous call's (second order in log
            sigma), as KSampler's dpmpp_2m.

    Returns:
        x0: [B,C,h,w] ([B*n,...] with lv_copies=n) — the final sample.
    """
    n = len(sigmas) - 1
    check_steps(n, K)
    if float(sigmas[-1]) != 0.0:
        raise ValueError(f"sigmas must end with 0, got {float(sigmas[-1])}")
    if lv_copies < 0:
        raise ValueError(f"lv_copies must be >= 0, got {lv_copies}")
    if lv_copies and K != 1:
        raise ValueError(f"DRaFT-LV (lv_copies > 0) differentiates only its re-noised copies of the last step: set K "
                         f"to 1 (now {K})")
    if sampler_name not in SAMPLERS:
        raise ValueError(f"unknown sampler_name {sampler_name!r}: expected one of {list(SAMPLERS)}")
    grad = torch.is_grad_enabled() and K > 0
    loop_K = 0 if lv_copies else K  # DRaFT-LV: the loop's graph would be thrown away by the re-noising
    s_in = x.new_ones(x.shape[0])
    w = _multistep_weights(sigmas) if sampler_name == "dpmpp_2m" else None
    old = None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        with torch.set_grad_enabled(grad and i >= n - loop_K):  # DRaFT-K: only the last K calls are differentiated
            denoised = _call(denoiser, x, sigma * s_in, cond, checkpoint)
            d = denoised if old is None else (1 + w[i]) * denoised - w[i] * old
            x = d + (x - d) * (sigma_next / sigma)  # DDIM eta=0 == Euler step in sigma
        old = denoised if w is not None else None
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    if not lv_copies:
        return x
    # DRaFT-LV: re-noise the final sample to the last nonzero sigma n times, denoise each with gradients.
    sigma_last = sigmas[n - 1]
    x0 = x.detach().repeat_interleave(lv_copies, dim=0)
    noise = torch.randn(x0.shape, generator=generator, device="cpu", dtype=torch.float32).to(x0)
    with torch.set_grad_enabled(grad):
        return _call(denoiser, x0 + sigma_last * noise, sigma_last * x0.new_ones(len(x0)),
                     repeat_cond(cond, lv_copies), checkpoint)
