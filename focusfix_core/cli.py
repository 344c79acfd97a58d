"""Command line: `python -m focusfix_core {demo,train-fnf,train-sne,convert-reward}`.

Runs on the embedded tiny model (`--model tiny`, the default) or a TinyModel safetensors file. Real SD1.5/SDXL
checkpoints are fixed inside ComfyUI with the FocusFix nodes. Every run writes into a folder the user names:
the LoRA, a before/after grid (with the masks; train-fnf: each image at full size too), loss curves,
`report.json`/`report.md`, a resumable `state.pt` (and `attention.png` for train-sne). Ctrl-C stops at once and
keeps the LoRA of the last finished step.
"""
from __future__ import annotations

import argparse
import errno
import io
import json
import math
import os
import re
import signal
import sys
import threading
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from . import __version__
from .attention import maps_scale, maps_tiles
from .io import atomic_write_text, is_read_only, load_mask_image, load_training_state
from .lora import LoRA, SavedLoRA, continued_metadata, read_focusfix_lora, save_lora
from .records import StepRecord
from .saliency import SALIENCY_METHODS, THRESHOLD_MODES, check_mask, fit_mask, mask_coverage, mask_kind
from .sampler import SAMPLERS, sample
from .schedules import SCHEDULERS
from .trainers import (MASK_SOURCES, MAX_RANK, METHOD_TRAINERS, PRESERVATIONS, FixConfig, FixTrainer,
                       NonFiniteLossError, SeparateEnhanceConfig, SeparateEnhanceTrainer, batch_note,
                       check_continued_method, check_state_format, interrupts_held, parse_ints,
                       repeated_prompts_note, repeated_seeds_note, split_objects_prompt, stop_as_interrupt, trainer_on,
                       unchanged_notes)
from .viz import CHANGE_SCALE, heat_overlay, image_grid, mask_overlay, plot_curves, save_png, upscale, weighted_mean

__all__ = ["main", "run_fix", "run_separate_enhance", "ProgressBar"]

MAX_SIZE = 256  # the largest --size for the tiny model (`_size`)
COMMAND_OF_METHOD = {"focus-n-fix": "train-fnf", "separate-and-enhance": "train-sne"}
OUTPUT_NAMES = ("lora.safetensors", "report.json", "report.md", "before_after.png", "curves.png", "state.pt",
                "attention.png", "demo_summary.json", "both_objects.png", "held_out.png")  # the last two: the demo's
# rows of before_after.png (train-fnf): hundreds of items made a picture no viewer opens and a grid of 4 image
# copies per item in memory; every item still has its full-size before_K.png and after_K.png
GRID_ITEMS = 16
ITEM_IMAGES = re.compile(r"(before|after)_(0|[1-9]\d*)\.png")  # train-fnf: each item's I0 and I at full size (paint M on I0)


class ProgressBar:
    """A tqdm-style bar on stderr (one line, redrawn); log lines instead when stderr is not a terminal."""

    def __init__(self, total: int, desc: str, stream=None, start: int = 0):
        """start: the steps already done before this bar (a resumed run): the rate counts only this run's."""
        self.total, self.desc, self.stream, self.start = total, desc, stream or sys.stderr, start
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._last_log = -1

    def update(self, done: int, text: str = "") -> None:
        elapsed = time.perf_counter() - self.t0
        rate = elapsed / max(done - self.start, 1)
        eta = rate * (self.total - done)
        if self.tty:
            filled = int(24 * done / self.total)
            bar = "#" * filled + "." * (24 - filled)
            self.stream.write(f"\r{self.desc} [{bar}] {done}/{self.total} {text} {rate:.2f}s/it ETA {eta:.0f}s ")
            if done == self.total:
                self.stream.write("\n")
        else:
            decile = int(10 * done / self.total)
            if decile == self._last_log and done != self.total:
                return
            self._last_log = decile
            self.stream.write(f"{self.desc}: {done}/{self.total} {text} ({rate:.2f}s/it, ETA {eta:.0f}s)\n")
        self.stream.flush()


# -- model and reward ---------------------------------------------------------------------------------------

def load_model(spec: str, random_ok: bool = False):
    """"tiny" -> the shipped tiny model (random weights, announced, if missing and random_ok); else a path."""
    from .tiny.model import TinyModel, load_default_model

    if spec == "tiny":
        try:
            return load_default_model(), "embedded tiny model (shipped weights)"
        except FileNotFoundError:
            if not random_ok:
                raise
            return TinyModel.random(seed=0), "RANDOMLY INITIALISED tiny model (shipped weights not found)"
    path = Path(spec)
    if path.is_dir():
        raise ValueError(f"--model {spec!r} is a folder: give 'tiny' or a TinyModel .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"--model {spec!r}: no such file (give 'tiny' or a TinyModel .safetensors)")
    return TinyModel.load(path), f"tiny model from {path}"


def load_reward_spec(spec: str):
    """A reward by name (built-in image rewards, the tiny world's 'artifact'/'attribute') or by file path."""
    from .rewards import loading

    name = spec.removeprefix(loading.BUILTIN_PREFIX)  # the Load Reward node's spelling works too
    if name in loading.BUILTIN_REWARDS:
        return loading.BUILTIN_REWARDS[name]()
    tiny = spec.removeprefix("tiny_")  # the name the reward reports (report.md, a LoRA's metadata) works too
    if tiny in ("artifact", "attribute"):
        from .tiny.rewards import load_default_rewards

        return load_default_rewards()[tiny]
    path = Path(spec)
    if path.is_dir():
        raise ValueError(f"--reward {spec!r} is a folder: give the reward file in it, or a known reward name")
    if path.is_file():
        return loading.load_reward(path, tower_name=None)  # the command line has no input for a tower
    known = sorted(loading.BUILTIN_REWARDS) + ["artifact", "attribute"]
    raise ValueError(f"--reward {spec!r} is neither a known reward {known} nor an existing file")


# -- output folder -------------------------------------------------------------------------------------------

def _output_name(name: str) -> bool:
    return name in OUTPUT_NAMES or bool(ITEM_IMAGES.fullmatch(name))


def is_output(path: Path, out: Path) -> bool:
    """Whether `path` (a link: the file it points to) is one of the files a run writes into, or with --overwrite
    removes from, `out`; on a file system that ignores case (macOS, Windows) also Before_0.png, which the run's
    before_0.png would replace."""
    real = path.resolve()
    if real.parent != out.resolve():
        return False
    if _output_name(real.name):
        return True
    lower = real.with_name(real.name.lower())
    try:
        return _output_name(lower.name) and lower.exists() and os.path.samefile(real, lower)
    except OSError:
        return False


def _check_not_an_output(path: str | Path, out: Path, flag: str) -> None:
    """Refuse an input file the run would replace (with --overwrite: remove) in `out` before it is read."""
    path = Path(path)
    if path.is_file() and is_output(path, out):
        raise ValueError(f"{flag} {path} is one of the files this run writes into --out {out}: copy it under another "
                         f"name or folder first (e.g. {path.with_name('input_' + path.name)}), or give another --out")


def _out_folder(text: str) -> Path:
    """--out as a Path; an empty one (an unset shell variable) is refused, not read as the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give an output folder (an unset shell variable?)")
    return Path(text)


def prepare_out(out: Path, overwrite: bool, resume: bool, resumable: bool = True) -> Path:
    """Check the output folder (created when the first file is written, so a refused run leaves no empty
    folder); refuse to overwrite earlier outputs unless asked (or resuming; `resumable`: the command has
    --resume)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file: give a folder")
    if out.is_symlink() and not out.exists():  # the first write would fail only after training
        raise ValueError(f"--out {out} is a link to {os.readlink(out)}, which does not exist: create that folder, "
                         f"or give another --out")
    base = next(p for p in (out, *out.absolute().parents) if p.exists())  # where the folder would be created
    try:  # a real write: os.access says yes for every folder on Windows, and training would run for nothing
        tempfile.TemporaryFile(dir=base).close()
    except OSError:
        raise ValueError(f"--out {out}: {base} is not a folder this user can write to") from None
    existing = [n for n in OUTPUT_NAMES if (out / n).exists()]
    existing += sorted(p.name for p in out.iterdir() if ITEM_IMAGES.fullmatch(p.name)) if out.is_dir() else []
    if existing and not (overwrite or resume):
        resume_hint = (f" (or --resume to continue from {out / 'state.pt'})"
                       if resumable and (out / "state.pt").is_file() else "")
        raise FileExistsError(f"{out} already holds {existing}: choose another --out, or pass --overwrite"
                              f"{resume_hint}")
    kept = [n for n in existing if is_read_only(out / n)]  # a save keeps it (`io`): refused now, not after training
    if kept:
        raise FileExistsError(f"{out} holds {kept}, marked read-only: a run into it replaces its outputs. Make them "
                              f"writable" + ("" if resume else ", or choose another --out"))
    return out


LOCK_NAME = ".focusfix.lock"


def file_stamp(path: Path) -> tuple | None:
    """(inode, size, modification time) of `path`, None when it is missing: an atomic save (a new file renamed
    over it) changes it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@contextmanager
def claim_out(out: Path, overwrite: bool, resume: bool, resumable: bool = True,
              state_read: tuple | None = None) -> Iterator[Path]:
    """Hold OUT/.focusfix.lock while a run writes into `out`: a second run into the same folder is refused at once,
    not left to write over the first one's outputs. An OS lock (flock; msvcrt.locking on Windows), so a
    killed run holds nothing. Once held, `prepare_out`'s check runs again: a run that started while the folder
    was still empty must not replace what a run finished meanwhile; nor may a resumed run whose state.pt
    (`file_stamp` when it was read: `state_read`) another run replaced meanwhile."""
    created = [p for p in (out, *out.absolute().parents) if not p.exists()]  # deepest first: removed in that order
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = _lock(path, out)
    try:
        try:
            prepare_out(out, overwrite, resume, resumable)
            if state_read is not None and file_stamp(out / "state.pt") != state_read:
                raise FileExistsError(f"{out / 'state.pt'} changed while this run started (another run wrote into "
                                      f"--out {out} meanwhile): run the command again to resume what it holds now")
            yield out
        finally:
            if fd is not None and os.name != "nt":  # Windows deletes no open file: below, once closed
                path.unlink(missing_ok=True)  # held: a run that opened it meanwhile sees it gone (`_lock`)
    finally:
        if fd is not None:
            os.close(fd)
        try:
            if os.name == "nt":
                path.unlink(missing_ok=True)
            for folder in created:  # a run refused before it wrote anything leaves no empty folder, nor parents
                folder.rmdir()  # OSError once one is not empty
        except OSError:  # another run holds the lock now, or wrote meanwhile: its files stay
            pass


def _lock(path: Path, out: Path) -> int | None:
    """Open and lock `path` without waiting -> its descriptor; FileExistsError when another run holds it; None
    (with a warning) where the file system has no locks (some network and FUSE mounts)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.name == "nt":
                import msvcrt
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, getattr(errno, "EDEADLOCK", None)):
                raise FileExistsError(f"another FocusFix run is writing into --out {out}: wait for it to end, or "
                                      f"choose another --out") from None
            print(f"warning: cannot lock {path} ({e.strerror}): a second run into --out {out} would not be "
                  f"refused", file=sys.stderr)
            return None
        try:  # the run that held it unlinked it between our open and our lock: lock the file that is there now
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


