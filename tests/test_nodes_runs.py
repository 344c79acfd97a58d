"""Run bookkeeping without ComfyUI (nodes/runs.py): when the Train nodes' checkpoints are written, which file they
go to when another save takes the name, and what each write holds. The loras folder is a stand-in
`folder_paths` (tests/comfy_stubs.py); the trainer is a stand-in holding a real core LoRA whose weights are set
to the step number, so each checkpoint file says which step it holds."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from comfy_stubs import folder_paths_stub
from pack_loader import load_pack
from safetensors import safe_open

PACK = load_pack()
RUNS = PACK.nodes.runs
CORE_LORA = sys.modules[f"{PACK.__name__}.focusfix_core.lora"]


class _Trainer:
    """What `_Checkpointer` reads of a trainer: its LoRA (weights = the last step done) and metadata."""

    method = "focus-n-fix"

    def __init__(self):
        net = torch.nn.Module()
        net.attn2 = torch.nn.Module()
        net.attn2.to_k = torch.nn.Linear(4, 4)
        self.lora = CORE_LORA.LoRA.attach(net, "to_k", rank=2, alpha=2)
        self.model = SimpleNamespace(family=None)
        self.steps = 0

    def metadata(self):
        return {"focusfix_steps_trained": str(self.steps)}

    def step(self, n):
        self.steps = n
        with torch.no_grad():
            for a in self.lora.adapters:
                a.up.fill_(float(n))


def _held_step(path):
    """The step a checkpoint file holds (its up weights' value), None when there is no file."""
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        (key,) = [k for k in f.keys() if k.endswith(".lora_up.weight")]
        return float(f.get_tensor(key).flatten()[0])


@pytest.fixture
def loras(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths_stub(tmp_path))
    return tmp_path


def _run(save, trainer, total):
    """Feed `total` step records to the checkpointer; the step each write left in the file, after each step."""
    held = []
    for i in range(total):
        trainer.step(i + 1)
        save(SimpleNamespace(step=i))
        held.append(_held_step(save.path) if save.path is not None else None)
    return held


@pytest.mark.parametrize("every, total, want", [
    (3, 7, [None, None, 3, 3, 3, 6, 7]),   # every 3 steps and after the last, which is no multiple of 3
    (2, 4, [None, 2, 2, 4]),
    (5, 3, [None, None, 3]),               # every > iterations: once, after the last
    (1, 3, [1, 2, 3]),
])
def test_checkpoints_are_written_every_n_steps_and_after_the_last(loras, every, total, want):
    # a cancel keeps the last checkpoint: it must hold the steps the report promises ("every N and after the last")
    trainer = _Trainer()
    path = RUNS.checkpoint_path(every, "ckpt/fix")
    save = RUNS._Checkpointer(trainer, every, total, path, "ckpt/fix")
    assert _run(save, trainer, total) == want
    assert save.written == loras / "ckpt" / "fix.safetensors" and save.error is None


def test_checkpoint_path_is_none_when_checkpoints_are_off_and_names_the_input_for_a_bad_name(loras):
    assert RUNS.checkpoint_path(0, "ckpt/fix") is None and RUNS.checkpoint_path(-1, "ckpt/fix") is None
    assert RUNS.checkpoint_path(1, "ckpt/fix") == loras / "ckpt" / "fix.safetensors"
    with pytest.raises(ValueError, match=r"^checkpoint_name: filename '\.\./escape' must stay inside"):
        RUNS.checkpoint_path(1, "../escape")


def test_a_checkpoint_name_another_save_takes_after_the_look_keeps_its_file(loras):
    # a second ComfyUI (or Save LoRA) writes the name checkpoint_path found free before the first checkpoint lands:
    # that file is kept byte for byte, and every checkpoint of the run goes to the next free name instead
    trainer = _Trainer()
    path = RUNS.checkpoint_path(1, "ckpt/fix")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"another save's file")
    save = RUNS._Checkpointer(trainer, 1, 3, path, "ckpt/fix")
    held = _run(save, trainer, 3)
    assert path.read_bytes() == b"another save's file"
    assert save.written == save.path == loras / "ckpt" / "fix_00001.safetensors"
    assert held == [1, 2, 3] and save.error is None
    assert sorted(p.name for p in (loras / "ckpt").iterdir()) == ["fix.safetensors", "fix_00001.safetensors"]


def test_every_checkpoint_write_embeds_the_graph_that_made_it(loras):
    # ComfyUI's saves embed the workflow; a checkpoint replaced later in the run must keep it too
    trainer = _Trainer()
    graph = {"prompt": '{"1": {}}', "workflow": '{"nodes": []}'}
    save = RUNS._Checkpointer(trainer, 1, 3, RUNS.checkpoint_path(1, "fix"), "fix", graph=graph)
    _run(save, trainer, 3)
    with safe_open(str(save.written), "pt") as f:
        meta = f.metadata()
    assert meta["prompt"] == graph["prompt"] and meta["workflow"] == graph["workflow"]
    assert meta["focusfix_steps_trained"] == "3"


