"""The command line on runs that go wrong and on bad arguments (standards audit, findings 1, 7, 9, 13)."""
import io
import json

import pytest
import torch

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


def test_ctrl_c_while_torch_loads_exits_130_without_a_traceback():
    """Ctrl-C in the seconds `python -m focusfix_core` spends importing torch printed Python's traceback. It now
    prints one line and exits 130, as a Ctrl-C later does (the import is made to raise it, so no timing is
    involved)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = ("import importlib.abc, runpy, sys\n"
              "class CtrlC(importlib.abc.MetaPathFinder):\n"
              "    def find_spec(self, name, path, target=None):\n"
              "        if name == 'focusfix_core.cli':\n"
              "            raise KeyboardInterrupt\n"
              "sys.meta_path.insert(0, CtrlC())\n"
              "sys.argv = ['focusfix_core', 'demo', '--out', 'x']\n")
    # `python -m focusfix_core`, and the `focusfix` command pyproject installs (its entry point, called as the
    # installed script calls it)
    tomllib = pytest.importorskip("tomllib", reason="tomllib comes with Python 3.11")
    entry = tomllib.loads((Path(cli.__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = entry["focusfix"].split(":")
    starts = ["runpy.run_module('focusfix_core', run_name='__main__')\n",
              f"import importlib; sys.exit(importlib.import_module({module!r}).{func}())\n"]
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    for start in starts:
        run = subprocess.run([sys.executable, "-c", script + start], env=env, capture_output=True, text=True)
        assert run.returncode == 130, (start, run.stderr)
        assert "Traceback" not in run.stderr and "interrupted while starting" in run.stderr


def test_a_sigterm_ends_training_as_ctrl_c_does(tmp_path, capsys, monkeypatch):
    """`kill`, `timeout` or a job scheduler's stop (SIGTERM) ended the process at once: every step since the last
    state.pt was lost, and with --checkpoint-every 0 the whole run (review G5). The steps done are now written, as
    after a Ctrl-C; the handler is the one it was once main() returns."""
    import os
    import signal

    if not hasattr(signal, "SIGTERM") or os.name == "nt":
        pytest.skip("os.kill(SIGTERM) ends the process on Windows; the handler is only reached on POSIX")
    before = signal.getsignal(signal.SIGTERM)
    real = cli.FixTrainer._finish_step

    def term_at_step_2(self, *a, **kw):
        rec = real(self, *a, **kw)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return rec
    monkeypatch.setattr(cli.FixTrainer, "_finish_step", term_at_step_2)
    out = tmp_path / "o"
    rc = cli.main(["train-fnf", "--prompt", "a red circle", "--reward", "artifact", "--iterations", "6", "--steps",
                   "3", "--seeds", "0", "--batch-size", "1", "--out", str(out)])
    assert rc == 130, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted after 2 steps" and report["steps_trained"] == 2
    assert (out / "lora.safetensors").is_file() and (out / "state.pt").is_file()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_state_pt_that_cannot_be_written_at_the_end_keeps_the_lora(tmp_path, capsys, monkeypatch):
    """state.pt was written before the LoRA: on a full disk (or a folder named state.pt) the run exited 2 with no
    LoRA, though the LoRA is smaller and what the run is for (review G2). The LoRA is now written first; the run
    is reported as failed (exit 1), its report names no state file, and no note offers --resume."""
    from focusfix_core import io as ffio

    def full(obj, f, *a, **k):  # torch.save's own error on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(ffio.torch, "save", full)
    monkeypatch.setattr(ffio.shutil, "disk_usage", lambda p: ffio.shutil._ntuple_diskusage(10**9, 10**9, 0))
    out = tmp_path / "o"
    rc = cli.main(["train-fnf", "--prompt", "a red circle", "--reward", "artifact", "--iterations", "2", "--steps",
                   "3", "--seeds", "0", "--batch-size", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"warning: {out / 'state.pt'} was not written (No space left on device" in err
    assert "--resume continues it" not in err
    report = json.loads((out / "report.json").read_text())
    assert report["status"].startswith("failed: ") and report["steps_trained"] == 2
    assert "state" not in report["files"] and not (out / "state.pt").exists()
    assert (out / "lora.safetensors").is_file()


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_a_read_only_output_is_refused_before_training(tmp_path, capsys, monkeypatch, flag):
    """A save keeps a read-only file (Windows always did): --overwrite or --resume onto a read-only lora.safetensors
    trained, then could not write the LoRA (exit 2, the steps lost). Refused before training now."""
    out = tmp_path / "o"
    args = ["train-fnf", "--prompt", "a red circle", "--reward", "artifact", "--iterations", "1", "--steps", "3",
            "--seeds", "0", "--out", str(out)]
    assert cli.main(args) == 0
    lora = out / "lora.safetensors"
    before = lora.read_bytes()
    lora.chmod(0o444)
    monkeypatch.setattr(cli.FixTrainer, "train_step", lambda self: pytest.fail("trained"))
    try:
        capsys.readouterr()
        assert cli.main([*args, "--iterations", "2", flag]) == 2  # the last --iterations counts
        err = capsys.readouterr().err
        assert f"{out} holds ['lora.safetensors'], marked read-only: a run into it replaces its outputs. Make " \
               f"them writable" + ("" if flag == "--resume" else ", or choose another --out") + "\n" in err, err
        assert lora.read_bytes() == before
    finally:
        lora.chmod(0o644)


def test_an_out_that_is_a_dangling_link_is_refused_before_training(tmp_path, capsys):
    """A dangling symlink --out passed the checks, trained, then failed with "'o' is a file, not a folder" and
    nothing saved (review G2)."""
    out = tmp_path / "o"
    try:
        out.symlink_to(tmp_path / "gone", target_is_directory=True)
    except OSError:
        pytest.skip("this user cannot create symlinks")
    rc = cli.main(["train-fnf", "--prompt", "a red circle", "--reward", "artifact", "--iterations", "1", "--steps",
                   "3", "--seeds", "0", "--out", str(out)])
    assert rc == 2
    assert "which does not exist: create that folder, or give another --out" in capsys.readouterr().err


@pytest.mark.parametrize("command, prompt, message", [
    # <unk> for every unknown word: trained silently on what the model cannot read (review I2)
    ("train-fnf", "a photo of a cat", "--prompt 'a photo of a cat': the tiny model does not know ['photo', 'of', "
                                      "'cat']; it knows only the words"),
    # the help's own example failed with "word 'cat' not found ... (a word must be written as in the prompt)"
    ("train-sne", "a cat and a dog | cat, dog", "--prompt 'a cat and a dog': the tiny model does not know ['cat', "
                                                "'dog']"),
    ("train-fnf", " ".join(["a red circle and"] * 5), "has 20 words; the tiny model reads at most"),
])
def test_a_prompt_the_tiny_model_cannot_read_is_refused(tmp_path, capsys, command, prompt, message):
    reward = ["--reward", "artifact"] if command == "train-fnf" else []
    rc = cli.main([command, "--prompt", prompt, "--out", str(tmp_path / "o"), "--iterations", "1", *reward])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "'circle'" in err or "reads at most" in err  # the vocabulary is listed
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    # config field names where the user typed flags (review I5)
    (["--batch-size", "0"], "error: --batch-size must be"),
    (["--lv-copies", "1", "--K", "2"], "error: --lv-copies "),
    (["--resume"], "--resume: {out}/state.pt does not exist, so there is no run to resume"),
    (["--continue-from", "{out}/none.safetensors"], "--continue-from {out}/none.safetensors: no such file"),
])
def test_errors_name_the_flags_the_user_typed(tmp_path, capsys, args, message):
    out = tmp_path / "o"
    args = [a.format(out=out) for a in args]
    rc = cli.main(["train-fnf", "--prompt", "a red circle", "--reward", "artifact", "--iterations", "1", "--steps",
                   "3", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message.format(out=out) in err, err


def test_the_load_reward_nodes_builtin_names_work_on_the_command_line():
    """`--reward builtin:sharpness` (the Load Reward node's name for it) was "neither a known reward" (review I6)."""
    from focusfix_core.rewards.loading import BUILTIN_REWARDS
    for name in BUILTIN_REWARDS:
        assert type(cli.load_reward_spec(f"builtin:{name}")) is type(cli.load_reward_spec(name))
    with pytest.raises(ValueError, match="neither a known reward"):
        cli.load_reward_spec("builtin:artifacts")


def test_ctrl_c_before_training_says_nothing_was_written(tmp_path, monkeypatch, capsys):
    """CLI bad-input hunt (session 27): a Ctrl-C while the model loaded said "the folder keeps what was finished
    (lora.safetensors once training ended, state.pt for --resume)", with no folder written at all; and an
    earlier run's files (a --resume stopped before it wrote) are not this run's."""
    out = tmp_path / "o"
    run = ["train-fnf", "--prompt", "a red circle", "--reward", "artifact", "--out", str(out), "--steps", "3",
           "--iterations", "1", "--seeds", "0", "--checkpoint-every", "1"]
    assert cli.main(run) == 0
    capsys.readouterr()

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "load_model", interrupted)
    assert cli.main([*run, "--iterations", "2", "--resume"]) == 130  # the later --iterations wins
    assert capsys.readouterr().err == f"interrupted: this run wrote nothing into {out}\n"
    fresh = tmp_path / "fresh"
    assert cli.main([*run[:6], str(fresh)]) == 130 and not fresh.exists()
    assert capsys.readouterr().err == f"interrupted: this run wrote nothing into {fresh}\n"