class RunFailed(Exception):
    """Training stopped on bad data after some steps; what they trained is written (exit 1)."""


class NothingTrained(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) before this run's first step: nothing is written, earlier files stay (exit 130)."""


def clear_earlier_outputs(out: Path, resumed: bool = False) -> None:
    """Remove an earlier run's outputs from `out` (what --overwrite replaces), just before this run writes its
    first file: a run stopped later must not leave the earlier run's report and images beside its own LoRA
    (nor another command's, whose file names differ), and one stopped before that first write keeps them.
    resumed: the run goes on from the LoRA and state.pt there (and replaces them): only the reports and images
    drawn at fewer steps go."""
    kept, own = [], ("lora.safetensors", "state.pt") if resumed else ()
    for path in out.iterdir() if out.is_dir() else ():
        if _output_name(path.name) and path.name not in own:
            try:
                path.unlink(missing_ok=True)
            except OSError as e:  # held by another program (Windows), or the like: training must not stop for it
                kept.append(f"{path.name} ({e.strerror or e})")
    if kept:
        print(f"\nwarning: could not remove the earlier run's {', '.join(kept)} from {out}: the folder mixes "
              f"that run's files with this one's", file=sys.stderr)


def _consume(trainer, bar: ProgressBar, out: Path, checkpoint_every: int,
             first_write: Callable[[], None]) -> tuple[list[StepRecord], str]:
    """Run the trainer; returns (records, status) where status is done | interrupted | failed: <why>.
    `first_write()` runs before the first file is written into `out` (`clear_earlier_outputs` once)."""
    status, start = "done", trainer.step
    try:
        for rec in trainer:
            bar.update(rec.step + 1, rec.summary().split("  ", 1)[1].rsplit("  ", 1)[0])
            if checkpoint_every and (rec.step + 1) % checkpoint_every == 0:
                first_write()
                try:
                    trainer.save_state(out / "state.pt")
                except OSError as e:  # a checkpoint is insurance: losing the run to it would lose more
                    print(f"\nwarning: state.pt after step {rec.step + 1} was not written ({e}); training goes on",
                          file=sys.stderr)
    except KeyboardInterrupt:
        trainer.restore_last_good()
        if trainer.step == start:  # an untrained (or unchanged) LoRA would replace what the folder holds
            raise NothingTrained(f"interrupted before the first training step: nothing was written into {out}"
                                 + (" (state.pt is unchanged: --resume still continues it)" if start else "")
                                 ) from None
        status = f"interrupted after {trainer.step} steps"
    except (NonFiniteLossError, torch.OutOfMemoryError) as e:
        trainer.restore_last_good()
        if trainer.step == start:  # as a Ctrl-C there: an untrained LoRA would replace what the folder holds
            raise RunFailed(f"{e}\nno step finished: nothing was written into {out}"
                            + (" (state.pt is unchanged)" if start else "")) from None
        status = f"failed: {e}"
    except ValueError as e:  # met mid-run (an item's empty mask, a NaN score of I0): keep the steps done
        if trainer.step == start:
            raise
        trainer.restore_last_good()
        first_write()
        path, _, state = _save_trained(trainer, out, "")
        raise RunFailed(f"{e}\nstopped after {trainer.step} steps: {path} holds their LoRA"
                        + (f" and {state['state']} their state" if state else "")) from None
    return trainer.history, status


def _save_trained(trainer, out: Path, status: str) -> tuple[Path, str, dict[str, str]]:
    """Write lora.safetensors, then state.pt; -> (the LoRA's path, status, {"state": its path} or {}). The LoRA
    first: it is what the run is for, and the smaller file. A state.pt that cannot be written is a warning and
    makes the status failed (exit 1): the LoRA holds every step, but --resume cannot continue them. A second
    Ctrl-C (or SIGTERM) while they are written waits until both are (milliseconds), then stops the command."""
    with interrupts_held():
        path = save_lora(out / "lora.safetensors", trainer.lora, _metadata(trainer), overwrite=True)
        try:
            trainer.save_state(out / "state.pt")
        except OSError as e:
            why = f"{out / 'state.pt'} was not written ({e.strerror or e}): {path} holds the LoRA, --resume cannot go on"
            print(f"warning: {why}", file=sys.stderr)
            status = f"{status}; {why}" if status.startswith("failed") else f"failed: {why}"
            return path, status, {}
    return path, status, {"state": str(out / "state.pt")}


