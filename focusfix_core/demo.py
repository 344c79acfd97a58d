"""`python -m focusfix_core demo`: both methods on the embedded tiny model in about a minute on a laptop CPU.

1. Focus-N-Fix against the tiny world's artifact reward. The base model draws a magenta/black checkerboard
   "glitch" into some images of "a blue square" at CFG 1.5 (6 of the 40 candidate seeds 120-159). The demo picks
   the candidates whose base image has a glitch by the world's exact evaluator (`tiny.evaluate.has_glitch`) and
   that the reward also flags (it needs the reward's heatmap to localise the glitch), fine-tunes a LoRA until the
   glitches are gone while the region term holds the rest of each image, and counts the glitches again, with
   the exact evaluator, on the trained images and on the candidates it did not train on (held out).
2. Separate-and-Enhance on two two-object prompts whose base images often lose the green object, with the
   share of images that show both objects (exact evaluator, 8 seeds per prompt) before and after, on those
   prompts and on four two-object prompts it did not train on (held out).

Every figure it prints is also in `OUT/demo_summary.json`.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .io import atomic_write_text
from .trainers import FixConfig, SeparateEnhanceConfig

__all__ = ["run_demo", "pick_glitched_seeds", "choose_seeds", "DEMO_FIX_PROMPT", "DEMO_PAIRS", "DEMO_HELD_OUT_PAIRS",
           "FULL", "QUICK", "DemoSetting"]

# the single-object prompt whose base images glitch most often at CFG 1.5 (6 of seeds 100-163, 12 steps; MODEL_CARD:
# 5 % over all single-object prompts, 20 steps)
DEMO_FIX_PROMPT = "a blue square"
# two-object prompts whose base images often miss the green object (6 and 10 of 24 seeds show both, CFG 3, 12 steps)
DEMO_PAIRS = ("a yellow triangle and a green circle | triangle, circle",
              "a blue triangle and a green square | triangle, square")
# two-object prompts Separate-and-Enhance does not train on, the same kinds of pair with other colours and shapes
# (chosen before any was measured): does the fix carry over, and does it cost pairs without green?
DEMO_HELD_OUT_PAIRS = ("a red triangle and a green circle", "a yellow square and a green triangle",
                       "a red circle and a blue square", "a yellow triangle and a blue circle")
FLAG = -0.5  # the artifact reward's own decision: P(glitch) > 0.5


@dataclass(frozen=True)
class DemoSetting:
    steps: int = 12                       # sampler steps (both methods)
    fix_cfg: float = 1.5                  # glitches are ~5x more frequent than at CFG 3 (MODEL_CARD)
    candidates: tuple[int, int] = (120, 160)  # seeds [a, b) of DEMO_FIX_PROMPT searched for glitches
    n_fix: int = 4                        # items Focus-N-Fix trains on
    held_out_clean: int = 4               # clean candidates also drawn with the LoRA (do they stay clean?)
    fix_iterations: int = 40
    se_cfg: float = 3.0
    se_iterations: int = 100
    check_seeds: int = 8                  # seeds per two-object prompt for the both-objects count
    held_out_pairs: int = 4               # of DEMO_HELD_OUT_PAIRS, counted the same way


FULL = DemoSetting()
QUICK = DemoSetting(steps=6, candidates=(120, 124), n_fix=2, held_out_clean=1, fix_iterations=2, se_iterations=2,
                    check_seeds=2, held_out_pairs=1)


def _log(msg: str) -> None:
    print(f"[focusfix demo] {msg}", file=sys.stderr, flush=True)


def choose_seeds(seeds: list[int], glitch: list[bool], score: list[float], n: int) -> list[int]:
    """The first n seeds whose image has a glitch (exact evaluator) that the reward flags (score < -0.5), in seed
    order; when fewer qualify (the --quick setting, a model without its weights), topped up with the other
    glitched seeds, then the clean ones, each by lowest score, so that the code path still runs."""
    ok = [s for s, g, r in zip(seeds, glitch, score) if g and r < FLAG]
    rest = sorted((not g, r, s) for s, g, r in zip(seeds, glitch, score) if s not in ok)
    return (ok + [s for _, _, s in rest])[:n]


@torch.no_grad()
def base_images(model, prompt: str, seeds: list[int], steps: int, cfg_scale: float) -> torch.Tensor:
    """The base model's images (no LoRA), as the trainer draws its I0: [len(seeds),3,H,W] in [0,1]."""
    return model.sample([prompt] * len(seeds), list(seeds), steps, cfg_scale)


