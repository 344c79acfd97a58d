"""The command line end to end on a small random tiny model: outputs, no overwrite, interrupt, resume."""
import argparse
import json
from pathlib import Path

import pytest
import torch
from reward_files import head_sd
from safetensors.torch import save_file

from focusfix_core import __version__, cli
from focusfix_core.io import load_tensor_file_with_metadata
from focusfix_core.tiny.model import TinyConfig, TinyModel


@pytest.fixture
def model_file(tmp_path):
    cfg = TinyConfig(image_size=16, channels=(16, 16, 32), heads=2, context_dim=16, text_layers=1)
    path = tmp_path / "tiny.safetensors"
    TinyModel.random(seed=0, config=cfg).save(path)
    return path


def fnf_args(model_file, out, *extra):
    return ["train-fnf", "--model", str(model_file), "--out", str(out), "--prompt", "a red circle",
            "--seeds", "0,1", "--reward", "color_red", "--mask-source", "saliency", "--iterations", "3",
            "--steps", "3", "--batch-size", "2", "--checkpoint-every", "1", *extra]


SNE_PROMPT = "a red circle and a blue square | circle, square"


def test_train_fnf_writes_everything(model_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out)) == 0
    printed = capsys.readouterr().out
    assert "lora:" in printed and str(out) in printed
    for name in ("lora.safetensors", "before_after.png", "curves.png", "report.json", "report.md", "state.pt"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "done" and report["steps_trained"] == 3
    assert report["mean_abs_change_outside_mask"] is not None
    tensors, meta = load_tensor_file_with_metadata(out / "lora.safetensors")
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in tensors)
    assert meta["focusfix_method"] == "focus-n-fix" and "ss_network_dim" in meta
    # a second run into the same folder refuses to overwrite
    assert cli.main(fnf_args(model_file, out)) == 2
    assert "already holds" in capsys.readouterr().err


def test_interrupt_keeps_last_finished_step_and_resume_finishes(model_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_step = cli.FixTrainer.train_step
    _interrupt_at(monkeypatch, cli.FixTrainer, 2)
    assert cli.main(fnf_args(model_file, out)) == 130  # outputs written, and a script can tell it is partial
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted after 2 steps" and report["steps_trained"] == 2
    assert (out / "lora.safetensors").is_file()
    monkeypatch.setattr(cli.FixTrainer, "train_step", real_step)
    assert cli.main(fnf_args(model_file, out, "--resume")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "done" and report["steps_trained"] == 3 and len(report["history"]) == 3


def test_continue_from_a_saved_lora(model_file, tmp_path, capsys):
    """--continue-from starts where the saved LoRA ended (a negligible step: the after images are the first run's),
    with its rank; the metadata counts every step. Foreign files and --resume with it are refused by name."""
    first = tmp_path / "first"
    assert cli.main(fnf_args(model_file, first, "--rank", "2", "--lr", "0.05")) == 0
    lora = first / "lora.safetensors"
    more = tmp_path / "more"
    assert cli.main(fnf_args(model_file, more, "--continue-from", str(lora), "--lr", "1e-9", "--iterations",
                             "1")) == 0
    assert f"continuing {lora}: rank 2, targets attn (--rank/--targets not used)" in capsys.readouterr().err
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (first, more))
    assert r1["reward_before"] == r2["reward_before"]                      # I0: the base model's
    assert r2["reward_after"] == pytest.approx(r1["reward_after"], abs=1e-4)
    assert abs(r1["mean_reward_after"] - r1["mean_reward_before"]) > 1e-3, "the first run must change the images"
    _, meta = load_tensor_file_with_metadata(more / "lora.safetensors")
    _, meta1 = load_tensor_file_with_metadata(lora)
    assert meta["ss_network_dim"] == "2" and meta["focusfix_steps_trained"] == "4"
    assert meta["focusfix_previous_config"] == meta1["focusfix_config"]
    args = fnf_args(model_file, tmp_path / "x", "--continue-from", str(lora), "--resume")
    assert cli.main(args) == 2 and "--resume and --continue-from exclude each other" in capsys.readouterr().err
    foreign = tmp_path / "style.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(foreign))
    assert cli.main(fnf_args(model_file, tmp_path / "y", "--continue-from", str(foreign))) == 2
    assert "'style.safetensors' is not a LoRA FocusFix saved" in capsys.readouterr().err
    sne = ["train-sne", "--model", str(model_file), "--iterations", "1", "--resolution", "8", "--prompt",
           "a red circle and a blue square | circle, square"]
    assert cli.main([*sne, "--out", str(tmp_path / "s1")]) == 0
    s1 = tmp_path / "s1" / "lora.safetensors"
    assert cli.main([*sne, "--out", str(tmp_path / "s2"), "--continue-from", str(s1)]) == 0
    _, meta = load_tensor_file_with_metadata(tmp_path / "s2" / "lora.safetensors")
    assert meta["focusfix_steps_trained"] == "2" and meta["focusfix_method"] == "separate-and-enhance"
    # another method's LoRA: relabelled, and its loss worked against the fix (review F4); refused by name
    capsys.readouterr()
    assert cli.main([*sne, "--out", str(tmp_path / "s3"), "--continue-from", str(lora)]) == 2
    assert "is a focus-n-fix LoRA: this separate-and-enhance run trains only LoRAs of its own method further. " \
           "To build on it, continue it with train-fnf" in capsys.readouterr().err
    assert cli.main(fnf_args(model_file, tmp_path / "f3", "--continue-from", str(s1))) == 2
    assert "is a separate-and-enhance LoRA: this focus-n-fix run" in capsys.readouterr().err
    assert not (tmp_path / "s3").exists() and not (tmp_path / "f3").exists()
    draft = tmp_path / "draft"  # DRaFT is Focus-N-Fix with lam 0: it continues either way
    assert cli.main(fnf_args(model_file, draft, "--mask-source", "none", "--lam", "0", "--iterations", "1")) == 0
    assert cli.main(fnf_args(model_file, tmp_path / "f4", "--continue-from", str(draft / "lora.safetensors"),
                             "--iterations", "1")) == 0


def test_train_sne_draws_attention_png_on_one_scale_per_prompt_as_the_node_does(model_file, tmp_path, monkeypatch):
    """attention.png stretched every map to its own blue-to-red range, so a weak word never looked weak and
    Enhance's rise was invisible, while the node draws a prompt's maps before and after on one scale (review
    health-1). The command line now draws the node's tiles (`maps_tiles`, `maps_scale`)."""
    import numpy as np
    from PIL import Image

    from focusfix_core.attention import maps_scale, maps_tiles
    from focusfix_core.viz import image_grid

    strong = torch.zeros(1, 1, 8, 8)
    strong[..., 2:5, 2:5] = 1.0
    A0 = torch.cat([strong, 0.25 * strong], 1)  # [P=1, n=2, 8, 8]: the second word is weak
    A1 = 2 * A0                                 # after training: both peaks doubled
    drawn = iter([A0, A1])
    monkeypatch.setattr(cli.SeparateEnhanceTrainer, "eval_maps", lambda self, *a, **k: next(drawn))
    out = tmp_path / "sne"
    assert cli.main(["train-sne", "--model", str(model_file), "--out", str(out), "--iterations", "1",
                     "--resolution", "8", "--prompt", "a red circle and a blue square | circle, square"]) == 0
    top = maps_scale(A0, A1)
    expected = image_grid(torch.cat([maps_tiles(A0, 64, top), maps_tiles(A1, 64, top)], 1).flatten(0, 1), nrow=4)
    png = torch.from_numpy(np.array(Image.open(out / "attention.png").convert("RGB"))).permute(2, 0, 1) / 255
    assert png.shape == expected.shape
    assert (png - expected).abs().max() <= 1 / 255 + 1e-6
    # four different strengths, four different tiles (each stretched to its own range, all four were the same)
    tiles = [png[:, 2:66, 2 + 66 * c:66 + 66 * c] for c in range(4)]
    assert all((tiles[i] - tiles[j]).abs().max() > 0.2 for i in range(4) for j in range(i))
    # the report's losses in the node's words: separate = the maps' overlap, enhance = 1 - the weakest peak
    from focusfix_core.losses import overlap_and_peaks

    report = json.loads((out / "report.json").read_text())
    for when, A in (("before", A0), ("after", A1)):
        overlap, peaks = overlap_and_peaks(A)
        assert report[f"separate_{when}"] == [pytest.approx(overlap, abs=1e-6)]
        assert report[f"enhance_{when}"] == [pytest.approx(1 - min(peaks), abs=1e-6)]
    md = (out / "report.md").read_text()
    assert "- separate loss, the objects' maps' overlap (mean over prompts): " in md
    assert "- enhance loss, 1 - the weakest object's peak (mean over prompts): " in md


def test_train_sne_and_errors(model_file, tmp_path, capsys):
    out = tmp_path / "sne"
    args = ["train-sne", "--model", str(model_file), "--out", str(out), "--iterations", "2", "--resolution", "8",
            "--prompt", "a red circle and a blue square | circle, square"]
    assert cli.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "separate-and-enhance" and len(report["separate_after"]) == 1
    assert (out / "attention.png").is_file()
    bad = ["train-sne", "--model", str(model_file), "--out", str(tmp_path / "x"), "--prompt", "a red circle | circle"]
    assert cli.main(bad) == 2
    assert "at least two object words" in capsys.readouterr().err
    assert cli.main(fnf_args(model_file, tmp_path / "y", "--reward", "nope")) == 2
    assert "neither a known reward" in capsys.readouterr().err
    assert cli.main(fnf_args(tmp_path / "missing.safetensors", tmp_path / "z")) == 2


def test_train_sne_reports_each_prompts_losses_on_its_own_objects(model_file, tmp_path, monkeypatch):
    """A 2-object prompt beside a 3-object one had its maps padded with a blank one: its Enhance read 1.0 and its
    Separate a third of its value (review C1). Each prompt's values now come from its own maps."""
    from focusfix_core.losses import enhance_loss, separate_loss
    maps = []
    real = cli.SeparateEnhanceTrainer.eval_maps

    def kept(self, *a, **kw):
        maps.append(real(self, *a, **kw))
        return maps[-1]
    monkeypatch.setattr(cli.SeparateEnhanceTrainer, "eval_maps", kept)
    out = tmp_path / "sne"
    assert cli.main(["train-sne", "--model", str(model_file), "--out", str(out), "--iterations", "1",
                     "--resolution", "8", "--prompt", "a red circle and a blue square | circle, square",
                     "--prompt", "red circle blue square green triangle | circle, square, triangle"]) == 0
    report = json.loads((out / "report.json").read_text())
    A0, A1 = maps
    assert A0.shape[1] == 3 and not A0[0, 2].any()  # the padding is there
    for key, loss, A in (("separate_before", separate_loss, A0), ("enhance_after", enhance_loss, A1)):
        assert report[key][0] == pytest.approx(float(loss(A[:1, :2])[0]), rel=1e-6), key
        assert report[key][1] == pytest.approx(float(loss(A[1:])[0]), rel=1e-6), key
    assert report["enhance_before"][0] < 1.0


def test_demo_quick_end_to_end(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert summary["focus_n_fix"]["status"] == "done" and summary["separate_enhance"]["status"] == "done"
    assert (tmp_path / "demo" / "focus_n_fix" / "lora.safetensors").is_file()
    assert "summary:" in capsys.readouterr().out


def test_ctrl_c_while_drawing_before_after_keeps_the_trained_lora(model_file, tmp_path, monkeypatch, capsys):
    """The LoRA is written as soon as training ends: a Ctrl-C while the before/after images sample loses only
    the images, and the command says so instead of a traceback."""
    out = tmp_path / "run"

    def interrupted(self, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.FixTrainer, "before_after", interrupted)
    assert cli.main(fnf_args(model_file, out)) == 130
    assert "interrupted" in capsys.readouterr().err
    tensors, meta = load_tensor_file_with_metadata(out / "lora.safetensors")
    assert meta["focusfix_steps_trained"] == "3" and (out / "state.pt").is_file()
    assert not (out / "report.json").exists() and not list(out.glob("*.tmp"))


def test_before_after_shows_a_bar_over_its_sampler_steps(model_file, tmp_path, capsys):
    assert cli.main(fnf_args(model_file, tmp_path / "run")) == 0
    err = capsys.readouterr().err
    # 2 items in one batch of 2, I0 cached from training: 3 steps of I
    assert "before/after images: 3/3" in err, err


def test_before_after_grid_shows_the_first_items_and_every_item_has_its_images(model_file, tmp_path, monkeypatch):
    """Hundreds of items made a before_after.png no viewer opens (and 4 image copies per item in memory): the grid
    holds the first GRID_ITEMS; every item keeps its full-size images, and report.md says how many rows there are."""
    from PIL import Image
    from focusfix_core.viz import image_grid, upscale
    monkeypatch.setattr(cli, "GRID_ITEMS", 2)
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--seeds", "0-2", "--iterations", "1")) == 0
    expected = image_grid(upscale(torch.zeros(2 * 4, 3, 16, 16)), nrow=4)  # 2 rows of I0 | mask | I | change
    assert Image.open(out / "before_after.png").size == (expected.shape[2], expected.shape[1])
    assert all((out / f"{kind}_{k}.png").is_file() for kind in ("before", "after") for k in range(3))
    assert "rows: the first 2 of the 3 items" in (out / "report.md").read_text()


def test_ctrl_c_mid_step_then_resume_equals_an_uninterrupted_run(model_file, tmp_path, monkeypatch):
    """Ctrl-C while a step samples: --resume redraws that step's batch, and the final LoRA is the one an
    uninterrupted run saves (3 seeds at batch 2: the seeded order decides every batch)."""
    import focusfix_core.trainers as tr
    from safetensors.torch import load_file
    args = ["--seeds", "0,1,2", "--iterations", "3"]  # argparse: the later flag wins
    assert cli.main(fnf_args(model_file, tmp_path / "ref", *args)) == 0
    real, calls = tr.sample, []

    def sample(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # step 0: I0 and I of its batch; step 1: I0 of a new item, then this
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(tr, "sample", sample)
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, *args)) == 130
    assert json.loads((out / "report.json").read_text())["status"] == "interrupted after 1 steps"
    monkeypatch.setattr(tr, "sample", real)
    assert cli.main(fnf_args(model_file, out, *args, "--resume")) == 0
    ref, got = load_file(tmp_path / "ref" / "lora.safetensors"), load_file(out / "lora.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def test_out_of_memory_keeps_the_last_finished_step_and_says_what_to_lower(model_file, tmp_path, monkeypatch,
                                                                             capsys):
    out = tmp_path / "run"
    real_step = cli.FixTrainer.train_step

    def oom_in_step_2(self):
        if self.step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return real_step(self)
    monkeypatch.setattr(cli.FixTrainer, "train_step", oom_in_step_2)
    assert cli.main(fnf_args(model_file, out)) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["status"].startswith("failed: out of device memory in training step 2 of 3: lower batch_size "
                                       "(now 2)"), report["status"]
    assert report["steps_trained"] == 1
    err = capsys.readouterr().err
    assert "note: failed: out of device memory" in err
    assert "lower --batch-size (now 2) or --K (now 1), then --size (now 16)" in err, err  # the flags, printed
    # the before/after images do not fit either: the LoRA is already written, the command fails by name
    monkeypatch.setattr(cli.FixTrainer, "train_step", real_step)

    def oom(self, progress=None):
        raise torch.OutOfMemoryError("CUDA out of memory.")
    monkeypatch.setattr(cli.FixTrainer, "before_after", oom)
    out2 = tmp_path / "run2"
    assert cli.main(fnf_args(model_file, out2)) == 1
    assert "error: CUDA out of memory." in capsys.readouterr().err
    assert (out2 / "lora.safetensors").is_file()


def test_a_corrupt_or_foreign_model_file_is_named(tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    foreign = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(2)}, str(foreign))
    for path, expected in ((junk, "as .safetensors: corrupt or truncated"),
                           (foreign, "not a FocusFix tiny model")):
        assert cli.main(["train-fnf", "--model", str(path), "--reward", "artifact", "--out", str(tmp_path / "o"),
                         "--prompt", "a red circle", "--iterations", "1"]) == 2
        assert expected in capsys.readouterr().err