@contextmanager
def _lora_kept(lora_path: Path, state_file: dict[str, str]) -> Iterator[None]:
    """Around the images and report drawn after training: a failure there (a full disk, out of memory) is exit 1
    naming what was not written and what is kept, not exit 2 reading as if the run had saved nothing."""
    kept = f"training ended: {lora_path} holds the trained LoRA" + (
        f" and {state_file['state']} its state" if state_file else "")
    try:
        yield
    except OSError as e:
        raise RunFailed(f"cannot write {e.filename or 'the images and report'}: {e.strerror or e}\n{kept}; the "
                        f"images and report are incomplete") from None
    except torch.OutOfMemoryError as e:
        raise RunFailed(f"{e}\n{kept}; the before/after images did not fit in memory (the LoRA is "
                        f"complete)") from None


def _before_first_write(out: Path, state: dict | None, then: Callable[[], None] | None = None
                        ) -> Callable[[], None]:
    """What runs before a run's first file, once: `clear_earlier_outputs` (for a resumed run, the reports and
    images of its earlier steps), then `then()`."""
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            clear_earlier_outputs(out, resumed=state is not None)
            if then is not None:
                then()
    return call


def _say_images_follow(status: str, lora_path: Path, quiet: bool) -> None:
    """After a Ctrl-C ended training: the LoRA is written, and the images take a while (a second Ctrl-C skips)."""
    if status.startswith("interrupted") and not quiet:
        print(f"\n{status}: {lora_path} is written; drawing the before/after images and the report (Ctrl-C again "
              f"to skip them)", file=sys.stderr)


def _step_bar(desc: str, quiet: bool) -> Callable[[int], Callable[[dict], None]]:
    """A `before_after(progress=...)` factory: a bar over the sampler steps to come."""
    def progress(total: int) -> Callable[[dict], None]:
        bar, done = ProgressBar(total, desc, stream=io.StringIO() if quiet else None), 0

        def step(_info: dict) -> None:
            nonlocal done
            done += 1
            bar.update(done)
        return step
    return progress


def _curves(history: list[StepRecord], names: Iterable[str]) -> torch.Tensor:
    return plot_curves({n: [getattr(r, n) for r in history] for n in names})


# -- Focus-N-Fix ----------------------------------------------------------------------------------------------

def _metadata(trainer) -> dict:
    meta = trainer.metadata()
    return continued_metadata(meta, trainer.continued) if trainer.continued else meta


def _start(make: Callable, net, cfg, continue_from: SavedLoRA | None, state: dict | None, out: Path):
    """make(lora), the run's trainer: with a new LoRA (None); the saved LoRA a new run continues (recorded); or,
    for a resumed run, adapters of its state's rank, then the state (out/state.pt) loaded. A saved or resumed
    rank is a trained one, read as it is, not checked as a new choice (`LoRA.attach`'s `saved`). The LoRA
    attached here is removed if the trainer cannot be built."""
    if continue_from is not None:
        lora = continue_from.attach(net)
    elif state is not None:
        # adapters of the state's rank (its tensors are loaded below); seeded, not from torch's global generator
        lora = LoRA.attach(net, cfg.targets, cfg.rank, cfg.alpha, device="cpu", saved=True,
                           generator=torch.Generator().manual_seed(cfg.seed))
    else:
        lora = None
    trainer = trainer_on(make, lora)
    if continue_from is not None:
        trainer.continues(continue_from.metadata, continue_from.source)
    if state is not None:
        try:
            trainer.load_state_dict(state)
        except ValueError as e:
            raise ValueError(f"{out / 'state.pt'}: {e}") from None
    return trainer


def run_fix(model, reward, cfg: FixConfig, out: Path, *, masks=None, state: dict | None = None,
            checkpoint_every: int = 0, model_note: str = "", quiet: bool = False,
            continue_from: SavedLoRA | None = None, notes: Iterable[str] = (),
            mask_files: Iterable[str] = (), on_first_write: Callable[[], None] | None = None) -> dict:
    """Train Focus-N-Fix, then write the LoRA, before/after grid, curves and report into `out`.
    state: a training state to resume (`load_training_state` of OUT/state.pt); continue_from: a saved LoRA to
    train further (cfg's rank/targets/alpha must be its own); notes: lines for the report (the input's notes);
    mask_files: the painted masks' files (the report names them: --resume needs the same); on_first_write: called
    once, just before the run's first file is written (the demo clears its other outputs then)."""
    t0 = time.perf_counter()
    trainer = _start(lambda lora: FixTrainer(model, reward, cfg, masks=masks, lora=lora), model.net, cfg,
                     continue_from, state, out)
    bar = ProgressBar(cfg.iterations, trainer.method, stream=io.StringIO() if quiet else None, start=trainer.step)
    first_write = _before_first_write(out, state, on_first_write)
    history, status = _consume(trainer, bar, out, checkpoint_every, first_write)
    train_seconds = time.perf_counter() - t0
    first_write()
    # saved before the images are drawn: a Ctrl-C while they sample keeps the trained LoRA
    lora_path, status, state_file = _save_trained(trainer, out, status)
    _say_images_follow(status, lora_path, quiet)
    with _lora_kept(lora_path, state_file):
        I0, I, M = trainer.before_after(progress=_step_bar("before/after images", quiet))
        finite = bool(torch.isfinite(I).all())  # before the clamp, which makes an inf 1
        # the images as the PNGs below hold them and Compare measures them: a decode's overshoot past [0,1] (the
        # tiny model's -0.12..1.07) is no change anyone sees
        I0, I = I0.clamp(0, 1), I.clamp(0, 1)
        with torch.no_grad():  # `score`, unchecked: a LoRA drawing NaN images is reported (null), not an exit 2
            r0, r1 = reward.score(I0).float(), reward.score(I).float()
        if not (finite and torch.isfinite(r1).all()):
            why = "the LoRA draws non-finite images or scores: train again with a lower lr (or --lam)"
            status = f"{status}; {why}" if status.startswith("failed") else f"failed: {why}"
        diff = (I - I0).abs().mean(1, keepdim=True)                            # [N,1,H,W], like M
        inside = outside = None
        if M is not None:  # weighed by M and 1 - M, as the region term (and Compare) weigh a soft mask
            inside, outside = _finite(weighted_mean(diff, M)), _finite(weighted_mean(diff, 1 - M))  # NaN: null
        g = slice(0, GRID_ITEMS)  # every item has its own before_K/after_K.png below
        tiles = [I0[g], I[g]] if M is None else [I0[g], mask_overlay(I0[g], M[g]), I[g],
                                                 heat_overlay(I[g], diff[g], vmax=CHANGE_SCALE)]
        grid = image_grid(upscale(torch.stack(tiles, 1).flatten(0, 1).clamp(0, 1)), nrow=len(tiles))
        save_png(grid, out / "before_after.png")
        items = []  # at full size, named by item (the order --mask takes one mask per item in)
        for k, (prompt, seed) in enumerate(trainer.items):
            before = save_png(I0[k], out / f"before_{k}.png")
            after = save_png(I[k], out / f"after_{k}.png")
            items.append({"prompt": prompt, "seed": seed, "before": str(before), "after": str(after)})
        save_png(_curves(history, ("loss", "reward", "region")), out / "curves.png")
        report = {
            "method": trainer.method, "status": status, "model": model_note or getattr(model, "name", ""),
            "reward": getattr(reward, "name", type(reward).__name__), "steps_trained": trainer.step,
            "train_seconds": round(train_seconds, 2), "config": asdict(cfg),
            "reward_before": [_finite(r) for r in r0], "reward_after": [_finite(r) for r in r1],
            "mean_reward_before": _finite(r0.mean()), "mean_reward_after": _finite(r1.mean()),
            "mean_abs_change_inside_mask": inside, "mean_abs_change_outside_mask": outside,
            "mask_coverage": None if M is None else float(mask_coverage(M).mean()),  # the share that may change
            "mask_files": [str(f) for f in mask_files], **_lineage(trainer, state, continue_from),
            "notes": [*notes, *(f"prompt {p!r}, seed {s}: no mask (its reward {cfg.mask_source} is flat); training "
                                f"never drew it, and its images show it with an empty mask"
                                for p, s in trainer.unmasked),
                      # what the node's report says too: a derived M that holds nothing (a threshold of 1, a huge
                      # dilation) or little, and a run whose images were all at --reward-target from the start
                      *(check_mask(M, "M", kinds=("full", "faint"))
                        if M is not None and cfg.lam > 0 and cfg.mask_source in ("heatmap", "saliency") else []),
                      *unchanged_notes(history, cfg.reward_target, "--reward-target",
                                       "leave it out to never stop")],
            "files": {"lora": str(lora_path), "before_after": str(out / "before_after.png"),
                      "curves": str(out / "curves.png"), **state_file},
            "items": items,
            "history": [r.as_dict() for r in history],
            "focusfix_version": __version__,
        }
        columns = (f"I0 | mask M over I0 | I (fine-tuned) | |I - I0| (blue = none, red = {CHANGE_SCALE:g} or more)"
                   if M is not None else "I0 | I (fine-tuned)")
        if len(items) > GRID_ITEMS:
            columns += f"; rows: the first {GRID_ITEMS} of the {len(items)} items"
        _write_report(out, report, columns=columns)
        return report


