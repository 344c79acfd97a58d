"""The tiny model's trainer (focusfix_core/tiny/train.py): argument checks, the final checkpoint and EMA export,
a resumed run equal to an unbroken one, a new batch each step, and save_grid's layout. Runs a 0.2 M-parameter model
for 2-3 steps (the export's 16-image sample grid dominates)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from focusfix_core.io import load_training_state
from focusfix_core.tiny import train as train_mod
from focusfix_core.tiny.model import TinyConfig, TinyModel
from focusfix_core.tiny.train import save_grid, train

CFG = TinyConfig(channels=(16, 16, 32), heads=2, context_dim=16, text_layers=1)


def _run(out, steps, **kw):
    return train(out, steps=steps, batch=2, cfg=CFG, log_every=1000, **kw)


def _equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_refuses_no_steps_or_an_empty_batch(tmp_path):
    for kw in (dict(steps=0, batch=2), dict(steps=1, batch=0)):
        with pytest.raises(ValueError, match="steps and batch must be >= 1"):
            train(tmp_path / "o", cfg=CFG, **kw)


def test_train_refuses_a_model_size_the_world_does_not_draw(tmp_path):
    # the world draws 32 px scenes: a 16 px model would learn them, then sample and save at 16 px
    with pytest.raises(ValueError, match="^cfg.image_size must be the training world's 32 px, got 16"):
        train(tmp_path / "o", steps=1, batch=2, cfg=TinyConfig(image_size=16, **{k: getattr(CFG, k) for k in (
            "channels", "heads", "context_dim", "text_layers")}))
    assert not (tmp_path / "o").exists()


def test_train_exports_the_ema_weights_and_a_final_checkpoint(tmp_path):
    # OUT/checkpoint.pt holds the last step; OUT/tiny_t2i.safetensors holds the EMA (as fp16), not the raw model
    ema = _run(tmp_path / "a", 2)
    ck = load_training_state(tmp_path / "a" / "checkpoint.pt")
    assert ck["step"] == 2 and (tmp_path / "a" / "samples.png").is_file()
    exported = TinyModel.load(tmp_path / "a" / "tiny_t2i.safetensors").state_dict()
    assert all(torch.equal(exported[k], v.half().float()) for k, v in ck["ema"].items())
    assert not all(torch.equal(exported[k], v.half().float()) for k, v in ck["model"].items())
    assert _equal_states(ema.state_dict(), ck["ema"])


def test_ema_decay_zero_exports_the_trained_model(tmp_path):
    # with ema_decay=0 the EMA follows the model exactly
    _run(tmp_path / "a", 2, ema_decay=0.0)
    ck = load_training_state(tmp_path / "a" / "checkpoint.pt")
    assert _equal_states(ck["ema"], ck["model"])


def test_a_resumed_run_equals_an_unbroken_one(tmp_path, monkeypatch):
    # the documented resume: model, EMA, optimizer, step and noise RNG come back, so 2 steps + resume to 3 steps
    # do only the one remaining step and give exactly the weights of 3 unbroken steps
    whole = _run(tmp_path / "whole", 3)
    _run(tmp_path / "split", 2)
    batches = []
    real = train_mod.make_batch
    monkeypatch.setattr(train_mod, "make_batch", lambda *a, **kw: batches.append(a) or real(*a, **kw))
    resumed = _run(tmp_path / "split", 3, resume=True)
    assert len(batches) == 1
    assert load_training_state(tmp_path / "split" / "checkpoint.pt")["step"] == 3
    assert _equal_states(whole.state_dict(), resumed.state_dict())
    a = load_training_state(tmp_path / "whole" / "checkpoint.pt")
    b = load_training_state(tmp_path / "split" / "checkpoint.pt")
    assert _equal_states(a["model"], b["model"])


def test_each_step_draws_a_new_batch_from_seed_and_step(tmp_path, monkeypatch):
    # each step's batch comes from the world with its own seed (a function of seed and step)
    seeds = []
    real = train_mod.make_batch

    def spy(n, seed, *a, **kw):
        seeds.append(seed)
        return real(n, seed, *a, **kw)

    monkeypatch.setattr(train_mod, "make_batch", spy)
    _run(tmp_path / "a", 3)
    assert len(seeds) == 3 and len(set(seeds)) == 3


def test_save_grid_lays_images_out_in_rows_and_clamps(tmp_path):
    # B images in rows of nrow (the last row partial), 1-px white borders, values clamped to [0, 1]
    I = torch.zeros(3, 3, 4, 4)
    I[0] = 2.0     # above 1: white
    I[1] = -1.0    # below 0: black
    I[2, 0] = 1.0  # red
    save_grid(I, tmp_path / "g.png", nrow=2, scale=1)
    arr = np.asarray(Image.open(io.BytesIO((tmp_path / "g.png").read_bytes())).convert("RGB"))
    assert arr.shape == (2 * 6, 2 * 6, 3)
    assert (arr[1:5, 1:5] == 255).all() and (arr[1:5, 7:11] == 0).all()
    assert (arr[7:11, 1:5] == [255, 0, 0]).all() and (arr[0] == 255).all()