def test_resume_keeps_the_run_it_continues(model_file, tmp_path, capsys):
    """--resume finishes the run in state.pt: its LoRA settings come from the state (no --rank needed), other
    settings are refused by name instead of training on them (or a torch size-mismatch traceback), and a
    resumed --continue-from run still counts the steps of the LoRA it continued."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli.main(fnf_args(model_file, first, "--rank", "2", "--iterations", "2")) == 0
    assert cli.main(fnf_args(model_file, second, "--continue-from", str(first / "lora.safetensors"),
                             "--iterations", "2")) == 0
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, second, "--resume", "--iterations", "3")) == 0  # rank 2 from the state
    _, meta = load_tensor_file_with_metadata(second / "lora.safetensors")
    assert meta["focusfix_steps_trained"] == "5" and "focusfix_previous_config" in meta
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, second, "--resume", "--iterations", "4", "--prompt", "a blue square")) == 2
    err = capsys.readouterr().err
    assert "saved by a run with other settings: --prompt ['a red circle'] (now ['a red circle', 'a blue square'])" \
        in err, err
    assert cli.main(fnf_args(model_file, second, "--resume", "--iterations", "2")) == 2
    assert "iterations (2) is below the 3 steps" in capsys.readouterr().err
    assert cli.main(fnf_args(model_file, second, "--resume", "--iterations", "4", "--reward", "sharpness")) == 2
    err = capsys.readouterr().err
    assert 'saved by a run with reward {"name": "color_red"' in err and '(now {"name": "sharpness"' in err, err


def test_bad_outputs_and_numbers_are_refused_by_name(model_file, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(fnf_args(model_file, afile)) == 2
    assert f"--out {afile} is a file" in capsys.readouterr().err
    assert cli.main(fnf_args(model_file, afile / "sub")) == 2  # a file where a folder must go: before training
    assert "is not a folder this user can write to" in capsys.readouterr().err
    assert cli.main(fnf_args(model_file, tmp_path / "s", "--size", "0")) == 2
    assert "--size must be at least 8" in capsys.readouterr().err
    assert cli.main(fnf_args(model_file, tmp_path / "c", "--checkpoint-every", "-3")) == 2
    assert "--checkpoint-every must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "c").exists()  # a refused run leaves no folder
    assert cli.main(fnf_args(model_file, tmp_path / "r", "--seeds", "0-1", "--iterations", "1")) == 0  # ranges
    assert json.loads((tmp_path / "r" / "report.json").read_text())["config"]["seeds"] == [0, 1]
    assert cli.main(["convert-reward", str(model_file), str(tmp_path / "head.pth")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


def test_ctrl_c_in_the_demo_stops_the_demo(tmp_path, monkeypatch, capsys):
    """The demo's Focus-N-Fix stage interrupted: its outputs are written, Separate-and-Enhance does not start,
    and the command exits 130."""
    import focusfix_core.cli as c
    _interrupt_at(monkeypatch, c.FixTrainer, 1)
    monkeypatch.setattr(c, "run_separate_enhance", lambda *a, **k: pytest.fail("the demo went on after Ctrl-C"))
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 130
    assert (tmp_path / "demo" / "focus_n_fix" / "lora.safetensors").is_file()
    assert "interrupted after 1 steps" in capsys.readouterr().err
    # a demo stopped half way left outputs: a new demo there does not replace them without --overwrite
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "already holds" in err and "--resume" not in err  # demo has no --resume to suggest


def _an_earlier_demo(out: Path) -> None:
    """The outputs a finished demo leaves (their names: what --overwrite replaces)."""
    for name in ("demo_summary.json", "focus_n_fix/lora.safetensors", "focus_n_fix/report.json",
                 "separate_enhance/lora.safetensors", "separate_enhance/report.json", "separate_enhance/held_out.png"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("earlier demo")


def _interrupt_at(monkeypatch, trainer_class, step: int, error: BaseException | type = KeyboardInterrupt) -> None:
    """trainer_class's train_step raises `error` (a Ctrl-C unless given) when it reaches `step`."""
    real_step = trainer_class.train_step

    def interrupted(self):
        if self.step == step:
            raise error
        return real_step(self)
    monkeypatch.setattr(trainer_class, "train_step", interrupted)


