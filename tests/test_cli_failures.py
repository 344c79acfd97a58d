"""The command line on runs that go wrong and on bad arguments (standards audit, findings 1, 7, 9, 13)."""
import io
import json

import pytest

from focusfix_core import cli


def test_a_lora_that_draws_nan_images_is_reported_and_exits_1(tmp_path, capsys):
    """lr 1e30: step 1 leaves finite but huge weights, step 2 draws NaN images. The last good LoRA still draws
    NaN, and scoring its after images raised: exit 2 and no report. Now the run is reported as failed, its scores
    are null, every output is written, and the exit code is 1."""
    out = tmp_path / "nan"
    rc = cli.main(["train-fnf", "--prompt", "a red circle", "--reward", "artifact", "--iterations", "6", "--steps", "4",
                   "--seeds", "0,1", "--batch-size", "1", "--lr", "1e30", "--out", str(out)])
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == ["after_0.png", "after_1.png", "before_0.png", "before_1.png",
                                                     "before_after.png", "curves.png", "lora.safetensors",
                                                     "report.json", "report.md", "state.pt"]
    report = json.loads((out / "report.json").read_text())
    assert report["status"].startswith("failed: ") and "the LoRA draws non-finite images" in report["status"]
    assert report["mean_reward_after"] is None and report["mean_reward_before"] is not None
    assert "non-finite" in capsys.readouterr().err


def test_a_flat_map_of_an_item_training_never_met_is_a_note_not_exit_2(tmp_path, monkeypatch):
    """The empty mask of an item first drawn after training (many seeds, few steps) ended the run with exit 2, no
    report.json and no images, though the LoRA was trained (review C3). It is now a note in the report."""
    real = cli.FixTrainer.before_after

    def flat_from_now(self, *a, **kw):
        self.reward.heatmap = lambda I: I[:, :1] * 0  # flat for every image drawn after training
        return real(self, *a, **kw)
    monkeypatch.setattr(cli.FixTrainer, "before_after", flat_from_now)
    out = tmp_path / "late"
    rc = cli.main(["train-fnf", "--prompt", "a red circle", "--reward", "artifact", "--iterations", "1", "--steps",
                   "3", "--seeds", "0-2", "--batch-size", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "done" and len(report["notes"]) == 2 and len(report["items"]) == 3
    assert all("no mask (its reward heatmap is flat); training never drew it" in n for n in report["notes"])
    assert "- note: prompt 'a red circle', seed" in (out / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--size", "33"], "--size must be a multiple of 4"),
    (["--seeds", "18446744073709551616"], "outside 0 to 18446744073709551615"),
    (["--seeds", "-1"], "outside 0 to 18446744073709551615"),
])
def test_bad_arguments_are_named_before_anything_runs(tmp_path, capsys, args, message):
    argv = ["train-fnf", "--prompt", "a red circle", "--reward", "artifact", "--out", str(tmp_path / "o"), *args]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse refuses a --seeds it cannot parse
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_the_bar_of_a_resumed_run_times_this_runs_steps_only(monkeypatch):
    clock = iter([0.0, 10.0])
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    stream.isatty = lambda: True
    bar = cli.ProgressBar(10, "fix", stream=stream, start=6)  # resumed after 6 steps
    bar.update(8)  # 2 steps in 10 s: 5 s/it, 2 left
    assert "5.00s/it ETA 10s" in stream.getvalue()


def test_a_checkpoint_that_cannot_be_written_does_not_stop_the_run(tmp_path, capsys, monkeypatch):
    """A full disk at the 2nd state.pt lost steps 3-4 and the LoRA (exit 2, naming a temp file that no longer
    existed). The run now goes on and writes every output once the disk has room again."""
    from focusfix_core import io as ffio
    real, calls = ffio.torch.save, []

    def full_on_second(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(f))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(ffio.torch, "save", full_on_second)
    out = tmp_path / "o"
    rc = cli.main(["train-fnf", "--prompt", "a red circle", "--reward", "artifact", "--iterations", "4", "--steps", "3",
                   "--seeds", "0", "--batch-size", "1", "--checkpoint-every", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "warning: state.pt after step 2 was not written" in err and f"{out / 'state.pt'}" in err
    assert ".tmp" not in err
    assert json.loads((out / "report.json").read_text())["steps_trained"] == 4


def test_a_windows_console_encoding_does_not_crash_the_cli(tmp_path):
    """On Windows, output to a pipe or file is cp1252: `--help` (its λ) and errors quoting a prompt crashed with a
    UnicodeEncodeError. They now print, with what cp1252 cannot hold escaped."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    run = subprocess.run([sys.executable, "-m", "focusfix_core", "train-fnf", "--help"], env=env,
                         capture_output=True)
    assert run.returncode == 0, run.stderr.decode("cp1252")
    assert b"lam (\\u03bb)" in run.stdout
    run = subprocess.run([sys.executable, "-m", "focusfix_core", "train-fnf", "--prompt", "一只猫", "--reward",
                          "nope", "--out", str(tmp_path / "o")], env=env, capture_output=True)
    assert run.returncode == 2 and b"error: --reward 'nope'" in run.stderr
