"""Train the tiny text-to-image model on the shapes world (DDPM eps loss, min-SNR weighting, EMA).

    python -m focusfix_core.tiny.train --out runs/tiny --steps 3000 [--resume] [--max-minutes 45]

Resumable: every `--ckpt-minutes` the model, its EMA, the optimizer, the step and the noise RNG go
atomically to OUT/checkpoint.pt (read back weights_only). Each step's batch is
drawn from the world with seed (seed, step), so a resumed run sees the same data as an unbroken one.
At the end (or when --max-minutes runs out) the EMA weights go to OUT/tiny_t2i.safetensors (fp16)
with a sample grid OUT/samples.png.
"""
from __future__ import annotations

import argparse
import copy
import io
import sys
import time
from pathlib import Path

import torch

from ..io import atomic_torch_save, atomic_write_bytes, load_training_state
from ..schedules import scaled_linear_alphas_cumprod
from .model import TinyConfig, TinyModel
from .world import TRAIN_WORLD, make_batch

__all__ = ["train", "save_grid", "main"]

GRID_PROMPTS = [
    "a red circle", "a green square", "a blue triangle", "a yellow circle",
    "a red square and a blue circle", "a green triangle and a yellow square",
    "a blue circle and a yellow triangle", "a yellow square and a red triangle",
]


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def save_grid(I: torch.Tensor, path, nrow: int = 8, scale: int = 4) -> None:
    """Save images I: [B,3,H,W] in [0,1] as one PNG grid (nearest-neighbour upscaled)."""
    import numpy as np
    from PIL import Image

    B, C, H, W = I.shape
    rows = -(-B // nrow)
    grid = torch.ones(3, rows * (H + 2), nrow * (W + 2))
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, r * (H + 2) + 1: r * (H + 2) + 1 + H, c * (W + 2) + 1: c * (W + 2) + 1 + W] = I[i].clamp(0, 1)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(buf, format="PNG")
    atomic_write_bytes(buf.getvalue(), path)


def train(out: Path, steps: int, batch: int = 64, lr: float = 1e-3, seed: int = 0, resume: bool = False,
          max_minutes: float = 45.0, ckpt_minutes: float = 3.0, ema_decay: float = 0.999,
          p_uncond: float = 0.1, snr_gamma: float = 5.0, log_every: int = 25, cfg: TinyConfig = TinyConfig()):
    """Train and export; returns the EMA model. See the module docstring."""
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got steps={steps}, batch={batch}")
    if cfg.image_size != TRAIN_WORLD.size:  # the model would learn 32 px scenes, then sample at its own size
        raise ValueError(f"cfg.image_size must be the training world's {TRAIN_WORLD.size} px, got {cfg.image_size}")
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    model = TinyModel.random(seed, cfg).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed + 1)  # noise and timesteps
    step, loss_avg = 0, None
    if resume and ckpt_path.is_file():
        ck = load_training_state(ckpt_path)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        g.set_state(ck["rng"])
        step, loss_avg = int(ck["step"]), float(ck["loss_avg"])
        _log(f"resumed from {ckpt_path} at step {step}")
    ac = scaled_linear_alphas_cumprod(cfg.timesteps).float()           # [T]
    snr = ac / (1 - ac)
    w_t = snr.clamp(max=snr_gamma) / snr                               # min-SNR-gamma weight for eps loss
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"training {n_params / 1e6:.2f}M params, batch {batch}, steps {step}->{steps}, threads {torch.get_num_threads()}")
    t_start = t_ckpt = t_log = time.time()
    s_log = step

    def checkpoint():
        atomic_torch_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                      "rng": g.get_state(), "step": step, "loss_avg": loss_avg}, ckpt_path)

    while step < steps:
        I, captions, _ = make_batch(batch, seed=seed * 1_000_003 + step)
        drop = torch.rand(batch, generator=g) < p_uncond              # CFG: learn the unconditional model
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        x0 = I * 2 - 1                                                 # (B, 3, H, W) in [-1, 1]
        t = torch.randint(0, cfg.timesteps, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps                     # the VP input c_in * (x0 + sigma eps)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 200)             # warm-up, then constant
        pred = model.net(x_t, t.float(), model.encode_prompts(captions))
        loss = (w_t[t] * ((pred - eps) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        now = time.time()
        if step % log_every == 0 or step == steps:
            rate = (step - s_log) / max(now - t_log, 1e-9)
            _log(f"step {step}/{steps} loss {loss_avg:.4f} {rate:.2f} it/s ETA {(steps - step) / max(rate, 1e-9) / 60:.1f} min")
            t_log, s_log = now, step
        if now - t_ckpt > ckpt_minutes * 60:
            checkpoint()
            t_ckpt = now
        if now - t_start > max_minutes * 60:
            _log(f"time budget of {max_minutes} min reached at step {step}")
            break
    checkpoint()
    ema.save(out / "tiny_t2i.safetensors")
    save_grid(ema.sample(GRID_PROMPTS * 2, seeds=range(1000, 1016)), out / "samples.png")
    _log(f"done: step {step}, loss {loss_avg:.4f}; wrote {out / 'tiny_t2i.safetensors'} and samples.png")
    return ema


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (checkpoint, weights, samples)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if present")
    p.add_argument("--max-minutes", type=float, default=45.0, help="stop (and export) after this wall time")
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train(a.out, a.steps, a.batch, a.lr, a.seed, a.resume, a.max_minutes, a.ckpt_minutes)


if __name__ == "__main__":
    sys.exit(main())