def test_an_overwriting_demo_stopped_before_separate_enhance_trains_writes_its_summary(tmp_path, monkeypatch,
                                                                                       capsys):
    """--overwrite over a finished demo, Ctrl-C before Separate-and-Enhance's first step: the summary of this
    demo's finished Focus-N-Fix is written (it was not: the earlier demo's stayed beside the new outputs), the
    earlier Separate-and-Enhance outputs are gone, and the command says what happened (exit 130)."""
    import focusfix_core.cli as c
    out = tmp_path / "demo"
    _an_earlier_demo(out)
    _interrupt_at(monkeypatch, c.SeparateEnhanceTrainer, 0)
    assert cli.main(["demo", "--quick", "--overwrite", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"note: interrupted before Separate-and-Enhance's first step (Focus-N-Fix is done): nothing was " \
           f"written into {out / 'separate_enhance'}" in err, err
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["focus_n_fix"]["status"] == "done" and summary["focus_n_fix"]["glitches_after"] is not None
    assert summary["separate_enhance"]["status"] == "interrupted before its first step: nothing was written"
    assert summary["separate_enhance"]["both_objects_after"] is None
    assert sorted(p.name for p in (out / "separate_enhance").iterdir()) == []
    assert json.loads((out / "focus_n_fix" / "report.json").read_text())["status"] == "done"


def test_a_demo_whose_separate_enhance_fails_at_its_first_step_writes_its_summary(tmp_path, monkeypatch, capsys):
    """A NaN loss (or out of memory) at Separate-and-Enhance's first step writes nothing there (as a Ctrl-C): the
    demo still writes the summary of its finished Focus-N-Fix, and exits 1."""
    import focusfix_core.cli as c
    from focusfix_core.trainers import NonFiniteLossError

    def fails(self):
        raise NonFiniteLossError("loss is nan at step 1: stopped")
    monkeypatch.setattr(c.SeparateEnhanceTrainer, "train_step", fails)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "note: failed in Separate-and-Enhance (Focus-N-Fix is done): loss is nan at step 1: stopped" in err, err
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["focus_n_fix"]["status"] == "done"
    assert summary["separate_enhance"]["status"].startswith("failed: loss is nan at step 1: stopped\nno step "
                                                              "finished: nothing was written")
    assert not (out / "separate_enhance" / "lora.safetensors").exists()


def test_an_overwriting_demo_stopped_in_focus_n_fix_leaves_none_of_the_earlier_demo(tmp_path, monkeypatch, capsys):
    """--overwrite over a finished demo, Ctrl-C during Focus-N-Fix's training: the earlier demo's summary
    (saying "done") and Separate-and-Enhance outputs went on beside this demo's interrupted Focus-N-Fix."""
    import focusfix_core.cli as c
    out = tmp_path / "demo"
    _an_earlier_demo(out)
    _interrupt_at(monkeypatch, c.FixTrainer, 1)
    assert cli.main(["demo", "--quick", "--overwrite", "--out", str(out)]) == 130
    assert not (out / "demo_summary.json").exists()
    assert sorted(p.name for p in (out / "separate_enhance").iterdir()) == []
    assert json.loads((out / "focus_n_fix" / "report.json").read_text())["status"] == "interrupted after 1 steps"
    # stopped before its first step, the demo changes nothing
    _an_earlier_demo(out)
    _interrupt_at(monkeypatch, c.FixTrainer, 0)
    assert cli.main(["demo", "--quick", "--overwrite", "--out", str(out)]) == 130
    assert all((out / n).read_text() == "earlier demo" for n in ("demo_summary.json", "separate_enhance/report.json"))


def test_bad_data_met_mid_run_keeps_the_steps_done(model_file, tmp_path, monkeypatch, capsys):
    # e.g. a later item's derived mask comes out empty: the finished steps are written, the command fails (1)
    real_step = cli.FixTrainer.train_step

    def empty_mask_at(step):
        def train_step(self):
            if self.step == step:
                raise ValueError("the saliency mask of prompt 'a red circle', seed 1 is empty")
            return real_step(self)
        return train_step
    monkeypatch.setattr(cli.FixTrainer, "train_step", empty_mask_at(1))
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out)) == 1
    err = capsys.readouterr().err
    assert "seed 1 is empty" in err and "stopped after 1 steps" in err
    assert load_tensor_file_with_metadata(out / "lora.safetensors")[1]["focusfix_steps_trained"] == "1"
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 1
    # at the first step nothing was trained: a plain input error (2), nothing written
    monkeypatch.setattr(cli.FixTrainer, "train_step", empty_mask_at(0))
    out0 = tmp_path / "run0"
    assert cli.main(fnf_args(model_file, out0)) == 2
    assert not (out0 / "lora.safetensors").exists()


@pytest.mark.parametrize("change, match", [
    (lambda s: {**s, "step": -5}, "step must be an int >= 0, got -5"),
    (lambda s: {**s, "order": torch.tensor([99])}, "order must be distinct item indices in 0..1"),
    (lambda s: {**s, "continued": "[1,2]"}, "continued must be the continued LoRA's metadata"),
    (lambda s: [1, 2, 3], "expected a dict whose 'config' holds the run's settings"),  # was an AttributeError
    # read before the trainer checks the state: "'int' object is not iterable", "'>' not supported" (review G6)
    (lambda s: {**s, "config": json.dumps({**json.loads(s["config"]), "targets": 5})},
     "its LoRA settings rank 4, targets 5, alpha None are not an int >= 1"),
    (lambda s: {**s, "config": json.dumps({**json.loads(s["config"]), "alpha": "x"})},
     "its LoRA settings rank 4, targets 'attn', alpha 'x' are not"),
])
def test_resume_refuses_an_invalid_state_before_training(model_file, tmp_path, capsys, change, match):
    """step -5 was accepted (the run reported done), an order index out of range failed mid-run (IndexError), a
    bad `continued` after the training (AttributeError, no LoRA written): the review's finding 5."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1")) == 0
    torch.save(change(torch.load(out / "state.pt", weights_only=True)), out / "state.pt")
    lora = (out / "lora.safetensors").read_bytes()
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, out, "--resume")) == 2
    assert f"error: {out / 'state.pt'}: the training state is invalid: {match}" in capsys.readouterr().err
    assert (out / "lora.safetensors").read_bytes() == lora  # nothing trained, nothing written


def test_resume_refuses_a_state_in_a_newer_format_before_reading_its_settings(model_file, tmp_path, capsys):
    """A newer layout (its config elsewhere) was refused as "invalid ... LoRA settings"; now by its format."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1")) == 0
    state = torch.load(out / "state.pt", weights_only=True)
    torch.save({**state, "format": 2, "config": None}, out / "state.pt")
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert f"error: {out / 'state.pt'}: the training state was written by a newer FocusFix" in err, err
    assert "reads format 1 or older: update FocusFix to resume it, or start a new run" in err


def test_resume_of_a_state_from_before_a_setting_was_recorded_says_what_to_do(model_file, tmp_path, capsys):
    """A state.pt from FocusFix's first day (no sampler_name, scheduler or sigmas in its config) was refused as
    "--sampler-name None (now 'ddim')", which no flag can match (review compat-1). It now says the older FocusFix
    did not record them and to continue its LoRA in a new run, which then works."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1")) == 0
    state = torch.load(out / "state.pt", weights_only=True)
    old = {k: v for k, v in json.loads(state["config"]).items() if k not in ("sampler_name", "scheduler", "sigmas")}
    torch.save({**state, "config": json.dumps(old)}, out / "state.pt")
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert (f"error: {out / 'state.pt'}: the training state was saved by an older FocusFix, which did not record "
            f"'sampler_name', 'scheduler': it cannot be resumed as the same run. Train its LoRA further in a new run "
            f"instead (--continue-from its lora.safetensors)") in err, err  # sigmas () = none: nothing to miss
    assert cli.main(fnf_args(model_file, tmp_path / "new", "--continue-from", str(out / "lora.safetensors"))) == 0


def test_continue_from_a_nan_lora_is_refused_naming_the_file(model_file, tmp_path, capsys):
    """It trained, then failed blaming the reward and the lr (the review's finding 6)."""
    first = tmp_path / "first"
    assert cli.main(fnf_args(model_file, first, "--iterations", "1")) == 0
    tensors, meta = load_tensor_file_with_metadata(first / "lora.safetensors")
    up = next(k for k in tensors if k.endswith(".lora_up.weight"))
    save_file({**tensors, up: torch.full_like(tensors[up], float("nan"))}, str(tmp_path / "nan.safetensors"), meta)
    capsys.readouterr()
    more = tmp_path / "more"
    assert cli.main(fnf_args(model_file, more, "--continue-from", str(tmp_path / "nan.safetensors"))) == 2
    assert f"error: 'nan.safetensors': 1 LoRA tensors hold NaN or inf values, e.g. ['{up}']" in capsys.readouterr().err
    assert not (more / "lora.safetensors").exists()


def test_lam_and_reward_target_reach_the_run(model_file, tmp_path):
    """Review C1/C2: --lam 0 --reward-target -0.05 are the run's settings (report and LoRA metadata), and lam 0
    makes it plain DRaFT ("draft"), not Focus-N-Fix with the default lam 1."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--lam", "0", "--reward-target", "-0.05", "--iterations", "1",
                             "--seeds", "0", "--batch-size", "1", "--steps", "2")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "draft" and "M (--mask-source saliency) is not used in training" in report["notes"][0]
    assert report["config"]["lam"] == 0 and report["config"]["reward_target"] == -0.05
    _, meta = load_tensor_file_with_metadata(out / "lora.safetensors")
    config = json.loads(meta["focusfix_config"])
    assert meta["focusfix_method"] == "draft" and config["lam"] == 0 and config["reward_target"] == -0.05



@pytest.mark.parametrize("flag", ["--sampler-name", "--sampler"])
def test_sampler_name_is_the_nodes_name_and_the_old_flag_still_runs(model_file, tmp_path, flag):
    """--sampler-name (the nodes' and KSampler's sampler_name) reaches the run; --sampler, its earlier name,
    still does, so a script written against it keeps working."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, flag, "dpmpp_2m", "--iterations", "1", "--seeds", "0",
                             "--batch-size", "1", "--steps", "2")) == 0
    assert json.loads((out / "report.json").read_text())["config"]["sampler_name"] == "dpmpp_2m"
    _, meta = load_tensor_file_with_metadata(out / "lora.safetensors")
    assert json.loads(meta["focusfix_config"])["sampler_name"] == "dpmpp_2m"


def test_negative_prompt_and_saliency_method_reach_the_run_as_the_nodes_inputs_do(model_file, tmp_path, capsys):
    """--negative-prompt and --saliency-method: the Train node's negative_prompt and saliency_method. The
    negative prompt changes the base image I0 (the guidance's other side); a word the tiny model cannot read is
    refused naming the flag, before anything runs."""
    runs = {}
    for name, extra in (("plain", ()), ("neg", ("--negative-prompt", "a blue square", "--saliency-method",
                                                  "grad_x_input"))):
        out = tmp_path / name
        assert cli.main(fnf_args(model_file, out, *extra, "--iterations", "1", "--seeds", "0", "--batch-size", "1",
                                 "--steps", "2")) == 0
        runs[name] = out
    config = json.loads((runs["neg"] / "report.json").read_text())["config"]
    assert config["negative_prompt"] == "a blue square" and config["saliency_method"] == "grad_x_input"
    assert json.loads((runs["plain"] / "report.json").read_text())["config"]["negative_prompt"] == ""
    assert (runs["plain"] / "before_0.png").read_bytes() != (runs["neg"] / "before_0.png").read_bytes()
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, tmp_path / "bad", "--negative-prompt", "blurry")) == 2
    err = capsys.readouterr().err
    assert "--negative-prompt 'blurry': the tiny model does not know ['blurry']" in err
    assert not (tmp_path / "bad").exists()