@torch.no_grad()
def pick_glitched_seeds(model, reward, prompt: str, candidates, n: int, steps: int, cfg_scale: float
                        ) -> tuple[list[int], dict]:
    """Draw every candidate seed's base image and pick n to fix (`choose_seeds`). -> (seeds, info) where info holds
    the candidates' "seeds", "images" [N,3,H,W], "glitch" (exact evaluator) and "score" (reward)."""
    from .tiny.evaluate import has_glitch

    seeds = list(candidates)
    I0 = base_images(model, prompt, seeds, steps, cfg_scale)
    glitch, score = has_glitch(I0).tolist(), reward.score(I0).float().tolist()
    return choose_seeds(seeds, glitch, score, n), {"seeds": seeds, "images": I0, "glitch": glitch, "score": score}


def _read_png(path) -> torch.Tensor:
    """An image the demo wrote, as the artist sees it: [1,3,H,W] in [0,1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a.copy()).permute(2, 0, 1)[None]


def _fresh_model(lora_file: str | None = None):
    """The tiny model as loaded, with a saved LoRA hooked on when given (the file the user gets, read back)."""
    from .cli import load_model
    from .lora import read_focusfix_lora

    model, _ = load_model("tiny", random_ok=True)
    if lora_file is not None:
        read_focusfix_lora(lora_file).attach(model.net)
    return model


def _grid(rows: list[torch.Tensor], ncol: int) -> torch.Tensor:
    from .viz import image_grid, upscale

    return image_grid(upscale(torch.cat(rows).clamp(0, 1)), nrow=ncol)


def _fix_check(fix: dict, pick: dict, picked: list[int], prompt: str, s: DemoSetting, out: Path) -> dict:
    """Glitches before/after (exact evaluator) on the trained items, read back from their PNGs, and on held-out
    candidates drawn with the saved LoRA; writes out/held_out.png (top row base, bottom row with the LoRA)."""
    from .tiny.evaluate import has_glitch
    from .viz import save_png

    items = []
    for k, it in enumerate(fix["items"]):
        b, a = (bool(has_glitch(_read_png(it[w]))[0]) for w in ("before", "after"))
        items.append({"seed": it["seed"], "glitch_before": b, "glitch_after": a,
                      "reward_before": fix["reward_before"][k], "reward_after": fix["reward_after"][k]})
    rest = [(sd, g) for sd, g in zip(pick["seeds"], pick["glitch"]) if sd not in picked]
    held = [sd for sd, g in rest if g] + [sd for sd, g in rest if not g][:s.held_out_clean]
    held_out = {"seeds": held, "glitch_before": [], "glitch_after": [], "mean_abs_change": None}
    if held:
        I0 = pick["images"][[pick["seeds"].index(sd) for sd in held]]
        I1 = base_images(_fresh_model(fix["files"]["lora"]), prompt, held, s.steps, s.fix_cfg)
        held_out.update(glitch_before=has_glitch(I0).tolist(), glitch_after=has_glitch(I1).tolist(),
                        mean_abs_change=float((I1 - I0).abs().mean()))
        save_png(_grid([I0, I1], len(held)), out / "held_out.png")
        held_out["file"] = str(out / "held_out.png")
    return {"items": items, "held_out": held_out,
            "glitches_before": sum(i["glitch_before"] for i in items),
            "glitches_after": sum(i["glitch_after"] for i in items)}


def _both_objects(model, prompts, seeds: list[int], s: DemoSetting) -> tuple[torch.Tensor, list[int]]:
    """Images of every prompt for every seed ([P*S,3,H,W], prompt-major) and, per prompt, how many show every
    prompted object (exact evaluator's `both_present`)."""
    from .tiny.evaluate import evaluate

    ps = [p for p in prompts for _ in seeds]
    I = torch.cat([base_images(model, p, seeds, s.steps, s.se_cfg) for p in prompts])
    ok = [r["both_present"] for r in evaluate(I, ps)]
    return I, [sum(ok[i * len(seeds):(i + 1) * len(seeds)]) for i in range(len(prompts))]


def _mean(values: list[float | None]) -> float:
    """Mean of a report's per-prompt losses; NaN when one is null (a run that diverged)."""
    return sum(values) / len(values) if values and None not in values else float("nan")


_COUNTS_STOPPED = "interrupted while counting the tuned model's images: the counts not reached are null"


def run_demo(out: Path, quick: bool = False, overwrite: bool = False) -> dict:
    """Focus-N-Fix then Separate-and-Enhance on the embedded tiny model, into `out`/focus_n_fix and
    `out`/separate_enhance, with a summary in `out`/demo_summary.json; returns {"status", "files"} as the
    commands do."""
    from .cli import RunFailed, claim_out, prepare_out

    t0 = time.perf_counter()
    out = prepare_out(Path(out), overwrite, resume=False, resumable=False)
    for part in ("focus_n_fix", "separate_enhance"):  # a demo stopped half way left outputs there
        prepare_out(out / part, overwrite, resume=False, resumable=False)
    with claim_out(out, overwrite, resume=False, resumable=False):  # another demo writing there is refused
        trained: list[str] = []  # the LoRAs this demo has written
        try:
            return _run(out, QUICK if quick else FULL, quick, t0, trained)
        except OSError as e:  # a disk that fills at the pictures and summary after training: as the commands do
            if not trained:
                raise
            raise RunFailed(f"cannot write {e.filename or 'the demo outputs'}: {e.strerror or e}\n"
                            f"{' and '.join(trained)} hold the trained LoRAs; the pictures and summary are "
                            f"incomplete") from None


def _run(out: Path, s: DemoSetting, quick: bool, t0: float, trained: list[str]) -> dict:
    from .cli import RunFailed, clear_earlier_outputs, load_model, run_fix, run_separate_enhance
    from .trainers import split_objects_prompt
    from .viz import save_png

    model, note = load_model("tiny", random_ok=True)
    _log(f"model: {note}")
    try:
        from .tiny.rewards import load_default_rewards

        reward, reward_note = load_default_rewards()["artifact"], "tiny-world artifact reward (heatmap)"
    except (ImportError, FileNotFoundError, KeyError) as e:  # a checkout without the shipped reward weights
        from .rewards.image import SharpnessReward

        reward, reward_note = SharpnessReward(), f"sharpness reward (tiny artifact reward unavailable: {e})"
    _log(f"reward: {reward_note}")
    size, prompt = model.cfg.image_size, DEMO_FIX_PROMPT

    # -- 1. Focus-N-Fix ------------------------------------------------------------------------------------------
    seeds, pick = pick_glitched_seeds(model, reward, prompt, range(*s.candidates), s.n_fix, s.steps, s.fix_cfg)
    n_glitch = sum(pick["glitch"])
    at = [pick["seeds"].index(sd) for sd in seeds]
    why = ("each has a glitch by the exact evaluator, which the reward flags" if all(
        pick["glitch"][i] and pick["score"][i] < FLAG for i in at) else
        f"only {sum(pick['glitch'][i] for i in at)} have a glitch: too few candidates glitch in this setting, the "
        f"others only run the code path")
    _log(f"Focus-N-Fix on {prompt!r} (CFG {s.fix_cfg:g}, {s.steps} steps): {n_glitch} of {len(pick['seeds'])} "
         f"candidate seeds {s.candidates[0]}-{s.candidates[1] - 1} have a glitch; training on seeds {seeds} ({why})")
    # lam 0.5 holds the rest of the image (0.05 let the objects fade); every linear layer: a LoRA on the attention
    # layers alone learnt to reshape the checkerboard until the reward missed it (the exact evaluator did not)
    fix_cfg = FixConfig(prompts=(prompt,), seeds=tuple(seeds), height=size, width=size, steps=s.steps,
                        cfg_scale=s.fix_cfg, K=2, lam=0.5, mask_source="heatmap", threshold_mode="value",
                        threshold=0.5, dilation=2, iterations=s.fix_iterations, lr=8e-3, rank=4, batch_size=2,
                        targets="all_linear")
    # its first write makes the folder this demo's: an earlier demo's summary and Separate-and-Enhance outputs
    # (--overwrite) go then, so a demo stopped later leaves none of them beside its own
    fix = run_fix(model, reward, fix_cfg, out / "focus_n_fix", model_note=note,
                  on_first_write=lambda: [clear_earlier_outputs(d) for d in (out, out / "separate_enhance")])
    trained.append(fix["files"]["lora"])
    if fix["status"] != "done":  # Ctrl-C (or a failure) ends the demo here: its outputs are written
        return {"status": fix["status"], "files": {f"focus_n_fix_{k}": v for k, v in fix["files"].items()}}
    check = _fix_check(fix, pick, seeds, prompt, s, out / "focus_n_fix")
    ho = check["held_out"]
    outside, inside = fix["mean_abs_change_outside_mask"], fix["mean_abs_change_inside_mask"]
    _log(f"Focus-N-Fix: glitches (exact evaluator) {check['glitches_before']} -> {check['glitches_after']} of "
         f"{len(seeds)} trained images; reward {fix['mean_reward_before']:.3f} -> {fix['mean_reward_after']:.3f}; "
         f"mean change outside the mask {255 * (outside or 0):.1f}/255 (inside {255 * (inside or 0):.1f}/255)"
         + (f"; held-out seeds {ho['seeds']} (not trained on): glitches {sum(ho['glitch_before'])} -> "
            f"{sum(ho['glitch_after'])} of {len(ho['seeds'])}" if ho["seeds"] else ""))

    # -- 2. Separate-and-Enhance ----------------------------------------------------------------------------------
    prompts, objects = zip(*(split_objects_prompt(p) for p in DEMO_PAIRS))
    _log(f"Separate-and-Enhance on {list(prompts)} (CFG {s.se_cfg:g})")
    se_model = _fresh_model()  # without the Focus-N-Fix LoRA, which stays hooked on `model`
    check_seeds, held = list(range(s.check_seeds)), DEMO_HELD_OUT_PAIRS[:s.held_out_pairs]
    both0 = held0 = both1 = held1 = None
    se_wrote = []  # set at Separate-and-Enhance's first write

    try:
        S0, both0 = _both_objects(se_model, prompts, check_seeds, s)
        H0, held0 = _both_objects(se_model, held, check_seeds, s)
        # lam_sep 5, lam_en 1: on the tiny model Enhance raises both maps until the objects merge (lam_en 2 lost
        # more objects than it found); Separate is what brings the missing object back
        se_cfg = SeparateEnhanceConfig(prompts=prompts, objects=objects, height=size, width=size,
                                       iterations=s.se_iterations, lr=3e-3, rank=4, batch_size=2,
                                       resolution=size // 2, lam_sep=5.0, lam_en=1.0)
        se = run_separate_enhance(se_model, se_cfg, out / "separate_enhance", model_note=note,
                                  sample_steps=s.steps, cfg_scale=s.se_cfg,
                                  on_first_write=lambda: se_wrote.append(1))
    except KeyboardInterrupt:  # Ctrl-C before its first step: Focus-N-Fix's results still get their summary
        if se_wrote:
            raise
        se = {"status": "interrupted before its first step: nothing was written", "files": {}}
        _log(f"Separate-and-Enhance {se['status']}")
    except RunFailed as e:  # out of memory or NaN at its first step, bad data later: the same
        lora = out / "separate_enhance" / "lora.safetensors"
        se = {"status": f"failed: {e}", "files": {"lora": str(lora)} if se_wrote and lora.is_file() else {}}
        _log(f"Separate-and-Enhance {se['status']}")
    se_files = dict(se["files"])
    if "lora" in se_files:
        trained.append(se_files["lora"])
    stopped = ""  # why the tuned model's counts are incomplete, if they are
    if se["status"] == "done":
        try:
            tuned = _fresh_model(se["files"]["lora"])
            S1, both1 = _both_objects(tuned, prompts, check_seeds, s)
            H1, held1 = _both_objects(tuned, held, check_seeds, s)
            n = len(check_seeds)
            for name, (A, B) in (("both_objects", (S0, S1)), ("held_out", (H0, H1))):  # per prompt: base, tuned rows
                rows = [t for i in range(len(A) // n) for t in (A[i * n:(i + 1) * n], B[i * n:(i + 1) * n])]
                se_files[name] = str(save_png(_grid(rows, n), out / "separate_enhance" / f"{name}.png"))
        except KeyboardInterrupt:  # the summary still holds what was measured (an --overwrite removed the last one)
            stopped = _COUNTS_STOPPED
            _log(stopped)
    seconds = time.perf_counter() - t0
    summary = {
        "model": note, "reward": reward_note, "seconds": round(seconds, 1), "quick": quick,
        "focus_n_fix": {
            **{k: fix[k] for k in ("status", "mean_reward_before", "mean_reward_after",
                                   "mean_abs_change_inside_mask", "mean_abs_change_outside_mask")},
            "prompt": prompt, "cfg_scale": s.fix_cfg, "steps": s.steps,
            "candidate_seeds": list(range(*s.candidates)), "candidates_with_glitch": n_glitch,
            "seeds": seeds, "glitches_before": check["glitches_before"], "glitches_after": check["glitches_after"],
            "items": check["items"],
            "held_out": {k: v for k, v in ho.items() if k != "file"},
            "files": {**fix["files"], **({"held_out": ho["file"]} if "file" in ho else {})},
        },
        "separate_enhance": {
            "status": se["status"],
            **{k: se[k] for k in ("separate_before", "separate_after", "enhance_before", "enhance_after") if k in se},
            "prompts": list(prompts), "cfg_scale": s.se_cfg, "check_seeds": check_seeds,
            "both_objects_before": both0, "both_objects_after": both1,
            "held_out": {"prompts": list(held), "both_objects_before": held0, "both_objects_after": held1},
            "files": se_files,
            **({"note": stopped} if stopped else {}),
        },
    }
    atomic_write_text(json.dumps(summary, indent=2), out / "demo_summary.json")
    if stopped:
        raise KeyboardInterrupt  # exit 130, as for a stop anywhere else
    files = {"summary": str(out / "demo_summary.json"), **{f"focus_n_fix_{k}": v for k, v in
                                                             summary["focus_n_fix"]["files"].items()},
             **{f"separate_enhance_{k}": v for k, v in se_files.items()}}
    if "separate_before" not in se:  # stopped with nothing to count: exit 1 after a failure, 130 after Ctrl-C
        if se["status"].startswith("failed"):
            return {"status": f"failed in Separate-and-Enhance (Focus-N-Fix is done): {se['status'][8:]}",
                    "files": files}
        return {"status": f"interrupted before Separate-and-Enhance's first step (Focus-N-Fix is done): nothing "
                          f"was written into {out / 'separate_enhance'}", "files": files}
    n, sep, en = len(check_seeds), [_mean(se[f"separate_{w}"]) for w in ("before", "after")], \
        [_mean(se[f"enhance_{w}"]) for w in ("before", "after")]

    def counts(ps, before, after):
        return ", ".join(f"{p!r} {b0} -> {'n/a' if b1 is None else b1} of {n}"
                         for p, b0, b1 in zip(ps, before, after or [None] * len(ps)))
    _log(f"Separate-and-Enhance: images with both objects (exact evaluator, seeds 0-{n - 1}) "
         f"{counts(prompts, both0, both1)}; separate loss {sep[0]:.3f} -> {sep[1]:.3f} (lower: less overlap of the "
         f"objects' attention), enhance loss {en[0]:.3f} -> {en[1]:.3f} (lower: the weaker object's attention is "
         f"stronger)" + ("; on the tiny model the separate term does the work, the enhance term rises"
                         if en[1] > en[0] else ""))
    _log(f"Separate-and-Enhance on prompts it did not train on: {sum(held0)} -> "
         f"{'n/a' if held1 is None else sum(held1)} of {n * len(held)} with both objects "
         f"({counts(held, held0, held1)})")
    _log(f"done in {seconds:.0f} s; outputs in {out.resolve()}")
    return {"status": se["status"], "files": files}