def test_the_tiny_rewards_own_names_work_on_the_command_line():
    """Docs audit (session 27): report.md and a LoRA's metadata name the reward 'tiny_artifact', and
    `--reward tiny_artifact` was "neither a known reward"."""
    for name in ("artifact", "attribute"):
        reward = cli.load_reward_spec(f"tiny_{name}")
        assert reward.name == f"tiny_{name}" and type(reward) is type(cli.load_reward_spec(name))
    with pytest.raises(ValueError, match="neither a known reward"):
        cli.load_reward_spec("tiny_sharpness")


def test_a_reward_folder_is_named_a_folder(tmp_path):
    """Review (session 27): `--reward <folder>` said "neither a known reward nor an existing file"."""
    with pytest.raises(ValueError, match=f"--reward {str(tmp_path)!r} is a folder: give the reward file in it"):
        cli.load_reward_spec(str(tmp_path))


def test_a_second_run_into_the_same_out_is_refused_while_the_first_writes(tmp_path, capsys):
    """Two runs into one --out passed the empty-folder check together and wrote over each other: the first run's
    LoRA was silently gone (review G3). A run now holds OUT/.focusfix.lock (an OS lock) while it writes, and checks
    the folder again once it holds it."""
    out = tmp_path / "o"
    args = ["train-fnf", "--prompt", "a red circle", "--reward", "artifact", "--iterations", "1", "--steps", "3",
            "--seeds", "0", "--out", str(out)]
    with cli.claim_out(out, overwrite=False, resume=False):  # the first run, writing
        assert (out / cli.LOCK_NAME).exists()
        assert cli.main(args) == 2
        assert f"another FocusFix run is writing into --out {out}" in capsys.readouterr().err
        assert list(out.iterdir()) == [out / cli.LOCK_NAME]  # nothing of the second run's
    assert not out.exists()  # the lock is gone, and so is the folder the first run made but never wrote to
    assert cli.main(args) == 0 and not (out / cli.LOCK_NAME).exists()
    # a run that passed the check before the first one wrote is refused once it holds the lock
    with pytest.raises(FileExistsError, match="already holds"):
        with cli.claim_out(out, overwrite=False, resume=False):
            pass
    assert (out / "lora.safetensors").is_file() and not (out / cli.LOCK_NAME).exists()