def test_help_names_the_sampler_flag_by_the_nodes_name(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train-fnf", "--help"])
    assert "--sampler-name" in capsys.readouterr().out


def test_resume_refuses_another_model_of_the_same_name_and_settings(model_file, tmp_path, capsys):
    """A resume compared the settings and the reward's name, not the weights: another tiny-model file of the same
    layout (--model swapped, or the file replaced) trained one LoRA against two models (review G4)."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1")) == 0
    before = (out / "lora.safetensors").read_bytes()
    TinyModel.random(seed=5, config=TinyModel.load(model_file).cfg).save(model_file)  # same name, other weights
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "saved by a run with another model (the same name and settings, other weights)" in err, err
    assert (out / "lora.safetensors").read_bytes() == before


def test_overwrite_then_ctrl_c_leaves_no_report_of_the_earlier_run(model_file, tmp_path, monkeypatch, capsys):
    """Audit: --overwrite into a finished run's folder, then Ctrl-C while the images were drawn, left the new
    1-step LoRA beside the earlier run's report.json, report.md and PNGs (3 steps, other seeds): a folder that
    described another LoRA. The earlier outputs go as this run writes its first file; the command says the images
    are being drawn and that a second Ctrl-C skips them."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--seeds", "0,1,2")) == 0
    assert (out / "after_2.png").is_file() and (out / "report.md").is_file()
    capsys.readouterr()
    real_step = cli.FixTrainer.train_step

    def interrupted(self):
        if self.step == 1:
            raise KeyboardInterrupt
        return real_step(self)

    def no_images(self, progress=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli.FixTrainer, "train_step", interrupted)
    monkeypatch.setattr(cli.FixTrainer, "before_after", no_images)
    assert cli.main(fnf_args(model_file, out, "--overwrite", "--checkpoint-every", "0")) == 130
    err = capsys.readouterr().err
    assert "interrupted after 1 steps: " in err and "drawing the before/after images and the report (Ctrl-C again" in err
    assert sorted(p.name for p in out.iterdir() if p.name != cli.LOCK_NAME) == ["lora.safetensors", "state.pt"]
    assert load_tensor_file_with_metadata(out / "lora.safetensors")[1]["focusfix_steps_trained"] == "1"


def test_ctrl_c_before_the_first_step_writes_nothing_and_keeps_the_earlier_run(model_file, tmp_path, monkeypatch,
                                                                                 capsys):
    """Audit: a Ctrl-C before the first step wrote an untrained LoRA, which with --overwrite replaced a finished
    one. Nothing is written now (exit 130), and the earlier run's files stay as they were."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".focusfix.lock"}
    capsys.readouterr()

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli.FixTrainer, "train_step", interrupted)
    assert cli.main(fnf_args(model_file, out, "--overwrite")) == 130
    assert "interrupted before the first training step: nothing was written into" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".focusfix.lock"} == before
    fresh = tmp_path / "fresh"
    assert cli.main(fnf_args(model_file, fresh)) == 130 and not fresh.exists()  # no empty folder either
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, out, "--resume", "--iterations", "5")) == 130
    assert "(state.pt is unchanged: --resume still continues it)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".focusfix.lock"} == before


def test_overwrite_with_the_other_command_leaves_none_of_its_files(model_file, tmp_path):
    """Audit: train-sne --overwrite into a train-fnf folder kept the before_K/after_K.png files, and train-fnf
    into a train-sne folder kept attention.png."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1", "--steps", "2")) == 0
    sne = ["train-sne", "--model", str(model_file), "--out", str(out), "--iterations", "1", "--resolution", "4", "--prompt",
           "a red circle and a blue square | circle, square"]
    assert cli.main([*sne, "--overwrite"]) == 0
    assert not [p for p in out.iterdir() if cli.ITEM_IMAGES.fullmatch(p.name)]
    assert (out / "attention.png").is_file()
    assert cli.main(fnf_args(model_file, out, "--iterations", "1", "--steps", "2", "--overwrite")) == 0
    assert not (out / "attention.png").exists() and (out / "before_0.png").is_file()


def test_a_failed_run_is_not_offered_resume_which_keeps_the_setting_that_failed(model_file, tmp_path, monkeypatch,
                                                                                 capsys):
    """Audit: after a NaN loss the note said "... lower lr (--resume continues it)", but --resume refuses any
    setting but the iterations, and with the same lr the NaN comes back. Only an interrupted run is offered it."""
    from focusfix_core.trainers import NonFiniteLossError
    _interrupt_at(monkeypatch, cli.FixTrainer, 1, NonFiniteLossError("the loss is NaN at step 2: lower lr"))
    assert cli.main(fnf_args(model_file, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert "note: failed: the loss is NaN at step 2: lower lr" in err and "--resume" not in err


def test_a_link_to_an_output_given_as_the_mask_is_refused(model_file, tmp_path, capsys):
    """Audit: a link named otherwise (link.png -> OUT/before_0.png) passed the check that a --mask is none of the
    files the run replaces, and the run overwrote the painted image through it."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1")) == 0
    link = tmp_path / "link.png"
    link.symlink_to(out / "before_0.png")
    before = (out / "before_0.png").read_bytes()
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, out, "--iterations", "1", "--overwrite", "--mask-source", "mask", "--mask",
                             str(link))) == 2
    assert "is one of the files this run writes into --out" in capsys.readouterr().err
    assert (out / "before_0.png").read_bytes() == before


def test_the_notes_the_node_gives_are_printed_and_reported(model_file, tmp_path, capsys):
    """Audit: repeated seeds and a batch larger than the items trained silently on the command line, where the
    Train node notes them (the same core notes now, in the flags' names)."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--seeds", "0,0", "--batch-size", "3", "--iterations", "1")) == 0
    err = capsys.readouterr().err
    expected = ["--seeds repeat [0]: each repeat trains the same image again (counts it more)",
                "--batch-size 3 is more than the 2 (prompt, seed) items: a step computes each of them 1.5 times on "
                "average (add seeds or prompts, or lower --batch-size)"]
    assert all(f"note: {n}" in err for n in expected)
    report = json.loads((out / "report.json").read_text())
    assert report["notes"] == expected and report["model"] != expected[1]
    assert all(f"- note: {n}" in (out / "report.md").read_text() for n in expected)
    from PIL import Image
    white = tmp_path / "white.png"
    Image.new("L", (16, 16), 255).save(white)
    assert cli.main(fnf_args(model_file, tmp_path / "full", "--mask-source", "mask", "--mask", str(white),
                             "--iterations", "1")) == 0
    assert (f"note: --mask {white} is full (every pixel white): nothing is held, so Focus-N-Fix becomes plain DRaFT"
            in capsys.readouterr().err)


def test_a_repeated_prompt_is_noted_as_a_repeated_seed_is(model_file, tmp_path, capsys):
    """Bad-input hunt (session 27): --prompt given twice trains the same items twice, without a word."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--prompt", "a red circle ", "--iterations", "1")) == 0
    note = "--prompt repeat ['a red circle']: each repeat trains the same images again (counts them more)"
    assert f"note: {note}" in capsys.readouterr().err
    assert note in json.loads((out / "report.json").read_text())["notes"]
    sne = tmp_path / "sne"  # Separate-and-Enhance: the same (prompt, objects), however spaced
    assert cli.main(["train-sne", "--model", str(model_file), "--out", str(sne), "--iterations", "1", "--resolution",
                     "4", "--prompt", SNE_PROMPT, "--prompt", SNE_PROMPT.replace(" | ", "|")]) == 0
    note = f"--prompt repeat ['{SNE_PROMPT}']: each repeat trains the same prompt again (counts it more)"
    assert f"note: {note}" in capsys.readouterr().err
    report = json.loads((sne / "report.json").read_text())
    assert report["notes"] == [note] and f"- note: {note}" in (sne / "report.md").read_text()


def test_a_model_or_reward_file_the_run_would_replace_is_refused(model_file, tmp_path, capsys):
    """CLI bad-input hunt (session 27): --continue-from was checked, --model and --reward were not: with
    --overwrite, a model file named lora.safetensors in --out was replaced by the LoRA trained on it."""
    out = tmp_path / "run"
    out.mkdir()
    model = out / "lora.safetensors"
    model.write_bytes(model_file.read_bytes())
    args = fnf_args(model_file, out, "--overwrite")
    args[args.index(str(model_file))] = str(model)
    assert cli.main(args) == 2
    assert (f"--model {model} is one of the files this run writes into --out {out}: copy it under another name or "
            f"folder first (e.g. {out / 'input_lora.safetensors'}), or give another --out") in capsys.readouterr().err
    assert cli.main(["train-sne", "--model", str(model), "--out", str(out), "--overwrite", "--prompt",
                     SNE_PROMPT]) == 2
    assert f"--model {model} is one of the files this run writes into --out" in capsys.readouterr().err
    assert model.read_bytes() == model_file.read_bytes()
    from focusfix_core.tiny.rewards import DEFAULT_REWARDS
    reward = out / "before_0.png"  # an item image's name, holding a reward file
    reward.write_bytes(DEFAULT_REWARDS["artifact"].read_bytes())
    assert cli.main(fnf_args(model_file, out, "--overwrite", "--reward", str(reward))) == 2
    assert f"--reward {reward} is one of the files this run writes into --out" in capsys.readouterr().err
    assert reward.read_bytes() == DEFAULT_REWARDS["artifact"].read_bytes()


def test_an_empty_out_is_refused_not_read_as_the_current_folder(model_file, tmp_path, capsys, monkeypatch):
    """CLI bad-input hunt (session 27): --out "" (an unset shell variable) wrote the whole run into the current
    folder."""
    monkeypatch.chdir(tmp_path)
    for command in (fnf_args(model_file, ""), ["demo", "--out", " "]):
        with pytest.raises(SystemExit) as info:
            cli.main(command)
        assert info.value.code == 2
        assert "--out: is empty: give an output folder (an unset shell variable?)" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == [model_file.name]  # nothing written here


def test_report_md_holds_the_settings_masks_and_what_the_run_went_on_from(model_file, tmp_path, capsys):
    """Audit: report.md showed no settings, named neither the painted masks (--resume needs the same) nor the
    LoRA a run continued, counted only this run's steps of a continued LoRA, and timed a resumed run as if whole.
    Its file list gives names in the folder (the paths were relative to where the command ran)."""
    from PIL import Image
    first = tmp_path / "first"
    assert cli.main(fnf_args(model_file, first, "--iterations", "2")) == 0
    mask = tmp_path / "mask.png"
    img = Image.new("L", (16, 16), 0)
    img.paste(255, (0, 0, 8, 16))
    img.save(mask)
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--continue-from", str(first / "lora.safetensors"), "--mask-source",
                             "mask", "--mask", str(mask), "--iterations", "1")) == 0
    md = (out / "report.md").read_text()
    assert f"- continued from: `{first / 'lora.safetensors'}` (the LoRA now holds 3 steps in all)" in md
    assert f"- painted mask: `{mask}`" in md and "- prompts (--prompt): 'a red circle'" in md and "- seeds: 0, 1" in md
    assert "- lam: 1.0" in md and "- mask_source: mask" in md and "- lora: `lora.safetensors`" in md
    report = json.loads((out / "report.json").read_text())
    assert report["mask_files"] == [str(mask)] and report["lora_steps_trained"] == 3
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, first, "--iterations", "3", "--resume", "--rank", "8")) == 0
    assert "(--rank/--targets not used)" in capsys.readouterr().err
    md = (first / "report.md").read_text()
    assert ("- steps trained (optimizer steps; `steps` below is the sampler's): 3 (" in md
            and "s in this run, which resumed at step 2)" in md)
    assert "- cfg_scale (--cfg): " in md and "- height (--size): 16" in md and "- steps: 3" in md
    sne = tmp_path / "sne"
    assert cli.main(["train-sne", "--model", str(model_file), "--out", str(sne), "--iterations", "1", "--resolution",
                     "4", "--prompt", "a red circle and a blue square | circle, square"]) == 0
    assert "- prompt 'a red circle and a blue square', objects circle, square" in (sne / "report.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (("--lr", "-1"), "error: --lr must be > 0, got -1.0"),
    # was a traceback from inside AdamW ("value cannot be converted to type float without overflow")
    (("--lr", "1e38"), "error: --lr must be at most 3.4e+37 (AdamW's first step, 10 lr, is a float32), got 1e+38"),
    (("--K", "0"), "error: --K (now 0) must be between 1 and --steps (now 20)"),
    # review health-10: the other setting a message names is a flag too
    (("--K", "2", "--lv-copies", "2"), "error: --lv-copies > 0 (DRaFT-LV) differentiates only the re-noised copies of "
                                       "the last step: set --K to 1 (now 2)"),
    (("--iterations", "0"), "error: --iterations must be a whole number >= 1, got 0"),
    (("--seed", "-1"), "error: --seed: -1 is outside 0 to"),
    (("--prompt", " ", "--prompt", ""), "error: --prompt is empty: give at least one non-empty prompt"),
    (("--model", "."), "error: --model '.' is a folder: give 'tiny' or a TinyModel .safetensors file"),
    (("--prompt", "a red circle\na blue square"), "error: --prompt 'a red circle\\na blue square' holds a line "
                                                   "break: give each prompt its own --prompt"),
])
def test_errors_name_the_flag_not_the_config_field(tmp_path, capsys, extra, message):
    """Audit: one-word settings were named as the config names them ("lr must be > 0", "prompts is empty"), the
    underscored ones as flags; a folder given as --model read as a missing file."""
    argv = ["train-fnf", "--reward", "artifact", "--out", str(tmp_path / "o"), *extra]
    if "--prompt" not in extra:
        argv += ["--prompt", "a red circle"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith(message)


def test_threads_after_the_command_is_taken_and_train_sne_has_a_size(model_file, tmp_path, capsys):
    """Audit: `train-sne ... --threads 2` was refused as unrecognized; train-sne had no --size, train-fnf had."""
    out = tmp_path / "sne"
    assert cli.main(["train-sne", "--model", str(model_file), "--out", str(out), "--iterations", "1", "--size", "32",
                     "--resolution", "8", "--threads", "1", "--prompt",
                     "a red circle and a blue square | circle, square"]) == 0
    config = json.loads((out / "report.json").read_text())["config"]
    assert (config["height"], config["width"]) == (32, 32)
    assert cli._threads_first(["train-fnf", "--threads=3", "--out", "o"]) == ["--threads=3", "train-fnf", "--out", "o"]


def test_an_earlier_output_that_cannot_be_removed_does_not_stop_training(model_file, tmp_path, monkeypatch, capsys):
    """The earlier outputs are removed at the first checkpoint, mid-training: a file another program holds (an
    image viewer on Windows) must cost a warning, not the run."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1")) == 0
    real = Path.unlink

    def held(self, missing_ok=False):
        if self.name == "before_after.png":
            raise PermissionError(13, "The process cannot access the file")
        return real(self, missing_ok=missing_ok)
    monkeypatch.setattr(Path, "unlink", held)
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, out, "--overwrite")) == 0
    err = capsys.readouterr().err
    assert "warning: could not remove the earlier run's before_after.png (The process cannot access the file)" in err
    assert json.loads((out / "report.json").read_text())["steps_trained"] == 3