# -- Separate-and-Enhance -------------------------------------------------------------------------------------

def run_separate_enhance(model, cfg: SeparateEnhanceConfig, out: Path, *, state: dict | None = None,
                         checkpoint_every: int = 0, model_note: str = "", quiet: bool = False,
                         sample_steps: int = 20, cfg_scale: float = 3.0,
                         continue_from: SavedLoRA | None = None, notes: Iterable[str] = (),
                         on_first_write: Callable[[], None] | None = None) -> dict:
    """Train Separate-and-Enhance, then write the LoRA, attention maps and samples before/after, and a report.
    state, continue_from, notes, on_first_write: as in `run_fix`."""
    t0 = time.perf_counter()
    trainer = _start(lambda lora: SeparateEnhanceTrainer(model, cfg, lora=lora), model.net, cfg, continue_from,
                     state, out)
    with trainer.lora.disabled():
        A0 = trainer.eval_maps()
        S0 = _samples(model, trainer, cfg, sample_steps, cfg_scale)
    bar = ProgressBar(cfg.iterations, trainer.method, stream=io.StringIO() if quiet else None, start=trainer.step)
    first_write = _before_first_write(out, state, on_first_write)
    history, status = _consume(trainer, bar, out, checkpoint_every, first_write)
    train_seconds = time.perf_counter() - t0
    first_write()
    lora_path, status, state_file = _save_trained(trainer, out, status)
    _say_images_follow(status, lora_path, quiet)
    with _lora_kept(lora_path, state_file):
        A1 = trainer.eval_maps()
        S1 = _samples(model, trainer, cfg, sample_steps, cfg_scale)
        from .losses import enhance_loss, separate_loss

        # attention grid: per prompt a row: [before maps..., after maps...] as the node draws them, on one scale per
        # prompt (a weak word looks weak, and Enhance's stronger peaks show)
        top = maps_scale(A0, A1)
        tiles = torch.cat([maps_tiles(A0, 64, top), maps_tiles(A1, 64, top)], 1)
        save_png(image_grid(tiles.flatten(0, 1), nrow=tiles.shape[1]), out / "attention.png")
        save_png(image_grid(upscale(torch.stack([S0, S1], 1).flatten(0, 1)), nrow=2), out / "before_after.png")
        save_png(_curves(history, ("loss", "separate", "enhance", "preserve")), out / "curves.png")
        report = {
            "method": trainer.method, "status": status, "model": model_note or getattr(model, "name", ""),
            "steps_trained": trainer.step, "train_seconds": round(train_seconds, 2), "config": asdict(cfg),
            **_lineage(trainer, state, continue_from),
            "separate_before": _loss_per_prompt(separate_loss, A0, cfg.objects),
            "separate_after": _loss_per_prompt(separate_loss, A1, cfg.objects),
            "enhance_before": _loss_per_prompt(enhance_loss, A0, cfg.objects),
            "enhance_after": _loss_per_prompt(enhance_loss, A1, cfg.objects),
            "preservation": trainer.preservation, "preserve_prompts": list(cfg.preserve_prompts),
            "notes": list(notes),
            "files": {"lora": str(lora_path), "attention": str(out / "attention.png"),
                      "before_after": str(out / "before_after.png"), "curves": str(out / "curves.png"),
                      **state_file},
            "history": [r.as_dict() for r in history],
            "focusfix_version": __version__,
        }
        _write_report(out, report, columns="before | after (same seed), one row per prompt; attention.png: a row per "
                                           "prompt, each object's cross-attention map before training, then each after")
        return report


@torch.no_grad()
def _samples(model, trainer, cfg, steps: int, cfg_scale: float) -> torch.Tensor:
    """One image per prompt, seed 0, with the LoRA as it is now. -> [P,3,H,W]."""
    from .denoisers import CFGDenoiser
    from .sampler import sampling_sigmas, seed_noise

    sig = sampling_sigmas(model, steps)
    den = CFGDenoiser(model.denoise, model.encode_prompts([""]), cfg_scale)
    x = seed_noise([0] * len(cfg.prompts), trainer.latent_shape) * sig[0]
    return model.decode(sample(den, x, sig, trainer.cond)).clamp(0, 1)


def _lineage(trainer, state: dict | None, continue_from: SavedLoRA | None) -> dict:
    """Report fields for a run that goes on from another: the step a resumed run started at, and the LoRA a
    continued one (or the run a resumed one goes on with) trained further, with the steps it now holds in all."""
    out = {}
    if state is not None:
        out["resumed_at_step"] = int(state["step"])
    if continue_from is not None or trainer.continued:  # this run's, or the resumed run's (kept in its state)
        # a state saved before it kept the file's name: the first run's report names it
        out["continued_from"] = trainer.continued_from or "a saved LoRA (named in the first run's report)"
        out["lora_steps_trained"] = int(_metadata(trainer).get("focusfix_steps_trained", trainer.step))
    return out


def _finite(x: torch.Tensor) -> float | None:
    """A report number; None (JSON null) for NaN/inf, which JSON cannot hold."""
    v = float(x)
    return v if math.isfinite(v) else None


def _mean_or_na(values: list[float | None]) -> str:
    """The mean for report.md; "n/a" when a value is null (NaN maps of a run that diverged)."""
    return "n/a" if not values or None in values else f"{sum(values) / len(values):.4f}"


def _loss_per_prompt(loss: Callable[[torch.Tensor], torch.Tensor], A: torch.Tensor,
                     objects) -> list[float | None]:
    """`loss` of each prompt's own maps (A: [P,N,h,w] from `eval_maps`): the blank maps padding a prompt with
    fewer objects than the most are left out (they made its Enhance 1 and diluted its Separate)."""
    return [_finite(loss(A[i:i + 1, :len(words)])[0]) for i, words in enumerate(objects)]


# report.md's settings: the run's config minus what is empty or the same for every run (the full config and
# every value are in report.json)
_QUIET_SETTINGS = ("sigmas", "compile", "mask_space", "grad_clip", "lv_copies", "t_range", "alpha",
                   "preserve_prompts", "objects")
_REPORT_FLAGS = {"cfg_scale": "--cfg", "prompts": "--prompt", "height": "--size", "width": "--size"}


def _setting(value) -> str:
    """A config value as report.md shows it: a list without brackets, its texts quoted."""
    if isinstance(value, (list, tuple)):
        return ", ".join(repr(v) if isinstance(v, str) else str(v) for v in value)
    return str(value)