def test_a_refused_run_leaves_none_of_the_folders_it_made(tmp_path, capsys):
    """--out runs/2026/fix, none of them there, refused once the lock was held: only `fix` was removed, `runs/2026`
    stayed (left from session 18). Every folder the run made is removed; one that was there, or that holds
    another run's files, stays."""
    (tmp_path / "runs").mkdir()
    out = tmp_path / "runs" / "2026" / "nov" / "fix"
    with cli.claim_out(out, overwrite=False, resume=False):  # another run is writing into it
        args = ["train-fnf", "--prompt", "a red circle", "--reward", "artifact", "--iterations", "1", "--steps", "3",
                "--seeds", "0", "--out", str(out)]
        assert cli.main(args) == 2
        assert "another FocusFix run is writing" in capsys.readouterr().err
    assert list((tmp_path / "runs").iterdir()) == []  # 2026/nov/fix gone, `runs` (there before) kept
    with pytest.raises(FileExistsError, match="already holds"):
        with cli.claim_out(out, overwrite=False, resume=False):
            (tmp_path / "runs" / "2026" / "notes.txt").write_text("mine")  # another's file, written meanwhile
            (out / "lora.safetensors").write_bytes(b"x")
            raise FileExistsError("already holds")
    assert (out / "lora.safetensors").exists()  # a run that wrote keeps its folder
    dec = tmp_path / "runs" / "2026" / "dec"
    with pytest.raises(ValueError):
        with cli.claim_out(dec / "fix", overwrite=False, resume=False):
            (dec / "other.txt").write_text("mine")  # another's file in a folder this run made
            raise ValueError("refused")
    assert list(dec.iterdir()) == [dec / "other.txt"]  # `fix` removed, `dec` kept for the file
    assert sorted(p.name for p in (tmp_path / "runs" / "2026").iterdir()) == ["dec", "notes.txt", "nov"]