def _padded_lora(src: Path, dst: Path, rank: int) -> None:
    """`src`'s LoRA at a higher `rank` (zero rows and columns added, alpha = rank): the same layers, a rank a new
    run would not be given."""
    tensors, meta = load_tensor_file_with_metadata(src)
    big = {}
    for k, v in tensors.items():
        if k.endswith("lora_down.weight"):
            v = torch.cat([v, torch.zeros(rank - v.shape[0], *v.shape[1:])])
        elif k.endswith("lora_up.weight"):
            v = torch.cat([v, torch.zeros(v.shape[0], rank - v.shape[1], *v.shape[2:])], 1)
        elif k.endswith(".alpha"):
            v = torch.tensor(float(rank))
        big[k] = v.contiguous()
    save_file(big, str(dst), {**meta, "ss_network_dim": str(rank), "ss_network_alpha": str(rank)})


def test_a_run_continued_from_a_lora_wider_than_its_layers_resumes_and_names_that_lora(model_file, tmp_path,
                                                                                        capsys):
    """A saved LoRA whose rank is above a layer's smaller size is read exactly (a new run may not choose that
    rank): the run continuing it resumed with "--rank must be at most 32 ... Lower the rank", a flag a resumed
    run does not use; and the resumed run's report lost the LoRA it continues."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli.main(fnf_args(model_file, first, "--iterations", "1")) == 0
    wide = tmp_path / "wide.safetensors"
    _padded_lora(first / "lora.safetensors", wide, 40)  # the model's attention layers are 16 or 32 wide
    assert cli.main(fnf_args(model_file, tmp_path / "new", "--rank", "40")) == 2
    assert "--rank must be at most" in capsys.readouterr().err
    assert cli.main(fnf_args(model_file, second, "--continue-from", str(wide), "--iterations", "2")) == 0
    state = torch.load(second / "state.pt", weights_only=True)
    assert json.loads(state["config"])["rank"] == 40
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, second, "--resume", "--iterations", "3")) == 0, capsys.readouterr().err
    report = json.loads((second / "report.json").read_text())
    assert (report["resumed_at_step"], report["steps_trained"]) == (2, 3)
    assert report["continued_from"] == str(wide) and report["lora_steps_trained"] == 4  # 1 + 3
    assert f"continued from: `{wide}` (the LoRA now holds 4 steps in all)" in (second / "report.md").read_text()
    _, meta = load_tensor_file_with_metadata(second / "lora.safetensors")
    assert (meta["ss_network_dim"], meta["focusfix_steps_trained"]) == ("40", "4")


def test_resume_of_a_run_above_the_highest_rank_names_the_state_not_rank(model_file, tmp_path, capsys):
    """A state an earlier version saved at rank 300 is refused naming state.pt, not "--rank", which a resumed
    run does not use."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1")) == 0
    state = torch.load(out / "state.pt", weights_only=True)
    state["config"] = json.dumps({**json.loads(state["config"]), "rank": 300})
    torch.save(state, out / "state.pt")
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, out, "--resume", "--iterations", "2")) == 2
    err = capsys.readouterr().err
    assert f"error: {out / 'state.pt'}: the run's rank 300 is above 256" in err and "--rank must" not in err, err


def test_continue_from_a_lora_above_the_highest_rank_names_the_file_not_rank(model_file, tmp_path, capsys):
    """A LoRA saved before the rank bound (e.g. --rank 300) is refused naming --continue-from: the config's own
    message said "--rank must be at most 256", a flag that run does not use."""
    first = tmp_path / "first"
    assert cli.main(fnf_args(model_file, first, "--iterations", "1")) == 0
    _padded_lora(first / "lora.safetensors", tmp_path / "big.safetensors", 300)
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, tmp_path / "more", "--continue-from", str(tmp_path / "big.safetensors"))) == 2
    err = capsys.readouterr().err
    assert f"error: --continue-from {tmp_path / 'big.safetensors'}: its rank 300 is above 256" in err, err


# -- a run folder across commands (review of the CLI's lifecycle, session 22) ---------------------------------------

def test_a_resumed_run_stopped_before_its_report_leaves_no_report_of_fewer_steps(model_file, tmp_path, monkeypatch,
                                                                                   capsys):
    """A resumed run stopped while its images were drawn (a second Ctrl-C, a SIGTERM) left the first run's report
    ("steps trained: 3", status done) and images beside a LoRA and state of 5 steps."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out)) == 0
    assert (out / "report.json").is_file() and (out / "before_0.png").is_file()

    def stopped(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_curves", stopped)
    assert cli.main(fnf_args(model_file, out, "--resume", "--iterations", "5")) == 130
    assert load_tensor_file_with_metadata(out / "lora.safetensors")[1]["focusfix_steps_trained"] == "5"
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 5
    left = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert not {"report.json", "report.md", "curves.png"} & set(left), left  # the images drawn: this run's
    monkeypatch.undo()
    assert cli.main(fnf_args(model_file, out, "--resume", "--iterations", "5")) == 0  # draws them again
    assert json.loads((out / "report.json").read_text())["steps_trained"] == 5


def test_a_resume_whose_state_another_run_replaced_meanwhile_is_refused(model_file, tmp_path, monkeypatch, capsys):
    """--resume read state.pt before it held the folder: a run with --overwrite that finished meanwhile was
    replaced by the state read earlier, without --overwrite."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1")) == 0
    other = tmp_path / "other"
    assert cli.main(fnf_args(model_file, other, "--iterations", "2")) == 0
    real_load = cli.load_model

    def meanwhile(*a, **k):  # another run finishes into --out while this one loads its model
        (out / "state.pt").write_bytes((other / "state.pt").read_bytes())
        (out / "lora.safetensors").write_bytes((other / "lora.safetensors").read_bytes())
        return real_load(*a, **k)
    monkeypatch.setattr(cli, "load_model", meanwhile)
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, out, "--resume", "--iterations", "3")) == 2
    assert f"{out / 'state.pt'} changed while this run started" in capsys.readouterr().err
    assert (out / "lora.safetensors").read_bytes() == (other / "lora.safetensors").read_bytes()