def test_a_failed_checkpoint_write_is_kept_only_until_a_later_one_succeeds(loras, monkeypatch):
    # the report's checkpoint line names a failed write; one that worked after it must not be reported as failed
    real, calls = RUNS.write_lora, []

    def disk_full_on_second_write(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(RUNS, "write_lora", disk_full_on_second_write)
    trainer = _Trainer()
    save = RUNS._Checkpointer(trainer, 1, 3, RUNS.checkpoint_path(1, "fix"), "fix")
    trainer.step(1), save(SimpleNamespace(step=0))
    trainer.step(2), save(SimpleNamespace(step=1))
    assert save.error.startswith("the checkpoint after step 2 was not written") and _held_step(save.path) == 1
    trainer.step(3), save(SimpleNamespace(step=2))
    assert save.error is None and _held_step(save.path) == 3


def test_a_continued_run_trains_the_saved_lora_and_tells_the_trainer_how_far_it_got():
    # the trainer gets the saved weights on the MODEL and the saved metadata (steps trained), so its draws follow on
    # from the first run's instead of replaying its batches; a new run gets no LoRA and nothing to continue
    first = _Trainer()
    first.step(3)
    data = PACK.nodes.adapters.LoraData.from_trainer(first)
    data = PACK.nodes.adapters.LoraData(data.tensors, {**data.metadata, "focusfix_steps_trained": "3"}, data.rank,
                                        data.alpha, data.targets, data.method)
    net = torch.nn.Module()
    net.attn2 = torch.nn.Module()
    net.attn2.to_k = torch.nn.Linear(4, 4)
    told = []

    class Made:
        def __init__(self, lora):
            self.lora = lora

        def continues(self, metadata):
            told.append(metadata)

    trainer = RUNS._trainer(Made, data, SimpleNamespace(net=net, family=None))
    try:
        assert told == [data.metadata]
        assert all(float(a.up.detach().flatten()[0]) == 3.0 for a in trainer.lora.adapters)
    finally:
        trainer.lora.remove()
    told.clear()
    assert RUNS._trainer(Made, None, SimpleNamespace(net=net, family=None)).lora is None and told == []


class _Diverging:
    """A trainer whose loss turns NaN at step `bad` (1-based), as the core's does: the steps before yield their
    records, then NonFiniteLossError with the LoRA put back to the last good step (its weights = that step)."""

    method = "focus-n-fix"

    def __init__(self, bad):
        self.inner, self.bad, self.step, self.history = _Trainer(), bad, 0, []
        self.lora, self.model = self.inner.lora, self.inner.model

    def metadata(self):
        return self.inner.metadata()

    def __iter__(self):
        for i in range(self.bad - 1):
            self.inner.step(i + 1)
            self.step = i + 1
            rec = SimpleNamespace(step=i, summary=lambda: "step")
            self.history.append(rec)
            yield rec
        raise RUNS.NonFiniteLossError(f"loss is nan at step {self.bad}: stopped; the LoRA keeps the weights of step "
                                      f"{self.bad - 1} (lower lr)")


@pytest.fixture
def comfy_progress(monkeypatch):
    """Stand-ins for `comfy.model_management` (cancel never pressed) and `comfy.utils` (a silent progress bar)."""
    import types
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = lambda: None
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = lambda total: SimpleNamespace(update_absolute=lambda *a, **k: None)
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils = mm, utils
    for name, module in (("comfy", comfy), ("comfy.model_management", mm), ("comfy.utils", utils)):
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("every", [0, 5])
def test_a_loss_turning_nan_mid_run_keeps_the_last_good_step(loras, comfy_progress, every):
    """A NaN at step 3 of 5 raised out of the Train node: no output, and with checkpoints off (the default) steps
    1-2 were lost, while the message said the LoRA was kept (review extreme-F1). The run now ends there with the
    records so far and why, and a checkpoint (when on) holds step 2, though 2 is no multiple of `every`."""
    trainer = _Diverging(bad=3)
    save = RUNS._Checkpointer(trainer, every, 5, RUNS.checkpoint_path(every, "fix"), "fix")
    history, stopped = RUNS._train(trainer, 5, save)
    assert [r.step for r in history] == [0, 1]
    assert stopped == "loss is nan at step 3: stopped; the LoRA keeps the weights of step 2 (lower lr)"
    if every:
        assert _held_step(save.written) == 2 and save.steps_written == 2
    else:
        assert save.written is None and not any(loras.iterdir())
    with pytest.raises(RUNS.NonFiniteLossError, match="at step 1"):  # nothing trained yet: nothing to keep
        RUNS._train(_Diverging(bad=1), 5, RUNS._Checkpointer(_Diverging(1), 0, 5, None, "fix"))


def test_the_report_of_a_stopped_run_says_so_first_and_what_the_outputs_hold(loras):
    T = PACK.nodes.train_nodes
    assert T._stopped_notes(None, [1, 2], 5) == []
    (line,) = T._stopped_notes("loss is nan at step 3: stopped; the LoRA keeps the weights of step 2", [1, 2], 5)
    assert line.startswith("WARNING: training stopped after 2 of 5 iterations: loss is nan at step 3")
    assert line.endswith("The outputs are of that step")
    path = loras / "fix.safetensors"
    assert T._checkpoint_note(path, 2, 5, None, True) == [
        "checkpoint: fix.safetensors (after the last good step; FocusFix Load LoRA lists it, to continue from)"]
    assert "every 2 iterations and after the last" in T._checkpoint_note(path, 2, 5)[0]


def test_a_stop_whose_checkpoint_write_fails_does_not_say_training_went_on(loras, comfy_progress, monkeypatch):
    """A NaN stop whose own checkpoint write failed was reported as "training went on" (review diffrev-2)."""
    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(RUNS, "write_lora", disk_full)
    trainer = _Diverging(bad=3)
    save = RUNS._Checkpointer(trainer, 5, 5, RUNS.checkpoint_path(5, "fix"), "fix")
    _, stopped = RUNS._train(trainer, 5, save)
    assert stopped is not None and save.error.startswith("the checkpoint after step 2 was not written")
    (note,) = PACK.nodes.train_nodes._checkpoint_note(save.written, 5, 5, save.error, True)
    assert "; training had stopped (no checkpoint was written; the LoRA output holds every step trained)" in note
