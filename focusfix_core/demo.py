"""`python -m focusfix_core demo`: both methods on the embedded tiny model in about a minute on a laptop CPU.

1. Focus-N-Fix against the artifact reward: among candidate seeds, the demo picks the base images the reward
   dislikes most (the ones with a glitch), localises the glitch with the reward's heatmap, and fixes it with a
   LoRA while the region term holds the rest of the image.
2. A short Separate-and-Enhance run on two-object prompts (cross-attention to_k only).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from .io import atomic_write_text
from .trainers import FixConfig, SeparateEnhanceConfig

__all__ = ["run_demo", "DEMO_PROMPTS", "DEMO_PAIRS"]

DEMO_PROMPTS = ("a red circle", "a blue square", "a yellow triangle", "a green circle")
DEMO_PAIRS = ("a red circle and a blue square | circle, square",
              "a yellow triangle and a green circle | triangle, circle")


def _log(msg: str) -> None:
    print(f"[focusfix demo] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def pick_worst_seeds(model, reward, prompt: str, candidates: range, n: int, steps: int, cfg_scale: float) -> list[int]:
    """The n seeds whose base image scores lowest under the reward (where there is something to fix)."""
    from .denoisers import CFGDenoiser
    from .sampler import sample, sampling_sigmas, seed_noise

    size = model.cfg.image_size
    sig = sampling_sigmas(model, steps)
    den = CFGDenoiser(model.denoise, model.encode_prompts([""]), cfg_scale)
    seeds = list(candidates)
    cond = model.encode_prompts([prompt] * len(seeds))
    I0 = model.decode(sample(den, seed_noise(seeds, (3, size, size)) * sig[0], sig, cond)).clamp(0, 1)
    order = reward(I0).argsort().tolist()
    return [seeds[i] for i in order[:n]]


def run_demo(out: Path, quick: bool = False, overwrite: bool = False) -> dict:
    """Focus-N-Fix then Separate-and-Enhance on the embedded tiny model, into `out`/focus_n_fix and
    `out`/separate_enhance, with a summary in `out`/demo_summary.json; returns {"status", "files"} as the
    commands do."""
    from .cli import load_model, prepare_out, run_fix, run_separate_enhance
    from .trainers import split_objects_prompt

    t0 = time.perf_counter()
    out = prepare_out(Path(out), overwrite, resume=False, resumable=False)
    for part in ("focus_n_fix", "separate_enhance"):  # a demo stopped half way left outputs there
        prepare_out(out / part, overwrite, resume=False, resumable=False)
    model, note = load_model("tiny", random_ok=True)
    _log(f"model: {note}")
    try:
        from .tiny.rewards import load_default_rewards

        reward, reward_note = load_default_rewards()["artifact"], "tiny-world artifact reward (heatmap)"
    except (ImportError, FileNotFoundError, KeyError) as e:  # before the tiny rewards are shipped
        from .rewards.image import SharpnessReward

        reward, reward_note = SharpnessReward(), f"sharpness reward (tiny artifact reward unavailable: {e})"
    _log(f"reward: {reward_note}")
    size, cfg_scale = model.cfg.image_size, 3.0
    steps, n_seeds, n_candidates, iters, se_iters = (6, 2, 4, 2, 2) if quick else (12, 4, 48, 60, 40)
    seeds = pick_worst_seeds(model, reward, DEMO_PROMPTS[0], range(100, 100 + n_candidates), n_seeds,
                             steps, cfg_scale)
    _log(f"Focus-N-Fix on {DEMO_PROMPTS[0]!r}, seeds {seeds} (the base images the reward dislikes most)")
    fix_cfg = FixConfig(prompts=(DEMO_PROMPTS[0],), seeds=tuple(seeds), height=size, width=size, steps=steps,
                        cfg_scale=cfg_scale, K=1, lam=1.0, mask_source="heatmap", threshold_mode="top_percent",
                        threshold=0.1, dilation=1, iterations=iters, lr=3e-3, rank=4, batch_size=2, targets="attn")
    fix = run_fix(model, reward, fix_cfg, out / "focus_n_fix", model_note=note)
    if fix["status"] != "done":  # Ctrl-C (or a failure) ends the demo here: its outputs are written
        return {"status": fix["status"], "files": {f"focus_n_fix_{k}": v for k, v in fix["files"].items()}}
    _log("Separate-and-Enhance on two-object prompts")
    prompts, objects = zip(*(split_objects_prompt(p) for p in DEMO_PAIRS))
    # lam_sep 2: on the tiny model, equal weights let Enhance raise both maps until their overlap grows
    se_cfg = SeparateEnhanceConfig(prompts=prompts, objects=objects, height=size, width=size, iterations=se_iters,
                                   lr=3e-3, rank=4, batch_size=2, resolution=size // 2, lam_sep=2.0)
    se = run_separate_enhance(model, se_cfg, out / "separate_enhance", model_note=note,
                              sample_steps=steps, cfg_scale=cfg_scale)
    seconds = time.perf_counter() - t0
    summary = {
        "model": note, "reward": reward_note, "seconds": round(seconds, 1),
        "focus_n_fix": {k: fix[k] for k in ("status", "mean_reward_before", "mean_reward_after",
                                            "mean_abs_change_inside_mask", "mean_abs_change_outside_mask", "files")},
        "separate_enhance": {k: se[k] for k in ("status", "separate_before", "separate_after", "enhance_before",
                                                "enhance_after", "files")},
    }
    atomic_write_text(json.dumps(summary, indent=2), out / "demo_summary.json")
    _log(f"done in {seconds:.0f} s; reward {fix['mean_reward_before']:.3f} -> {fix['mean_reward_after']:.3f}; "
         f"outputs in {out.resolve()}")
    return {"status": "done", "files": {"summary": str(out / "demo_summary.json"),
                                        **{f"focus_n_fix_{k}": v for k, v in fix["files"].items()},
                                        **{f"separate_enhance_{k}": v for k, v in se["files"].items()}}}
