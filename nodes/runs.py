"""The training runs behind the two training nodes: session, LoRA, progress/cancel, checkpoints, cleanup.

The trainer attaches its seeded LoRA (and removes it itself if its setup fails), or the run attaches the LoRA
it continues (`continue_from`); the run removes the hooks in `finally` whatever a step raises; a cancel
(`InterruptProcessingException`) propagates with nothing returned. A loss that turns NaN/inf after a finished step
ends training early with the LoRA of its last good step (`stopped` says why), as the command line does.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..focusfix_core.io import NameTakenError
from ..focusfix_core.lora import continued_metadata
from ..focusfix_core.trainers import (FixConfig, FixTrainer, NonFiniteLossError, SeparateEnhanceConfig,
                                      SeparateEnhanceTrainer, trainer_on)
from .adapters import ComfyDiffusionModel, LoraData, release_idle_models, reward_on, training_session
from .common import check_cancel, log, run_with_progress, sampling_progress
from .lora_nodes import layers_applied, lora_path, save_lora_data, write_lora

__all__ = ["FixRun", "SeparateEnhanceRun", "run_focus_n_fix", "run_separate_enhance"]


@dataclass(frozen=True)
class FixRun:
    lora: LoraData
    history: list
    I0: torch.Tensor             # [N,3,H,W] base images of every (prompt, seed) item
    I: torch.Tensor              # [N,3,H,W] the same items with the trained LoRA
    M: torch.Tensor | None       # [N,1,H,W] masks used (None: plain DRaFT)
    checkpoint: Path | None      # where the run's checkpoints went (None: off)
    checkpoint_error: str | None = None  # why the last checkpoint write failed (None: it did not)
    unmasked: tuple[tuple[str, int], ...] = ()  # items training never met whose derived mask is empty
    stopped: str | None = None   # why training ended before its last iteration (None: it did not)


@dataclass(frozen=True)
class SeparateEnhanceRun:
    lora: LoraData
    history: list
    A_before: torch.Tensor       # [P,n_objects,h,w] attention maps before training
    A_after: torch.Tensor        # the same after
    checkpoint: Path | None      # where the run's checkpoints went (None: off)
    preserve_prompts: tuple[str, ...] = ()  # the preservation term's single-object prompts
    checkpoint_error: str | None = None  # why the last checkpoint write failed (None: it did not)
    stopped: str | None = None   # why training ended before its last iteration (None: it did not)


def _lora_data(trainer, continue_from: LoraData | None) -> LoraData:
    """The trainer's LoRA as data; a continued LoRA's metadata counts every step it was trained and keeps the
    settings of the run it continued (focusfix_previous_config)."""
    data = LoraData.from_trainer(trainer)
    if continue_from is None:
        return data
    return replace(data, metadata=continued_metadata(data.metadata, continue_from.metadata))


def _check_not_applied(dm: ComfyDiffusionModel, continue_from: LoraData | None) -> None:
    """Refuse a `continue_from` LoRA the MODEL already carries (Load LoRA or Apply LoRA of it upstream): the run
    attaches it itself, on top of the applied one (twice at strength 1, cancelled at -1), so neither the before
    images nor training would start from the base MODEL."""
    if continue_from is not None and (n := layers_applied(dm.patcher, continue_from)):
        raise ValueError(f"continue_from: the MODEL already carries this LoRA ({n} of its layers, applied by a Load "
                         f"LoRA or Apply LoRA before this node): the run adds continue_from itself on top of it, so "
                         f"the before images would not be the base MODEL's. Connect the MODEL without it (the one "
                         f"before that LoRA node)")


def _trainer(make, continue_from: LoraData | None, dm: ComfyDiffusionModel):
    """make(lora) with the continued LoRA attached to the MODEL (None: the trainer attaches a new one); the
    attached LoRA is removed if the trainer cannot be built."""
    trainer = trainer_on(make, continue_from.attach(dm.net, dm.family) if continue_from is not None else None)
    if continue_from is not None:
        trainer.continues(continue_from.metadata)  # draws past the first run's (not a replay of its batches)
    return trainer


def checkpoint_path(every: int, name: str) -> Path | None:
    """The file a run's checkpoints go to (None when off): `name` in the loras folder, or `name_00001...` when
    a file of that name exists (another run's checkpoint, a LoRA the artist saved): a run replaces only its own
    checkpoint. Resolved before training starts, so a bad name fails before any step is lost."""
    if every <= 0:
        return None
    try:
        return lora_path(name)
    except ValueError as e:
        raise ValueError(f"checkpoint_name: {e}") from None


class _Checkpointer:
    """on_record callback: atomically write the LoRA (with `graph`, the metadata of the graph running) every
    `every` steps and after the last of `total` (so a cancel while the before/after images are drawn keeps the
    whole run, and a `total` that is no multiple of `every` loses no steps). The first write claims `name` in
    the loras folder without replacing a file (a name another save took since `checkpoint_path` looked moves it
    on to the next free name); later writes replace its own.
    A write that fails (disk full, permissions) is logged and kept in `error`, and training goes on: a checkpoint
    is insurance, and losing the run to it would lose more than the checkpoint."""

    def __init__(self, trainer, every: int, total: int, path: Path | None, name: str,
                 continue_from: LoraData | None = None, graph: dict[str, str] | None = None):
        self.trainer, self.every, self.total, self.path, self.name = trainer, every, total, path, name
        self.continue_from, self.graph, self.written, self.error = continue_from, graph, None, None
        self.steps_written = 0  # the trained steps the checkpoint holds

    def __call__(self, rec) -> None:
        if self.path is None or ((rec.step + 1) % self.every and rec.step + 1 != self.total):
            return
        self.write(rec.step + 1)

    def write(self, steps: int, stopping: bool = False) -> None:
        """Write the LoRA as it is after `steps` trained steps (nothing when off, or already written then);
        `stopping`: training ends early, after this step."""
        if self.path is None or steps == self.steps_written:
            return
        data = _lora_data(self.trainer, self.continue_from)
        try:
            if self.written is None:
                try:
                    self.written = write_lora(data, self.path, self.graph, overwrite=False)
                except NameTakenError:
                    self.written = save_lora_data(data, self.name, extra_metadata=self.graph)
                self.path = self.written
            else:
                write_lora(data, self.path, self.graph)
        except OSError as e:
            self.error = f"the checkpoint after step {steps} was not written ({e})"
            log.warning(f"{self.error}; {'training had stopped' if stopping else 'training goes on'}")
            return
        self.error, self.steps_written = None, steps
        log.info(f"checkpoint after step {steps}: {self.path}")


def _train(trainer, total: int, save: _Checkpointer, preview=None) -> tuple[list, str | None]:
    """The trainer's steps under ComfyUI's progress bar: (their records, why training stopped early or None).
    A loss or gradient that turns NaN/inf after a finished step ends training with the LoRA of the last good step
    (the trainer put it back): the outputs are drawn with it and the checkpoint holds it, where an error would
    lose every step. At the first step there is nothing to keep: the error is raised."""
    try:
        return run_with_progress(trainer, total, preview, save), None
    except NonFiniteLossError as e:
        if trainer.step == 0:
            raise
        log.warning(f"training stopped early: {e}")
        save.write(trainer.step, stopping=True)
        return list(trainer.history), str(e)


def _release(dm: ComfyDiffusionModel) -> None:
    """The prompts are encoded: free the device of every model the run does not use."""
    n = release_idle_models(dm)
    if n:
        log.info(f"unloaded {n} idle model(s) (text encoders, other checkpoints) for the training run")


def run_focus_n_fix(dm: ComfyDiffusionModel, reward, make_cfg, *, masks=None, cond=None, uncond=None,
                    checkpoint_every: int = 0, checkpoint_name: str = "",
                    continue_from: LoraData | None = None, graph: dict[str, str] | None = None) -> FixRun:
    """Train Focus-N-Fix on ComfyUI models. `make_cfg()` builds the FixConfig (before anything is loaded, so a
    config error costs nothing); the prompts are encoded before the session loads the MODEL (`encode_first`);
    cond/uncond: Cond or callables building them (inside the session); continue_from:
    a LoRA to train further instead of a new one (I0 and M stay the base MODEL's)."""
    ckpt = checkpoint_path(checkpoint_every, checkpoint_name)
    cfg: FixConfig = make_cfg()
    _check_not_applied(dm, continue_from)
    dm.encode_first(([] if cond is not None else list(cfg.prompts)) + ([] if uncond is not None else [cfg.negative_prompt]))
    with training_session(dm, [reward]), reward_on(reward) as (r,):  # on the device for the run, then back
        cond, uncond = (c() if callable(c) else c for c in (cond, uncond))
        trainer = _trainer(lambda lora: FixTrainer(dm, r, cfg, masks=masks, cond=cond, uncond=uncond, lora=lora,
                                                   on_sampler_step=check_cancel), continue_from, dm)
        try:
            _release(dm)
            save = _Checkpointer(trainer, checkpoint_every, cfg.iterations, ckpt, checkpoint_name, continue_from,
                                 graph)
            history, stopped = _train(trainer, cfg.iterations, save, lambda: trainer.last_images)
            I0, I, M = trainer.before_after(progress=lambda total: sampling_progress(dm.patcher, total))
            return FixRun(_lora_data(trainer, continue_from), history, I0, I, M, save.written, save.error,
                          tuple(trainer.unmasked), stopped)
        finally:
            trainer.lora.remove()
            trainer.release()  # the session's end then gives the page-locked copies back


def run_separate_enhance(dm: ComfyDiffusionModel, make_cfg, *, checkpoint_every: int = 0,
                         checkpoint_name: str = "", continue_from: LoraData | None = None,
                         graph: dict[str, str] | None = None) -> SeparateEnhanceRun:
    """Train Separate-and-Enhance on ComfyUI models; maps before/after at the config's seed (before: with the
    LoRA it continues, if any; preservation still holds the base model's prompts)."""
    ckpt = checkpoint_path(checkpoint_every, checkpoint_name)
    cfg: SeparateEnhanceConfig = make_cfg()
    _check_not_applied(dm, continue_from)
    for p, o in zip(cfg.prompts, cfg.objects):  # a missing word fails here, before anything is loaded
        try:
            dm.token_indices(p, list(o))
        except ValueError as e:
            raise ValueError(f"prompts line {p!r}: {e}") from None
    dm.encode_first([*cfg.prompts, *cfg.preserve_prompts])
    with training_session(dm):
        trainer = _trainer(lambda lora: SeparateEnhanceTrainer(dm, cfg, lora=lora), continue_from, dm)
        try:
            _release(dm)
            before = trainer.eval_maps(cfg.seed)
            save = _Checkpointer(trainer, checkpoint_every, cfg.iterations, ckpt, checkpoint_name, continue_from,
                                 graph)
            history, stopped = _train(trainer, cfg.iterations, save)
            return SeparateEnhanceRun(_lora_data(trainer, continue_from), history, before,
                                      trainer.eval_maps(cfg.seed), save.written, cfg.preserve_prompts, save.error,
                                      stopped)
        finally:
            trainer.lora.remove()