def _write_report(out: Path, report: dict, columns: str) -> None:
    atomic_write_text(json.dumps(report, indent=2, default=str), out / "report.json")
    time_note = (f"{report['train_seconds']} s in this run, which resumed at step {report['resumed_at_step']}"
                 if "resumed_at_step" in report else f"{report['train_seconds']} s")
    which = " (optimizer steps; `steps` below is the sampler's)" if "steps" in report["config"] else ""
    lines = [f"# FocusFix {report['method']} run", "", f"- status: {report['status']}",
             f"- model: {report['model']}", f"- steps trained{which}: {report['steps_trained']} ({time_note})"]
    if "continued_from" in report:
        lines.append(f"- continued from: `{report['continued_from']}` (the LoRA now holds "
                     f"{report['lora_steps_trained']} steps in all)")
    for k in ("reward", "mean_reward_before", "mean_reward_after", "mean_abs_change_inside_mask",
              "mean_abs_change_outside_mask", "mask_coverage"):
        if report.get(k) is not None:
            v = report[k]
            lines.append(f"- {k.replace('_', ' ')}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}")
    lines += [f"- note: {n}" for n in report.get("notes", [])]
    # in the words the node's report uses too: the maps' overlap, and the peaks of which Enhance raises the least
    for k, what in (("separate", "the objects' maps' overlap"), ("enhance", "1 - the weakest object's peak")):
        if f"{k}_before" in report:
            b, a = (_mean_or_na(report[f"{k}_{when}"]) for when in ("before", "after"))
            lines.append(f"- {k} loss, {what} (mean over prompts): {b} -> {a}")
    config = report["config"]
    lines += ["", "Settings:"]
    if "objects" in config:  # Separate-and-Enhance: each prompt with the words its maps are of
        lines += [f"- prompt {p!r}, objects {', '.join(o)}" for p, o in zip(config["prompts"], config["objects"])]
    # a setting whose flag has another name shows it too, so a run can be repeated from this list; DRaFT-LV's
    # copies when on (a K=1 run otherwise reads like plain DRaFT), and what preservation 'auto' chose
    quiet = set(_QUIET_SETTINGS) - ({"lv_copies"} if config.get("lv_copies") else set())
    chosen = report.get("preservation")
    lines += [f"- {k}{f' ({_REPORT_FLAGS[k]})' if k in _REPORT_FLAGS else ''}: {_setting(v)}"
              + (f" ({chosen})" if k == "preservation" and chosen not in (None, v) else "")
              for k, v in config.items() if k not in quiet
              and not (k == "prompts" and "objects" in config) and v not in ((), [], None, "")]
    lines += [f"- painted mask: `{f}`" for f in report.get("mask_files", [])]
    lines += ["", f"Grid columns: {columns}.", "", "Files (in this folder):"]
    lines += [f"- {k}: `{Path(v).name}`" for k, v in report["files"].items()]
    if report.get("items"):
        lines += ["", "Images per (prompt, seed) item, at full size (paint a mask on a before image: white where "
                  "it may change, the rest black, or erase that region to transparency; then train again with "
                  "`--mask`):"]
        lines += [f"- {k}: prompt {it['prompt']!r}, seed {it['seed']}: `{Path(it['before']).name}`, "
                  f"`{Path(it['after']).name}`" for k, it in enumerate(report["items"])]
    atomic_write_text("\n".join(lines) + "\n", out / "report.md")


# -- commands -------------------------------------------------------------------------------------------------

def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(parse_ints(s))  # the nodes' format: 0, 1, 5-7
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_lora_args(p, targets):
    p.add_argument("--model", default="tiny", help="'tiny' (the embedded model) or a TinyModel .safetensors")
    p.add_argument("--out", type=_out_folder, required=True, help="output folder")
    p.add_argument("--iterations", type=int, default=40, help="optimizer steps (default 40)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of AdamW on the LoRA (default 2e-3)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r (default 4)")
    p.add_argument("--targets", default=targets,
                   help=f"LoRA targets: to_k | attn | all_linear | regex (default {targets})")
    p.add_argument("--batch-size", type=int, default=2, help="items per optimizer step (default 2)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the run: the new LoRA's start, the item order, the training noise (Separate-and-"
                        "Enhance's, DRaFT-LV's) (default 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT/state.pt (its LoRA settings; give the same other settings, only "
                        "--iterations may change)")
    p.add_argument("--continue-from", type=Path, default=None, metavar="LORA",
                   help="train a LoRA FocusFix saved (an earlier run's lora.safetensors) further, with a fresh "
                        "optimizer; its rank and targets replace --rank/--targets")
    p.add_argument("--overwrite", action="store_true", help="replace earlier outputs in OUT")
    p.add_argument("--checkpoint-every", type=int, default=10,
                   help="save OUT/state.pt every N iterations (0 = end only; default 10)")


def build_parser() -> argparse.ArgumentParser:
    # the `focusfix` script, or `python -m focusfix_core` (whose argv[0] is __main__.py)
    prog = "focusfix" if Path(sys.argv[0]).stem == "focusfix" else "python -m focusfix_core"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--version", action="version", version=f"focusfix {__version__}")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the tiny model's small kernels run fastest on one)")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="Focus-N-Fix and Separate-and-Enhance on the embedded tiny model")
    d.add_argument("--out", type=_out_folder, default=Path("focusfix_demo"),
                   help="output folder (default focusfix_demo)")
    d.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier demo's outputs in OUT")

    f = sub.add_parser("train-fnf", help="Focus-N-Fix (or DRaFT with --lam 0 / --mask-source none)")
    _add_lora_args(f, "attn")
    f.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    f.add_argument("--seeds", type=_ints, default=(0, 1, 2, 3),
                   help="seeds of the images to fix: 0,1,2 or 0-3 (default 0-3); each (prompt, seed) is one item")
    f.add_argument("--reward", required=True, help="reward name or file")
    f.add_argument("--lam", type=float, default=1.0,
                   help="lam (λ): weight of the region term ||(1-M)(I0-I)|| (default 1; 0 = plain DRaFT)")
    f.add_argument("--reward-target", type=float, default=None,
                   help="no more push on an image once its reward reaches this (default: unbounded)")
    f.add_argument("--K", type=int, default=1, help="differentiated last sampler steps (DRaFT-K; default 1)")
    f.add_argument("--lv-copies", type=int, default=0,
                   help="DRaFT-LV re-noised copies of the last step (default 0 = off; needs --K 1)")
    f.add_argument("--steps", type=int, default=20, help="sampler steps N (default 20)")
    # --sampler: the flag's earlier name, kept so scripts that use it still run
    f.add_argument("--sampler-name", "--sampler", default="ddim", choices=SAMPLERS,
                   help="KSampler's deterministic sampler (ddim = euler; default ddim)")
    f.add_argument("--scheduler", default="normal", choices=SCHEDULERS, help="sigma schedule (default normal)")
    f.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    f.add_argument("--negative-prompt", default="", help="the negative prompt of classifier-free guidance "
                                                         "(default none)")
    f.add_argument("--mask-source", default=None, choices=MASK_SOURCES,
                   help="where the mask M (1 = may change) comes from (default heatmap, or mask with --mask); "
                        "none = plain DRaFT")
    f.add_argument("--mask", action="append", type=Path, default=[], metavar="IMAGE",
                   help="a painted mask M: white = may change, black = keep (a colour picture with white "
                        "painted on it is refused: paint the rest black); an image with transparency: the "
                        "transparent part may change, as ComfyUI's mask editor saves it. Repeat: 1 for all "
                        "items, one per seed or one per (prompt, seed) item (in the order of the run's "
                        "before_0.png, before_1.png, ...)")
    f.add_argument("--threshold-mode", default="top_percent", choices=THRESHOLD_MODES,
                   help="how the heatmap or saliency becomes M (default top_percent)")
    f.add_argument("--threshold", type=float, default=0.15,
                   help="top_percent: the share of pixels kept, in (0,1]; value: the cut-off in [0,1]; otsu: unused "
                        "(default 0.15)")
    f.add_argument("--dilation", type=int, default=2, help="grow M by this many pixels (default 2)")
    f.add_argument("--saliency-method", default="grad", choices=SALIENCY_METHODS,
                   help="--mask-source saliency: the reward's gradient (grad), averaged over noisy copies "
                        "(smoothgrad), or times the image (grad_x_input) (default grad)")
    f.add_argument("--size", type=int, default=None,
                   help="image size in pixels, a multiple of 4 up to 256, or 8 times the model's own size where "
                        "that is more (default: the model's; tiny: 32)")

    s = sub.add_parser("train-sne", help="Separate-and-Enhance on prompts 'a red circle and a blue square | circle, square'")
    _add_lora_args(s, "to_k")
    s.add_argument("--prompt", action="append", required=True, help="'prompt | object, object' (repeatable)")
    s.add_argument("--lam-sep", type=float, default=1.0,
                   help="weight of the Separate loss (maps' overlap; default 1)")
    s.add_argument("--lam-en", type=float, default=1.0,
                   help="weight of the Enhance loss (weakest map's peak; default 1)")
    s.add_argument("--lam-preserve", type=float, default=1.0,
                   help="weight of the term that keeps single-object prompts as the base model draws them "
                        "(default 1)")
    s.add_argument("--preservation", choices=PRESERVATIONS, default="auto",
                   help="keys: keep the adapted to_k outputs on single-object prompts (exact, no extra UNet pass); "
                        "outputs: x0 MSE against the base model (any --targets); auto: keys where possible "
                        "(default auto)")
    s.add_argument("--resolution", type=int, default=16,
                   help="attention maps' shorter side (default 16; the tiny model at 32 px: 16 or 8)")
    s.add_argument("--size", type=int, default=None,
                   help="image size in pixels, a multiple of 4 up to 256, or 8 times the model's own size where "
                        "that is more (default: the model's; tiny: 32)")

    c = sub.add_parser("convert-reward", help="write a safetensors copy of a reward file (never unpickles code)")
    c.add_argument("input", type=Path, help="a reward file (.pth/.pt/.bin read weights-only, or .safetensors)")
    c.add_argument("output", type=Path, help="the .safetensors file to write")
    c.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return ap