def test_continue_from_a_file_of_the_runs_own_outputs_is_refused(model_file, tmp_path, capsys):
    """--continue-from OUT/lora.safetensors: refused with a --resume hint that could not work (no state.pt, and
    --resume excludes --continue-from); with --overwrite the LoRA it continued was replaced, and the report named
    the new file as the one it continued."""
    first, out = tmp_path / "first", tmp_path / "run"
    assert cli.main(fnf_args(model_file, first, "--iterations", "1")) == 0
    out.mkdir()
    (out / "lora.safetensors").write_bytes((first / "lora.safetensors").read_bytes())
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, out, "--iterations", "1")) == 2
    err = capsys.readouterr().err
    assert "already holds ['lora.safetensors']" in err and "--resume" not in err, err  # no state.pt to resume
    assert cli.main(fnf_args(model_file, out, "--continue-from", str(out / "lora.safetensors"), "--overwrite")) == 2
    err = capsys.readouterr().err
    assert f"--continue-from {out / 'lora.safetensors'} is one of the files this run writes into --out" in err
    assert f"e.g. {out / 'input_lora.safetensors'}" in err
    assert (out / "lora.safetensors").read_bytes() == (first / "lora.safetensors").read_bytes()
    assert cli.main(fnf_args(model_file, tmp_path / "x", "--continue-from", str(first / "state.pt"))) == 2
    assert "a run's state.pt is continued with --resume and that run's --out" in capsys.readouterr().err
    assert cli.main(fnf_args(model_file, tmp_path / "x", "--continue-from", str(first))) == 2  # said "no such file"
    assert (f"--continue-from {first} is a folder: give the LoRA file in it (a run's lora.safetensors)"
            in capsys.readouterr().err)
    sft = tmp_path / "fix.sft"  # the short name io reads as safetensors too
    sft.write_bytes((first / "lora.safetensors").read_bytes())
    assert cli.main(fnf_args(model_file, tmp_path / "y", "--continue-from", str(sft), "--iterations", "1")) == 0


def test_a_failure_before_the_first_step_keeps_the_earlier_run(model_file, tmp_path, monkeypatch, capsys):
    """--overwrite, then out of memory (or NaN) in the first step: the earlier run's LoRA, report and images were
    removed and an untrained LoRA with a failed report written in their place (a Ctrl-C there keeps them)."""
    from focusfix_core.trainers import NonFiniteLossError
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def fails(self):
        raise NonFiniteLossError("loss is nan at step 1: stopped; lower lr")
    monkeypatch.setattr(cli.FixTrainer, "train_step", fails)
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, out, "--overwrite", "--lr", "0.5")) == 1
    err = capsys.readouterr().err
    assert f"loss is nan at step 1: stopped; lower lr\nno step finished: nothing was written into {out}" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_messages_name_the_command_and_flags_a_run_folder_needs(model_file, tmp_path, monkeypatch, capsys):
    """train-sne --resume in a train-fnf folder printed the note on its rank first, then "state is for method
    'focus-n-fix'" with no word of train-fnf; a resume refused for other settings named config fields
    ("batch_size 1 (now 2)"); a failure after a checkpoint printed "{'state': ...}"."""
    out = tmp_path / "run"
    real_step = cli.FixTrainer.train_step
    _interrupt_at(monkeypatch, cli.FixTrainer, 1)
    assert cli.main(fnf_args(model_file, out)) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(["train-sne", "--model", str(model_file), "--out", str(out), "--resume", "--prompt",
                     "a red circle and a blue square | circle, square"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out / 'state.pt'} is the state of a train-fnf run: resume it with train-fnf --resume\n"
    draft = tmp_path / "draft"  # plain DRaFT (method "draft") is a train-fnf run too
    assert cli.main(fnf_args(model_file, draft, "--mask-source", "none", "--lam", "0", "--iterations", "1")) == 0
    capsys.readouterr()
    assert cli.main(["train-sne", "--model", str(model_file), "--out", str(draft), "--resume", "--prompt",
                     "a red circle and a blue square | circle, square"]) == 2
    assert "is the state of a train-fnf run: resume it with train-fnf --resume" in capsys.readouterr().err
    # CLI bad-input hunt (session 27): DRaFT resumed as Focus-N-Fix (or back) said "method 'draft', not
    # 'focus-n-fix'", naming neither flag
    assert cli.main(fnf_args(model_file, draft, "--resume", "--iterations", "2")) == 2
    assert capsys.readouterr().err == (f"error: {draft / 'state.pt'} is the state of a plain DRaFT run (--lam 0.0 "
                                       f"--mask-source none): resume it with those\n")
    assert cli.main(fnf_args(model_file, out, "--resume", "--lam", "0")) == 2
    assert (f"{out / 'state.pt'} is the state of a Focus-N-Fix run (--lam 1.0 --mask-source saliency): resume it "
            f"with those") in capsys.readouterr().err
    assert cli.main(fnf_args(model_file, out, "--resume", "--batch-size", "1", "--lam", "0.5")) == 2
    err = capsys.readouterr().err
    assert "other settings: --batch-size 2 (now 1); --lam 1.0 (now 0.5)" in err, err
    # review (session 27): another --size was named "height 16 (now 32); ... width 16 (now 32)"
    assert cli.main(fnf_args(model_file, out, "--resume", "--size", "32", "--lr", "0.01")) == 2
    err = capsys.readouterr().err
    assert "other settings: --size 16 (now 32); --lr 0.002 (now 0.01)" in err and "width" not in err, err

    def bad_data(self):
        if self.step == 2:
            raise ValueError("the saliency mask of prompt 'a red circle', seed 1 is empty")
        return real_step(self)
    monkeypatch.setattr(cli.FixTrainer, "train_step", bad_data)
    assert cli.main(fnf_args(model_file, out, "--resume")) == 1
    err = capsys.readouterr().err
    assert f"stopped after 2 steps: {out / 'lora.safetensors'} holds their LoRA and {out / 'state.pt'} their " \
           f"state" in err, err


def test_only_the_item_images_a_run_writes_are_its_outputs(model_file, tmp_path, capsys):
    """before_00.png, which no run writes (it writes before_0.png), was refused as a --mask and removed by
    --overwrite."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "before_00.png").write_bytes(b"the artist's")
    assert cli.main(fnf_args(model_file, out, "--iterations", "1")) == 0
    assert cli.main(fnf_args(model_file, out, "--iterations", "1", "--overwrite")) == 0
    assert (out / "before_00.png").read_bytes() == b"the artist's"


@pytest.mark.parametrize("command, message, want", [
    ("train-fnf", "the heatmap mask of prompt 'a red circle', seed 3 is empty: the reward's heatmap of that image is "
     "flat. Paint the mask (mask_source mask), or set lam 0",
     "the heatmap mask of prompt 'a red circle', seed 3 is empty: the reward's heatmap of that image is flat. Paint "
     "the mask (--mask-source mask), or set --lam 0"),
    ("train-sne", "failed: out of device memory in training step 1 of 3: lower batch_size (now 4), then width and "
     "height (now 64x64)", "failed: out of device memory in training step 1 of 3: lower --batch-size (now 4), then "
     "--size (now 64)"),
    # the command line has one size for both
    ("train-fnf", "2 prompt(s) x 9 seed(s) = 18 items would hold 30.1 GiB of images: use fewer seeds or prompts, or a "
     "smaller width and height", "2 prompt(s) x 9 seed(s) = 18 items would hold 30.1 GiB of images: use fewer seeds "
     "or prompts, or a smaller --size"),
    ("train-fnf", "cannot read /data/width and height/mask.png: use a smaller width and height",
     "cannot read /data/width and height/mask.png: use a smaller --size"),
    # names in paths, quotes and words stay (a prompt is the artist's: 'a chess set --model and a pawn' was)
    ("train-fnf", "cannot read /tmp/batch_size/lam.png: 'mask_source' set the mask", "cannot read "
     "/tmp/batch_size/lam.png: 'mask_source' set the mask"),
    ("train-fnf", "prompt 'a chess set model and a pawn' names the object 'pawn' twice; prompt \"draw batch_size "
     "cats\"", "prompt 'a chess set model and a pawn' names the object 'pawn' twice; prompt \"draw batch_size "
     "cats\""),
    ("train-sne", "prompt line 'a sunset out at sea | boat' needs two objects; the reward's sunset out (now 2)",
     "prompt line 'a sunset out at sea | boat' needs two objects; the reward's sunset --out (now 2)"),
    ("train-fnf", "cannot read C:\\runs\\mask_source\\state.pt", "cannot read C:\\runs\\mask_source\\state.pt"),
    # CLI bad-input hunt (session 27): a resume with another --size named height and width; a setting given with
    # its value kept the config's spelling
    ("train-fnf", "the training state was saved by a run with other settings: height 16 (now 32); lr 0.002 (now 0.01); "
     "width 16 (now 32)", "the training state was saved by a run with other settings: --size 16 (now 32); --lr "
     "0.002 (now 0.01)"),
    ("train-fnf", "other settings: height 16 (now 32); width 16 (now 32)", "other settings: --size 16 (now 32)"),
    ("train-fnf", "prompt \"a red circle's seed='5'\" is refused", "prompt \"a red circle's seed='5'\" is refused"),
    ("train-sne", "preservation='keys' needs a LoRA only on cross-attention to_k / to_v (they read the text alone); "
     "targets 'attn' also adapt ['a']: use preservation='outputs' or targets='to_k'", "--preservation keys needs a "
     "LoRA only on cross-attention to_k / to_v (they read the text alone); --targets 'attn' also adapt ['a']: use "
     "--preservation outputs or --targets to_k"),
    ("train-sne", "prompt 'x' has colour='red' and /tmp/lr='1'", "prompt 'x' has colour='red' and /tmp/lr='1'"),
])
def test_settings_named_inside_a_message_are_named_by_their_flags(command, message, want):
    assert cli._as_flags(message, cli.build_parser(), command) == want


def test_on_a_file_system_that_ignores_case_a_mask_named_like_an_output_is_refused(model_file, tmp_path,
                                                                                     monkeypatch, capsys):
    """On macOS or Windows the run's before_0.png replaces a painted OUT/Before_0.png: refused as the output it is.
    (Linux tells the names apart: the two files are made here, and samefile answers as such a file system.)"""
    import os
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1")) == 0
    painted = out / "Before_0.png"
    painted.write_bytes((out / "before_0.png").read_bytes())
    assert not cli.is_output(painted, out)  # this file system tells them apart
    monkeypatch.setattr(os.path, "samefile", lambda a, b: str(a).lower() == str(b).lower())
    assert cli.is_output(painted, out) and not cli.is_output(out / "Notes.png", out)
    capsys.readouterr()
    assert cli.main(fnf_args(model_file, out, "--iterations", "1", "--overwrite", "--mask-source", "mask", "--mask",
                             str(painted))) == 2
    assert f"--mask {painted} is one of the files this run writes into --out" in capsys.readouterr().err


# --- found by mutation testing (session 25) ---

def test_a_missing_shipped_model_is_an_error_unless_a_random_one_is_allowed(monkeypatch):
    """`--model tiny` without the shipped weights must fail (a training run on random weights would be useless);
    only the demo (random_ok) falls back to a random model, and says so."""
    import focusfix_core.tiny.model as tm

    def missing():
        raise FileNotFoundError("shipped tiny weights missing")
    monkeypatch.setattr(tm, "load_default_model", missing)
    with pytest.raises(FileNotFoundError, match="shipped tiny weights missing"):
        cli.load_model("tiny")
    model, note = cli.load_model("tiny", random_ok=True)
    assert "RANDOMLY INITIALISED" in note and isinstance(model, tm.TinyModel)


def test_a_resumed_run_clears_only_the_reports_and_images_not_the_lora_and_state_it_goes_on_from(tmp_path):
    """Before a resumed run's first write the earlier reports/images go, but lora.safetensors and state.pt stay
    until the run replaces them (a crash right after must not lose the LoRA it resumed from)."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("lora.safetensors", "state.pt", "report.json", "report.md", "before_0.png", "curves.png",
                 "notes.txt"):
        (out / name).write_bytes(b"x")
    cli.clear_earlier_outputs(out, resumed=True)
    assert sorted(p.name for p in out.iterdir()) == ["lora.safetensors", "notes.txt", "state.pt"]
    cli.clear_earlier_outputs(out)  # a new run (--overwrite): every output goes, the user's own files stay
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_checkpoint_every_n_saves_state_after_every_nth_step_and_at_the_end(model_file, tmp_path, monkeypatch):
    """--checkpoint-every 2 writes state.pt after steps 2 and 4 (not 1 and 3), then once more at the end."""
    saved_at = []
    real = cli.FixTrainer.save_state

    def spy(self, path):
        saved_at.append(self.step)
        return real(self, path)
    monkeypatch.setattr(cli.FixTrainer, "save_state", spy)
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--iterations", "5", "--checkpoint-every", "2", "--seeds", "0",
                             "--batch-size", "1")) == 0
    assert saved_at == [2, 4, 5]


