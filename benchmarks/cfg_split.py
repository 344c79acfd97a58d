"""What a prompt whose token length does not batch with the negative prompt's costs a CFG call's cross-attention.

A style model (StyleModelApply) appends 8 tokens: 85 beside the negative prompt's 77. Joined into one CFG batch,
`cat_cond` repeats both contexts to their least common multiple, 6545 tokens; `CFGDenoiser` now runs the two
halves apart there (`batchable`, ComfyUI's rule). This times one SD1.5-sized cross-attention layer (latents
64x64 = 4096 queries at 512 px, 8 heads of 40, context width 768), forward and backward, both ways, and prints
JSON: milliseconds for each and their ratio. Pure torch, no ComfyUI or weights.

    python benchmarks/cfg_split.py [--device cpu|cuda] [--latent 64] [--batch 1] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from focusfix_core.denoisers import batchable, cat_cond


def _attention(x: torch.Tensor, context: torch.Tensor, w: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """x: [B,N,C] latents, context: [B,T,D] -> [B,N,C]: SD's attn2 (to_q, to_k, to_v, SDPA, to_out)."""
    B, N, C = x.shape
    q, k, v = x @ w["q"], context @ w["k"], context @ w["v"]
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2) @ w["o"]


def _time(fn, device: torch.device, runs: int) -> float:
    """Least seconds of `runs` calls of fn (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--latent", type=int, default=64, help="latent side (64: 512 px)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--channels", type=int, default=320)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--width", type=int, default=768, help="context width")
    p.add_argument("--tokens", default="85,77", help="the prompt's and the negative prompt's token lengths")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args(argv)
    device, (T, Tu) = torch.device(a.device), (int(t) for t in a.tokens.split(","))
    g = torch.Generator().manual_seed(0)
    C, D, B, N = a.channels, a.width, a.batch, a.latent * a.latent
    w = {k: (torch.randn(*shape, generator=g) / shape[0] ** 0.5).to(device).requires_grad_()
         for k, shape in (("q", (C, C)), ("k", (D, C)), ("v", (D, C)), ("o", (C, C)))}
    x = torch.randn(B, N, C, generator=g).to(device)
    cond = {"context": torch.randn(B, T, D, generator=g).to(device)}
    uncond = {"context": torch.randn(B, Tu, D, generator=g).to(device)}
    pair = cat_cond(cond, uncond)["context"]

    def batched():
        _attention(torch.cat([x, x]), pair, w, a.heads).sum().backward()

    def apart():
        (_attention(x, cond["context"], w, a.heads).sum() + _attention(x, uncond["context"], w, a.heads).sum()
         ).backward()

    ms = {name: round(1000 * _time(fn, device, a.runs), 2) for name, fn in (("batched", batched), ("apart", apart))}
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "tokens": [T, Tu], "batched_tokens": int(pair.shape[1]), "batchable": batchable(cond, uncond),
              "queries": N, "batch": B, "ms_batched": ms["batched"], "ms_apart": ms["apart"],
              "ratio_batched_over_apart": round(ms["batched"] / ms["apart"], 2)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