def _size(model, size):
    native = getattr(getattr(model, "cfg", None), "image_size", 512)
    if size is not None and size < 8:
        raise ValueError(f"--size must be at least 8 pixels, got {size}")
    if size is not None and size % 4:  # the tiny UNet halves the image twice, and its skips must line up again
        raise ValueError(f"--size must be a multiple of 4 (the tiny model halves the image twice), got {size}")
    # the tiny model works on pixels, its self-attention on every one: on 2 busy CPU cores, 256 px with 20 sampler
    # steps took 7.5 minutes a training step (1 GB with 2 steps); 1024 px ran past 10 minutes; 4096 px ran out of 24 GB
    most = max(MAX_SIZE, 8 * native)  # a TinyModel file drawing larger than the embedded one gets more room
    if size is not None and size > most:
        raise ValueError(f"--size must be at most {most} pixels for this model (it draws at {native} px; it computes "
                         f"on every pixel, so larger images take minutes a step and more memory than a CPU machine "
                         f"has), got {size}")
    return size or native


def _lora_settings(a, out: Path, method: str) -> tuple[SavedLoRA | None, dict, dict | None]:
    """(the LoRA --continue-from names, the rank/targets/alpha config fields, the state --resume continues):
    a resumed run keeps the LoRA settings it was saved with, a continued run takes the saved LoRA's (of this
    `method`: another method's is refused)."""
    if a.continue_from is not None and a.resume:
        raise ValueError("--resume and --continue-from exclude each other: --resume finishes the run saved in "
                         "OUT/state.pt (LoRA, optimizer, step); --continue-from starts a new run from a saved LoRA")
    if a.resume:
        path = out / "state.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--resume: {path} does not exist, so there is no run to resume in {out}: "
                                    f"start it without --resume")
        state = load_training_state(path)
        try:
            check_state_format(state)  # before its config is read: a newer layout may hold it otherwise
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        saved_method = METHOD_TRAINERS.get(state.get("method")) if isinstance(state, dict) else None  # draft: fnf
        if saved_method in COMMAND_OF_METHOD and saved_method != method:  # before the note on its settings
            raise ValueError(f"{path} is the state of a {COMMAND_OF_METHOD[saved_method]} run: resume it with "
                             f"{COMMAND_OF_METHOD[saved_method]} --resume")
        try:  # the trainer checks all of it; its LoRA settings are needed first, to build the trainer
            saved_cfg = json.loads(state["config"])
        except (TypeError, ValueError, KeyError, IndexError):
            saved_cfg = None
        if not isinstance(saved_cfg, dict):
            raise ValueError(f"{path}: the training state is invalid: expected a dict whose 'config' holds the "
                             f"run's settings as a JSON object")
        saved_kind = state.get("method")
        if method == "focus-n-fix" and saved_kind in ("draft", "focus-n-fix"):  # train-fnf runs both
            now = "draft" if a.lam == 0 or a.mask_source == "none" else "focus-n-fix"
            if saved_kind != now:  # the trainer would say "method 'draft', not 'focus-n-fix'": no flag named
                was = "plain DRaFT" if saved_kind == "draft" else "Focus-N-Fix"
                raise ValueError(f"{path} is the state of a {was} run (--lam {saved_cfg.get('lam')} --mask-source "
                                 f"{saved_cfg.get('mask_source')}): resume it with those")
        kw = {k: saved_cfg[k] for k in ("rank", "targets", "alpha") if k in saved_cfg}
        if isinstance(kw.get("targets"), list):
            kw["targets"] = tuple(kw["targets"])
        targets, rank, alpha = kw.get("targets", ""), kw.get("rank", 1), kw.get("alpha")
        if not (type(rank) is int and rank >= 1 and (alpha is None or type(alpha) in (int, float))
                and (isinstance(targets, str) or isinstance(targets, tuple) and all(isinstance(t, str) for t in targets))):
            raise ValueError(f"{path}: the training state is invalid: its LoRA settings rank {rank!r}, targets "
                             f"{targets!r}, alpha {alpha!r} are not an int >= 1, a target name (or names) and a "
                             f"number (or null)")
        if rank > MAX_RANK:  # the config would name --rank, which a resumed run does not use
            raise ValueError(f"{path}: the run's rank {rank} is above {MAX_RANK}, the most this FocusFix trains "
                             f"(an earlier version started it), so it cannot be resumed: start a new run with "
                             f"--rank {MAX_RANK} or lower")
        if (a.rank, a.targets) != (rank, targets):  # as --continue-from says it: the run's own are kept
            print(f"resuming {path}: rank {rank}, targets {targets} (--rank/--targets not used)", file=sys.stderr)
        return None, kw, state
    if a.continue_from is None:
        return None, {"rank": a.rank, "targets": a.targets}, None
    if a.continue_from.is_dir():
        raise ValueError(f"--continue-from {a.continue_from} is a folder: give the LoRA file in it (a run's "
                         f"lora.safetensors)")
    if not a.continue_from.is_file():
        raise FileNotFoundError(f"--continue-from {a.continue_from}: no such file (give a LoRA FocusFix saved)")
    if a.continue_from.name == "state.pt" or a.continue_from.suffix.lower() not in (".safetensors", ".sft"):
        raise ValueError(f"--continue-from {a.continue_from}: give a LoRA FocusFix saved (a .safetensors file); a "
                         f"run's state.pt is continued with --resume and that run's --out")
    _check_not_an_output(a.continue_from, out, "--continue-from")
    saved = replace(read_focusfix_lora(a.continue_from), source=str(a.continue_from))  # as given: the report's
    if saved.rank > MAX_RANK:  # the config would name --rank, which this run does not use
        raise ValueError(f"--continue-from {a.continue_from}: its rank {saved.rank} is above {MAX_RANK}, the most "
                         f"FocusFix trains: start a new LoRA with --rank {MAX_RANK} or lower")
    own = COMMAND_OF_METHOD.get(METHOD_TRAINERS.get(saved.method), "train-sne")
    check_continued_method(saved.method, method, f"--continue-from {a.continue_from}",
                           f"continue it with {own}, or start a new LoRA (in ComfyUI, apply it to the MODEL with "
                           f"FocusFix Apply LoRA and train a new one there)")
    targets = saved.config_targets
    note = f"continuing {a.continue_from}: rank {saved.rank}, targets {targets}"
    if (a.rank, a.targets) != (saved.rank, targets):
        note += " (--rank/--targets not used)"
    print(note, file=sys.stderr)
    return saved, {"rank": saved.rank, "targets": targets, "alpha": saved.alpha}, None