def test_a_second_ctrl_c_while_the_lora_is_written_waits_for_it(tmp_path, capsys, monkeypatch, request):
    """A fast double Ctrl-C (or a SIGTERM after a Ctrl-C) landed inside the final save: the steps' LoRA and
    state.pt were lost, while the message said "lora.safetensors once training ended" (review G, side note). The
    writes now finish first (milliseconds), then the command stops (130)."""
    import os
    import signal

    # Python's own Ctrl-C handler, also where the tests run as a background job (whose SIGINT starts ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    real = cli.save_lora

    def interrupted_save(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, as the LoRA is about to be written
        return real(*a, **kw)
    monkeypatch.setattr(cli, "save_lora", interrupted_save)
    out = tmp_path / "o"
    rc = cli.main(["train-fnf", "--prompt", "a red circle", "--reward", "artifact", "--iterations", "2", "--steps",
                   "3", "--seeds", "0", "--out", str(out)])
    assert rc == 130
    assert (f"interrupted: {out} keeps what was finished (lora.safetensors, state.pt); --resume continues it"
            in capsys.readouterr().err)
    assert cli.read_focusfix_lora(out / "lora.safetensors").metadata["focusfix_steps_trained"] == "2"
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 2


@pytest.mark.skipif(__import__("os").name == "nt", reason="Windows deletes no open file: the lock file is never "
                    "replaced under a run that opened it")
def test_a_run_that_opened_the_lock_file_as_it_was_removed_locks_the_new_one(tmp_path, monkeypatch):
    """A run that opened .focusfix.lock just before the run holding it removed it locked the removed file, so it and
    a third run both held "the" lock (review K1). It now locks the file that is there."""
    import os
    out = tmp_path / "o"
    out.mkdir()
    with cli.claim_out(out, overwrite=False, resume=False):
        stale = os.open(out / cli.LOCK_NAME, os.O_RDWR)  # opened by a second run, not yet locked
    assert not (out / cli.LOCK_NAME).exists()
    third = os.open(out / cli.LOCK_NAME, os.O_RDWR | os.O_CREAT)  # a third run takes a new lock file
    import fcntl
    fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
    real, opens = os.open, []

    def reopen(*a, **kw):
        opens.append(1)
        return stale if len(opens) == 1 else real(*a, **kw)
    monkeypatch.setattr(cli.os, "open", reopen)
    with pytest.raises(FileExistsError, match="another FocusFix run is writing"):
        cli._lock(out / cli.LOCK_NAME, out)  # the removed file's lock was free: it looks again, and meets the third
    assert len(opens) == 2
    os.close(third)


@pytest.mark.skipif(__import__("os").name == "nt", reason="flock is POSIX (Windows: msvcrt.locking)")
def test_a_file_system_without_locks_runs_with_a_warning(tmp_path, monkeypatch, capsys):
    """Every run was refused as if another one held the folder (review K2)."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "o"
    with cli.claim_out(out, overwrite=False, resume=False):
        (out / "lora.safetensors").write_bytes(b"x")
    err = capsys.readouterr().err
    assert "cannot lock" in err and "a second run into --out" in err and "would not be refused" in err
    assert (out / "lora.safetensors").exists()


@pytest.mark.parametrize("command", ["train-fnf", "train-sne"])
def test_a_disk_that_fills_after_the_lora_is_exit_1_naming_what_is_kept(tmp_path, capsys, monkeypatch, command):
    """A full disk at the images after training ended the run with exit 2 ("cannot write ...: check --out"), as if
    nothing were saved, though the LoRA and state.pt were written (left from session 18). Now exit 1, naming the
    file not written and the LoRA and state kept."""
    import errno
    real = cli.save_png

    def full(img, path, *a, **k):
        if path.name == "curves.png":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(img, path, *a, **k)
    monkeypatch.setattr(cli, "save_png", full)
    out = tmp_path / "o"
    extra = (["--reward", "artifact", "--steps", "3", "--seeds", "0", "--batch-size", "1"] if command == "train-fnf"
             else ["--resolution", "8"])
    prompt = "a red circle" if command == "train-fnf" else "a red circle and a blue square | circle, square"
    rc = cli.main([command, "--prompt", prompt, "--iterations", "1", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"error: cannot write {out / 'curves.png'}: No space left on device" in err
    assert (f"training ended: {out / 'lora.safetensors'} holds the trained LoRA and {out / 'state.pt'} its state; "
            f"the images and report are incomplete") in err
    assert (out / "lora.safetensors").is_file() and (out / "state.pt").is_file()
    assert not (out / "report.json").exists()


def test_memory_running_out_at_the_images_after_training_names_the_lora_kept(tmp_path, capsys, monkeypatch):
    """The same for an out-of-memory error while the before/after images are drawn (it said only the error)."""
    def too_big(self, *a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(cli.FixTrainer, "before_after", too_big)
    out = tmp_path / "o"
    rc = cli.main(["train-fnf", "--prompt", "a red circle", "--reward", "artifact", "--iterations", "1", "--steps",
                   "3", "--seeds", "0", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "error: CUDA out of memory. Tried to allocate 2.00 GiB\n" in err
    assert (f"training ended: {out / 'lora.safetensors'} holds the trained LoRA and {out / 'state.pt'} its state; "
            f"the before/after images did not fit in memory (the LoRA is complete)") in err
    assert cli.read_focusfix_lora(out / "lora.safetensors").metadata["focusfix_steps_trained"] == "1"