def test_an_overwriting_run_clears_the_earlier_outputs_before_its_first_checkpoint(model_file, tmp_path, monkeypatch):
    """--overwrite: the earlier run's report and images go before the first state.pt is written mid-training, so a
    run killed after that checkpoint never leaves the earlier report beside its own state."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1")) == 0
    assert (out / "report.json").is_file()
    _interrupt_at(monkeypatch, cli.FixTrainer, 1, RuntimeError("the process is killed here"))
    with pytest.raises(RuntimeError, match="killed here"):
        cli.main(fnf_args(model_file, out, "--overwrite"))
    assert (out / "state.pt").is_file()
    assert not (out / "report.json").exists() and not (out / "before_0.png").exists()


def test_once_a_checkpoint_is_written_the_folder_always_holds_a_state_to_resume(model_file, tmp_path, monkeypatch):
    """Each later state.pt replaces the previous one (atomically): a run killed at any moment after its first
    checkpoint leaves a state.pt for --resume (the earlier outputs are cleared once, before the first write)."""
    out = tmp_path / "run"
    seen = []
    real = cli.FixTrainer.save_state

    def spy(self, path):
        seen.append((self.step, (out / "state.pt").is_file()))
        return real(self, path)
    monkeypatch.setattr(cli.FixTrainer, "save_state", spy)
    assert cli.main(fnf_args(model_file, out, "--seeds", "0", "--batch-size", "1")) == 0
    assert seen == [(1, False), (2, True), (3, True), (3, True)]


def test_the_report_measures_the_change_inside_and_outside_the_mask(model_file, tmp_path, monkeypatch):
    """mean_abs_change_inside_mask is the change where M is white, _outside_ where it is black; mask_coverage
    the white share."""
    def drawn(self, progress=None):
        I0 = torch.full((2, 3, 16, 16), 0.5)
        M = torch.zeros(2, 1, 16, 16)
        M[..., :, :4] = 1.0  # a quarter of each image may change
        return I0, I0 + 0.2 * M, M
    monkeypatch.setattr(cli.FixTrainer, "before_after", drawn)
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mean_abs_change_inside_mask"] == pytest.approx(0.2, abs=1e-6)
    assert report["mean_abs_change_outside_mask"] == pytest.approx(0.0, abs=1e-6)
    assert report["mask_coverage"] == pytest.approx(0.25)


def test_the_report_measures_the_change_on_the_images_as_saved(model_file, tmp_path, monkeypatch):
    """The change inside/outside was measured on the unclamped decodes, while the PNGs, the scores and Compare use
    [0,1] images: an overshoot that moved (-0.3 -> -0.1) counted as change no saved image shows (review
    health-5). An inf image is still reported as failed, though the clamp makes it 1."""
    def drawn(self, progress=None):
        M = torch.zeros(2, 1, 16, 16)
        M[..., :, :4] = 1.0
        I0 = torch.where(M.bool(), 0.5, -0.3).expand(2, 3, 16, 16).clone()
        I = torch.where(M.bool(), 0.7, -0.1).expand(2, 3, 16, 16).clone()
        return I0, I, M
    monkeypatch.setattr(cli.FixTrainer, "before_after", drawn)
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mean_abs_change_inside_mask"] == pytest.approx(0.2, abs=1e-6)
    assert report["mean_abs_change_outside_mask"] == 0.0
    monkeypatch.setattr(cli.FixTrainer, "before_after", lambda self, progress=None: (
        torch.zeros(1, 3, 16, 16), torch.full((1, 3, 16, 16), float("inf")), torch.ones(1, 1, 16, 16)))
    assert cli.main(fnf_args(model_file, tmp_path / "inf", "--seeds", "0", "--iterations", "1")) == 1
    report = json.loads((tmp_path / "inf" / "report.json").read_text())
    assert "the LoRA draws non-finite images" in report["status"]


def test_the_report_notes_a_full_mask_and_a_run_already_at_its_reward_target(model_file, tmp_path):
    """The node's report says when M holds nothing and when no step moved the LoRA; the command line's said
    neither: --threshold 1 or --reward-target -1000 read as an ordinary run (review extreme-F3)."""
    out = tmp_path / "full"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1", "--seeds", "0", "--threshold", "1")) == 0
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert "M[0] is full (every value 1): nothing is held: Focus-N-Fix becomes plain DRaFT" in notes
    assert "- note: M[0] is full" in (out / "report.md").read_text()
    out = tmp_path / "reached"
    assert cli.main(fnf_args(model_file, out, "--iterations", "2", "--seeds", "0", "--reward-target", "-1000")) == 0
    report = json.loads((out / "report.json").read_text())
    (note,) = [n for n in report["notes"] if n.startswith("the LoRA did not change")]
    assert "already at or above --reward-target (-1000;" in note and "leave it out to never stop" in note
    assert not any(n.startswith("M[") for n in report["notes"])  # a mask that holds: no note


def test_the_report_weighs_a_soft_mask_by_its_values(model_file, tmp_path, monkeypatch):
    """Review (session 27): a faint mask (0.4, now trained as it is) was split at 0.5 in the report: coverage 0,
    change inside 0 and all its change counted outside. Weighed by M and 1 - M, as the region term and Compare
    weigh it; an empty region is null, not 0."""
    def drawn(self, progress=None):
        I0 = torch.full((2, 3, 16, 16), 0.5)
        M = torch.zeros(2, 1, 16, 16)
        M[..., :, :8] = 0.4
        D = torch.zeros(2, 1, 16, 16)
        D[..., :, :8], D[..., :, 8:] = 0.3, 0.1
        return I0, I0 + D, M
    monkeypatch.setattr(cli.FixTrainer, "before_after", drawn)
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mean_abs_change_inside_mask"] == pytest.approx(0.3, abs=1e-6)  # sum(0.3 * 0.4) / sum(0.4)
    assert report["mean_abs_change_outside_mask"] == pytest.approx((0.3 * 0.6 + 0.1) / 1.6, abs=1e-6)
    assert report["mask_coverage"] == pytest.approx(0.2)
    monkeypatch.setattr(cli.FixTrainer, "before_after", lambda self, progress=None: (
        torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), torch.ones(1, 1, 16, 16)))
    assert cli.main(fnf_args(model_file, tmp_path / "full", "--seeds", "0", "--iterations", "1")) == 0
    report = json.loads((tmp_path / "full" / "report.json").read_text())
    assert report["mean_abs_change_outside_mask"] is None and report["mean_abs_change_inside_mask"] == 0.0


@pytest.mark.parametrize("size, message", [("4", "--size must be at least 8 pixels, got 4"),
                                           ("34", "--size must be a multiple of 4"),
                                           # was the system's out-of-memory kill at 24 GB, nothing printed
                                           ("4096", "--size must be at most 256 pixels for this model (it draws "
                                                    "at 32 px;")])
def test_a_size_the_tiny_unet_cannot_take_is_refused_by_name(tmp_path, capsys, size, message):
    argv = ["train-fnf", "--prompt", "a red circle", "--reward", "artifact", "--out", str(tmp_path / "o"),
            "--size", size]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_empty_painted_mask_trains_with_lam_0(model_file, tmp_path):
    """An all-black mask is refused only when the region term holds it (lam > 0); with --lam 0 (plain DRaFT) it
    is no error."""
    from PIL import Image
    black = tmp_path / "black.png"
    Image.new("L", (16, 16), 0).save(black)
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--mask-source", "mask", "--mask", str(black), "--lam", "0",
                             "--iterations", "1")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "done"
    # review (session 27): the node says a mask is not used with lam 0; the command line said nothing
    assert report["notes"] == ["--lam 0: plain DRaFT, the whole image may change; M (--mask) is not used in "
                               "training, only in the report's change inside and outside it"]


def test_a_continued_sne_runs_before_maps_are_the_base_models(model_file, tmp_path):
    """The 'before' values of Separate-and-Enhance are measured on the base model, also when the run continues a
    saved LoRA (whose own maps are the first run's 'after')."""
    sne = ["train-sne", "--model", str(model_file), "--iterations", "2", "--lr", "0.05", "--resolution", "8",
           "--prompt", "a red circle and a blue square | circle, square"]
    assert cli.main([*sne, "--out", str(tmp_path / "s1")]) == 0
    assert cli.main([*sne, "--out", str(tmp_path / "s2"), "--iterations", "1", "--lr", "1e-9", "--continue-from",
                     str(tmp_path / "s1" / "lora.safetensors")]) == 0
    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("s1", "s2"))
    assert r1["separate_before"] != r1["separate_after"], "the first run must change the maps"
    assert r2["separate_before"] == pytest.approx(r1["separate_before"], rel=1e-5)
    assert r2["enhance_before"] == pytest.approx(r1["enhance_before"], rel=1e-5)