def _painted_masks(a, size: int, notes: list[str]) -> tuple[str, torch.Tensor | None]:
    """(mask_source, masks [N,1,H,W] or None) from --mask-source and --mask: the images, resized to the run's size
    (`notes` gets what the report should say about them)."""
    source = a.mask_source or ("mask" if a.mask else "heatmap")
    if a.mask and source != "mask":
        raise ValueError(f"--mask gives a painted M, but --mask-source is {source!r}: drop --mask-source (or "
                         f"give --mask-source mask)")
    if source == "mask" and not a.mask:
        raise ValueError("--mask-source mask needs --mask IMAGE (white = may change); paint it over the "
                         "before_0.png (1, 2, ...) an earlier run wrote")
    if a.lam == 0 and source != "none":  # the region term is off: no M holds anything
        which = "--mask" if a.mask else f"--mask-source {source}"
        notes.append(f"--lam 0: plain DRaFT, the whole image may change; M ({which}) is not used in training, only "
                     f"in the report's change inside and outside it")
    for path in a.mask:  # this run writes (and with --overwrite removes) its outputs there: the mask would go
        if is_output(path, a.out):
            raise ValueError(f"--mask {path} is one of the files this run writes into --out {a.out} (each item's "
                             f"before_K.png and after_K.png): the run would overwrite or remove it. Save the "
                             f"painted mask under another name, e.g. {path.with_name('mask_' + path.name)}")
    masks = []
    for path in a.mask:
        M, note = fit_mask(load_mask_image(path)[None, None], (size, size), f"--mask {path}")
        if note:
            print(note, file=sys.stderr)
        top, low = float(M.amax()), float(M.amin())
        kind = mask_kind(low, top)  # the trainer's rule (check_mask), in the command line's words
        if a.lam > 0 and kind == "empty":
            raise ValueError(f"--mask {path} marks nothing (every pixel is black): nothing may change. "
                             f"Paint the region to fix white (an inverted mask?), or give --lam 0 for plain DRaFT")
        if a.lam > 0 and kind == "full":
            notes.append(f"--mask {path} is full (every pixel white): nothing is held, so Focus-N-Fix becomes plain "
                         f"DRaFT (an inverted mask? white = may change)")
        elif a.lam > 0 and kind == "faint":
            notes.append(f"--mask {path} is faint (at most {top:.3g} white): even its strongest pixel is held "
                         f"{1 - top:.0%} to I0, so the region changes only in part (paint it white to let it change "
                         f"fully)")
        masks.append(M)  # [1,1,H,W]
    return source, torch.cat(masks) if masks else None


def _check_prompts(model, prompts: Iterable[str], flag: str = "--prompt") -> None:
    """Refuse a word the (tiny) model cannot read: it would be trained on as an unknown token, silently; and a
    line break, which the nodes read as two prompts (here it would be one)."""
    for p in prompts:
        if "\n" in p.strip() or "\r" in p.strip():
            raise ValueError(f"{flag} {p!r} holds a line break: give each prompt its own {flag}")
    tokenizer = getattr(model, "tokenizer", None)
    if hasattr(tokenizer, "check"):
        for p in prompts:
            tokenizer.check(p, flag)


def cmd_train_fnf(a) -> dict:
    out = prepare_out(a.out, a.overwrite, a.resume)
    stamp = file_stamp(out / "state.pt") if a.resume else None  # before it is read
    saved, lora_kw, state = _lora_settings(a, out, "focus-n-fix")
    _check_not_an_output(a.model, out, "--model")
    _check_not_an_output(a.reward, out, "--reward")
    model, note = load_model(a.model)
    _check_prompts(model, a.prompt)
    if a.negative_prompt:
        _check_prompts(model, [a.negative_prompt], "--negative-prompt")
    reward = load_reward_spec(a.reward)
    size = _size(model, a.size)
    notes = [*repeated_seeds_note(a.seeds, "--seeds"), *repeated_prompts_note(a.prompt, "--prompt"),
             *batch_note(a.batch_size, len([p for p in a.prompt if p.strip()]) * len(a.seeds), "--batch-size")]
    mask_source, masks = _painted_masks(a, size, notes)
    cfg = FixConfig(prompts=tuple(a.prompt), seeds=a.seeds, iterations=a.iterations, lr=a.lr, **lora_kw,
                    batch_size=a.batch_size, seed=a.seed, lam=a.lam, reward_target=a.reward_target, K=a.K,
                    lv_copies=a.lv_copies,
                    steps=a.steps, sampler_name=a.sampler_name, scheduler=a.scheduler, cfg_scale=a.cfg,
                    negative_prompt=a.negative_prompt, mask_source=mask_source, threshold_mode=a.threshold_mode,
                    threshold=a.threshold, dilation=a.dilation, saliency_method=a.saliency_method,
                    height=size, width=size)
    for line in notes:  # once the settings are known to be valid
        print(f"note: {line}", file=sys.stderr)
    with claim_out(out, a.overwrite, a.resume, state_read=stamp):
        return run_fix(model, reward, cfg, out, masks=masks, state=state, checkpoint_every=a.checkpoint_every,
                       model_note=note, continue_from=saved, notes=notes, mask_files=a.mask)


def cmd_train_sne(a) -> dict:
    out = prepare_out(a.out, a.overwrite, a.resume)
    stamp = file_stamp(out / "state.pt") if a.resume else None  # before it is read
    saved, lora_kw, state = _lora_settings(a, out, "separate-and-enhance")
    _check_not_an_output(a.model, out, "--model")
    model, note = load_model(a.model)
    prompts, objects = zip(*(split_objects_prompt(p) for p in a.prompt))
    _check_prompts(model, prompts)
    notes = repeated_prompts_note(prompts, "--prompt", objects=objects)
    size = _size(model, a.size)
    cfg = SeparateEnhanceConfig(prompts=prompts, objects=objects, iterations=a.iterations, lr=a.lr, **lora_kw,
                                batch_size=a.batch_size, seed=a.seed, lam_sep=a.lam_sep,
                                lam_en=a.lam_en, lam_preserve=a.lam_preserve, preservation=a.preservation,
                                resolution=a.resolution, height=size, width=size)
    for line in notes:  # once the settings are known to be valid
        print(f"note: {line}", file=sys.stderr)
    with claim_out(out, a.overwrite, a.resume, state_read=stamp):
        return run_separate_enhance(model, cfg, out, state=state, checkpoint_every=a.checkpoint_every,
                                    model_note=note, continue_from=saved, notes=notes)


def cmd_demo(a) -> dict:
    from .demo import run_demo

    return run_demo(a.out, quick=a.quick, overwrite=a.overwrite)


def cmd_convert_reward(a) -> dict:
    from .rewards.loading import convert_reward

    if a.output.suffix.lower() != ".safetensors":  # any other name would be read back as a pickle
        raise ValueError(f"output {a.output} must end in .safetensors")
    if a.output.is_dir():
        raise FileExistsError(f"output {a.output} is a folder: give the file to write, e.g. "
                              f"{a.output / 'reward.safetensors'}")
    if a.output.exists() and not a.overwrite:
        raise FileExistsError(f"{a.output} exists: pass --overwrite to replace it")
    path = convert_reward(a.input, a.output, overwrite=a.overwrite)
    return {"output": str(path)}


COMMANDS = {"demo": cmd_demo, "train-fnf": cmd_train_fnf, "train-sne": cmd_train_sne,
            "convert-reward": cmd_convert_reward}


_CONFIG_FLAGS = {k: v for k, v in _REPORT_FLAGS.items() if v != "--size"}  # fields whose flag has another name
# (width and height become --size in messages by their own rule, in _as_flags)
# one-word config fields: a message starting with one names the setting ("lr must be > 0"); other one-word
# starts are English ("the", "model ...")
_ONE_WORD_FIELDS = {f.name for c in (FixConfig, SeparateEnhanceConfig) for f in fields(c) if "_" not in f.name}


def _as_flags(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """A config's error in the command line's words: 'batch_size must be ...' -> '--batch-size must be ...'."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = {**{a.dest: a.option_strings[0] for a in sub._actions if a.option_strings}, **_CONFIG_FLAGS}
    # settings named inside a message: a resume refused for other settings ("other settings: batch_size 1 (now
    # 2); lam ..."), the advice after running out of memory ("lower batch_size (now 2) or K (now 1)") or on an
    # empty mask ("paint the mask (mask_source mask), or set lam 0"). Underscored names anywhere (no English word
    # has one); a one-word name only in those places, where it is no English word either. Never inside quotes
    # (a prompt, a file name: 'a chess set and a pawn') or a path
    def swap(m: re.Match) -> str:
        return flags.get(m[0], m[0])

    def named(text: str) -> str:
        if "--size" in flags.values():  # the command line's one square size: "width and height (now 64x64)"
            # a resume refused for another size lists "height 16 (now 32)" and, later, "width 16 (now 32)"
            h = re.search(r"(?<![\w/\\.'\"-])height (\d+) \(now (\d+)\)", text)
            w = h and re.search(rf"(?:; )?(?<![\w/\\.'\"-])width {h[1]} \(now {h[2]}\)", text)
            if w:
                text = (text[:w.start()] + text[w.end():]).replace(h[0], f"--size {h[1]} (now {h[2]})", 1)
            text = re.sub(r"(?<![\w/\\.'\"-])width and height \(now (\d+)x\1\)", r"--size (now \1)", text)
            text = re.sub(r"(?<![\w/\\.'\"-])width and height(?![\w/\\.'\"-])", "--size", text)
        # a setting given with its value, "use preservation='outputs'", is that flag with the value
        text = re.sub(r"(?<![\w/\\.'\"-])([a-z]+(?:_[a-z0-9]+)*)='([\w.-]+)'",
                      lambda m: f"{flags[m[1]]} {m[2]}" if m[1] in flags else m[0], text)
        text = re.sub(r"(?<![\w/\\.'\"-])[a-z]+(?:_[a-z0-9]+)+(?![\w/\\.'\"-])", swap, text)
        return re.sub(r"(?<![\w/\\.'\"-])[A-Za-z]+(?= \(now )"
                      r"|(?:(?<=other settings: )|(?<=\); )|(?<=\bset ))[A-Za-z]+(?= )", swap, text)
    quoted = r"(?<![\w=])(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")(?!\w)"  # as repr() quotes them
    parts = re.split(f"({quoted})", message)
    message = "".join(part if i % 2 else named(part) for i, part in enumerate(parts))
    field = re.match(r"[A-Za-z]+(?:_[a-z0-9]+)*\b", message)
    if not field or field[0] not in flags or ("_" not in field[0] and field[0] not in _ONE_WORD_FIELDS):
        return message
    return flags[field[0]] + message[field.end():]


def _threads_first(argv: list[str]) -> list[str]:
    """--threads given after the command (where argparse would call it unrecognized) moved before it."""
    out, moved, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--threads" and i + 1 < len(argv):
            moved += argv[i:i + 2]
            i += 2
            continue
        (moved if argv[i].startswith("--threads=") else out).append(argv[i])
        i += 1
    return moved + out


def _kept_files(a) -> dict[str, tuple | None]:
    """The files a Ctrl-C outside training may leave (a run's LoRA and state.pt, the demo's LoRAs), by name
    relative to --out, with their `file_stamp`: compared before and after, they say what this run wrote."""
    out = getattr(a, "out", None)
    if out is None:  # convert-reward writes whole files or none
        return {}
    names = (("focus_n_fix/lora.safetensors", "separate_enhance/lora.safetensors") if a.command == "demo" else
             ("lora.safetensors", "state.pt"))
    stamps = {}
    for n in names:
        try:
            stamps[n] = file_stamp(out / n)
        except OSError:  # --out is a file, or unreadable: refused by name when the command runs
            stamps[n] = None
    return stamps


def _interrupted_note(a, before: dict[str, tuple | None]) -> str:
    """What a Ctrl-C outside training left: what this run wrote (`_kept_files` changed since `before`), or
    nothing (a stop while the model loaded or the base images sampled, or a second Ctrl-C before the save)."""
    out = getattr(a, "out", None)
    written = [n for n, stamp in _kept_files(a).items() if stamp is not None and stamp != before.get(n)]
    if a.command == "demo":
        if not written:
            return f"interrupted: the demo stopped before it wrote a LoRA into {out}"
        return (f"interrupted: the demo stopped; {out} keeps what it finished ({', '.join(written)}; run it again "
                f"with --overwrite to start over)")
    if not written:
        return "interrupted: this run wrote nothing" + (f" into {out}" if out is not None else "")
    return (f"interrupted: {out} keeps what was finished ({', '.join(written)})"
            + ("; --resume continues it" if "state.pt" in written else ""))


def main(argv=None) -> int:
    """Run the command line on `argv` (sys.argv[1:] when None); the exit status: 0 done, 1 failed mid-run,
    2 bad input, 130 interrupted."""
    for stream in (sys.stdout, sys.stderr):  # a prompt or λ on a Windows console or pipe (cp1252) must not crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(_threads_first(sys.argv[1:] if argv is None else list(argv)))
    if args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if getattr(args, "checkpoint_every", 0) < 0:
        print(f"error: --checkpoint-every must be >= 0 (0 = at the end only), got {args.checkpoint_every}",
              file=sys.stderr)
        return 2
    # a SIGTERM (kill, timeout, a job scheduler's stop) ends training as Ctrl-C does: the steps done are written
    term = getattr(signal, "SIGTERM", None)
    previous = (signal.signal(term, stop_as_interrupt)
                if term is not None and threading.current_thread() is threading.main_thread() else None)
    before = _kept_files(args)
    try:
        result = COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {_as_flags(str(e), parser, args.command)}", file=sys.stderr)
        return 2
    except OSError as e:  # an output path that cannot be written: no permission, a file where a folder goes
        print(f"error: cannot write {e.filename or 'the outputs'}: {e.strerror or e} (check --out / the output "
              f"path)", file=sys.stderr)
        return 2
    # out of memory met here is before training (the base images): in it or after it, _consume and _lora_kept
    # turn it into a failed status or a RunFailed
    except (RunFailed, torch.OutOfMemoryError) as e:
        print(f"error: {_as_flags(str(e), parser, args.command)}", file=sys.stderr)
        return 1
    except NothingTrained as e:
        print(str(e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before training, or after it (a Ctrl-C during it ends training, writes the outputs)
        print(_interrupted_note(args, before), file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(term, previous)
    files = result.get("files") or {k: v for k, v in result.items() if k == "output"}
    status = result.get("status", "done")
    if status != "done":  # --resume keeps every setting but the iterations: no cure for a failure
        resumable = "state" in files and status.startswith("interrupted")
        print(f"note: {_as_flags(status, parser, args.command)}" + (" (--resume continues it)" if resumable else ""),
              file=sys.stderr)
    for k, v in files.items():
        print(f"{k}: {v}")
    # a script tells a partial run from a full one: 130 after Ctrl-C (as a shell does), 1 after a failure
    return 0 if status == "done" else 130 if status.startswith("interrupted") else 1