def test_an_output_path_that_cannot_be_written_is_exit_2_naming_it(tmp_path, monkeypatch, capsys):
    """An OSError from writing the outputs (no permission, a folder where a file goes) is bad input, exit 2, naming
    the path; not exit 1 (a run that failed mid-way)."""
    out = tmp_path / "o"

    def cannot_write(*a, **k):
        raise IsADirectoryError(21, "Is a directory", str(out / "lora.safetensors"))
    monkeypatch.setattr(cli, "run_fix", cannot_write)
    assert cli.main(["train-fnf", "--prompt", "a red circle", "--reward", "artifact", "--out", str(out)]) == 2
    assert f"error: cannot write {out / 'lora.safetensors'}: Is a directory (check --out" in capsys.readouterr().err


def _action(command, dest):
    parser = cli.build_parser()
    actions = parser._actions
    if command is not None:
        actions = next(a for a in actions if isinstance(a, argparse._SubParsersAction)).choices[command]._actions
    return next(a for a in actions if a.dest == dest)


@pytest.mark.parametrize("command, dest, value, shown", [
    (None, "threads", 1, "default 1"),
    ("train-fnf", "iterations", 40, "default 40"),
    ("train-fnf", "lr", 2e-3, "default 2e-3"),
    ("train-fnf", "rank", 4, "default 4"),
    ("train-fnf", "targets", "attn", "default attn"),
    ("train-fnf", "batch_size", 2, "default 2"),
    ("train-fnf", "seed", 0, "default 0"),
    ("train-fnf", "checkpoint_every", 10, "default 10"),
    ("train-fnf", "seeds", (0, 1, 2, 3), "default 0-3"),
    ("train-fnf", "lam", 1.0, "default 1"),
    ("train-fnf", "reward_target", None, "default: unbounded"),
    ("train-fnf", "K", 1, "default 1"),
    ("train-fnf", "lv_copies", 0, "default 0"),
    ("train-fnf", "steps", 20, "default 20"),
    ("train-fnf", "sampler_name", "ddim", "default ddim"),
    ("train-fnf", "scheduler", "normal", "default normal"),
    ("train-fnf", "cfg", 3.0, "default 3"),
    ("train-fnf", "negative_prompt", "", "default none"),
    ("train-fnf", "mask_source", None, "default heatmap, or mask with --mask"),
    ("train-fnf", "threshold_mode", "top_percent", "default top_percent"),
    ("train-fnf", "threshold", 0.15, "default 0.15"),
    ("train-fnf", "dilation", 2, "default 2"),
    ("train-fnf", "saliency_method", "grad", "default grad"),
    ("train-fnf", "size", None, "default: the model's"),
    ("train-sne", "targets", "to_k", "default to_k"),
    ("train-sne", "lam_sep", 1.0, "default 1"),
    ("train-sne", "lam_en", 1.0, "default 1"),
    ("train-sne", "lam_preserve", 1.0, ""),
    ("train-sne", "preservation", "auto", "auto: keys where possible"),
    ("train-sne", "resolution", 16, "default 16"),
    ("demo", "out", Path("focusfix_demo"), "default focusfix_demo"),
])
def test_each_default_is_the_one_its_help_names(command, dest, value, shown):
    """A flag left out takes the default its --help states (a changed default trained other settings silently)."""
    action = _action(command, dest)
    assert action.default == value and type(action.default) is type(value), (dest, action.default)
    assert shown in action.help, action.help


def test_train_fnf_flags_reach_the_runs_config_and_report(model_file, tmp_path):
    """--scheduler, --cfg, --threshold-mode, --threshold, --dilation are the run's settings; report.json names the
    model file and the FocusFix version; report.md gives its figures to 4 places and each item's own seed."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--scheduler", "karras", "--cfg", "2.5", "--threshold-mode", "value",
                             "--threshold", "0.4", "--dilation", "1", "--iterations", "1", "--seeds", "3",
                             "--batch-size", "1", "--steps", "2")) == 0
    report = json.loads((out / "report.json").read_text())
    config = report["config"]
    assert (config["scheduler"], config["cfg_scale"], config["threshold_mode"], config["threshold"],
            config["dilation"]) == ("karras", 2.5, "value", 0.4, 1)
    assert report["model"] == f"tiny model from {model_file}"
    assert report["focusfix_version"] == __version__
    md = (out / "report.md").read_text()
    assert f"- mean reward before: {report['mean_reward_before']:.4f}\n" in md
    assert f"- mean reward after: {report['mean_reward_after']:.4f}\n" in md
    assert "- 0: prompt 'a red circle', seed 3: `before_0.png`, `after_0.png`" in md


def test_train_sne_flags_reach_the_run_and_its_report_counts_the_steps_done(model_file, tmp_path, monkeypatch):
    """--lam-sep, --lam-en, --lam-preserve, --preservation and --seed are the run's settings; the report gives the
    preservation the run used (auto resolved) and, after a Ctrl-C, the steps done, not the steps asked for."""
    sne = ["train-sne", "--model", str(model_file), "--resolution", "8", "--prompt", SNE_PROMPT]
    out = tmp_path / "set"
    assert cli.main([*sne, "--out", str(out), "--iterations", "1", "--lam-sep", "2", "--lam-en", "0.5",
                     "--lam-preserve", "0.25", "--preservation", "outputs", "--seed", "3"]) == 0
    config = json.loads((out / "report.json").read_text())["config"]
    assert (config["lam_sep"], config["lam_en"], config["lam_preserve"], config["preservation"], config["seed"]) \
        == (2.0, 0.5, 0.25, "outputs", 3)
    _interrupt_at(monkeypatch, cli.SeparateEnhanceTrainer, 1)
    out = tmp_path / "stopped"
    assert cli.main([*sne, "--out", str(out), "--iterations", "3"]) == 130
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted after 1 steps" and report["steps_trained"] == 1
    assert "- steps trained: 1 (" in (out / "report.md").read_text()  # S&E has no sampler `steps` setting
    assert report["config"]["preservation"] == "auto" and report["preservation"] == "keys"
    md = (out / "report.md").read_text()
    assert "- preservation: auto (keys)\n" in md  # what auto chose, as report.json and the LoRA say (extreme-F4)
    assert "- preservation: outputs\n" in (tmp_path / "set" / "report.md").read_text()


def test_report_md_shows_drafts_lv_copies_when_on(model_file, tmp_path):
    """A DRaFT-LV run's report.md read like a plain K=1 run: lv_copies was always left out (review extreme-F4)."""
    out = tmp_path / "lv"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1", "--seeds", "0", "--lv-copies", "2")) == 0
    assert "- lv_copies: 2\n" in (out / "report.md").read_text()
    out = tmp_path / "plain"
    assert cli.main(fnf_args(model_file, out, "--iterations", "1", "--seeds", "0")) == 0
    assert "lv_copies" not in (out / "report.md").read_text()


def test_a_carriage_return_inside_a_prompt_is_a_line_break_but_one_at_its_end_is_not(model_file, tmp_path,
                                                                                     capsys):
    """A prompt holding '\\r' (a Windows line break) is refused as two prompts in one; a line break at its end (a
    prompt read from a file) is the one prompt."""
    assert cli.main(fnf_args(model_file, tmp_path / "o", "--prompt", "a red circle\ra blue square")) == 2
    assert "holds a line break: give each prompt its own --prompt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    cli._check_prompts(TinyModel.load(model_file), ["a red circle\n", "\ta blue square \r\n"])  # no error


def test_convert_reward_prints_the_file_it_wrote_takes_any_case_of_the_suffix_and_names_a_folder(tmp_path, capsys):
    """convert-reward prints `output: PATH`; OUT.SAFETENSORS is a safetensors name too; an output that is a
    folder (named like a file) is refused saying so, with the file to give instead."""
    src = tmp_path / "head.pth"
    torch.save(head_sd(), src)  # a lone aesthetic head: converts
    dst = tmp_path / "HEAD.SAFETENSORS"
    assert cli.main(["convert-reward", str(src), str(dst)]) == 0
    assert f"output: {dst}\n" in capsys.readouterr().out
    assert dst.is_file()
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    for extra in ([], ["--overwrite"]):
        assert cli.main(["convert-reward", str(src), str(folder), *extra]) == 2
        assert f"error: output {folder} is a folder: give the file to write, e.g. {folder / 'reward.safetensors'}" \
            in capsys.readouterr().err
    assert folder.is_dir() and not any(folder.iterdir())


def test_checkpoint_every_minus_1_is_refused(model_file, tmp_path, capsys):
    """Every negative --checkpoint-every is refused by name (-1 would save the state after every step)."""
    assert cli.main(fnf_args(model_file, tmp_path / "c", "--checkpoint-every", "-1")) == 2
    assert "--checkpoint-every must be >= 0 (0 = at the end only), got -1" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_the_batch_note_counts_only_the_non_empty_prompts(model_file, tmp_path, capsys):
    """A blank --prompt is no item: --batch-size 2 over one real prompt and one seed is noted as larger than the
    1 item there is."""
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--prompt", " ", "--seeds", "0", "--batch-size", "2",
                             "--iterations", "1", "--steps", "2")) == 0
    assert "note: --batch-size 2 is more than the 1 (prompt, seed) items" in capsys.readouterr().err


def test_a_run_of_exactly_grid_items_items_shows_them_all(model_file, tmp_path, monkeypatch):
    """The grid's 'rows: the first N of M items' appears only when items were left out of it."""
    monkeypatch.setattr(cli, "GRID_ITEMS", 2)
    out = tmp_path / "run"
    assert cli.main(fnf_args(model_file, out, "--seeds", "0,1", "--iterations", "1", "--steps", "2")) == 0
    assert "rows: the first" not in (out / "report.md").read_text()
    out = tmp_path / "three"
    assert cli.main(fnf_args(model_file, out, "--seeds", "0-2", "--iterations", "1", "--steps", "2")) == 0
    assert "rows: the first 2 of the 3 items" in (out / "report.md").read_text()


def test_a_demo_stopped_in_focus_n_fix_prints_its_files_by_stage(tmp_path, monkeypatch, capsys):
    """The files a demo stopped in Focus-N-Fix prints are named by stage (focus_n_fix_lora: ...), as a finished
    demo's are."""
    _interrupt_at(monkeypatch, cli.FixTrainer, 1)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 130
    printed = capsys.readouterr().out
    assert f"focus_n_fix_lora: {out / 'focus_n_fix' / 'lora.safetensors'}\n" in printed, printed
    assert f"focus_n_fix_state: {out / 'focus_n_fix' / 'state.pt'}\n" in printed
