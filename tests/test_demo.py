"""The demo (`python -m focusfix_core demo`) trains Focus-N-Fix on images that really have a glitch, and reports
what the tiny world's exact evaluator says before and after. The full demo takes about a minute: these run its
picking on the shipped model and the --quick setting end to end."""
import dataclasses
import json
import math

import pytest
import torch

from focusfix_core import cli, demo
from focusfix_core.tiny import load_default_model
from focusfix_core.tiny.evaluate import has_glitch
from focusfix_core.tiny.rewards import load_default_rewards


def test_choose_seeds_takes_the_flagged_glitches_in_seed_order():
    seeds = [10, 11, 12, 13, 14, 15]
    glitch = [False, True, True, False, True, True]
    score = [-0.99, -0.9, -0.2, -0.1, -0.95, -0.6]  # 12 has a glitch the reward misses; 10 a false alarm
    assert demo.choose_seeds(seeds, glitch, score, 3) == [11, 14, 15]
    assert demo.choose_seeds(seeds, glitch, score, 2) == [11, 14]


def test_choose_seeds_tops_up_with_other_glitches_then_the_lowest_scores():
    seeds, glitch, score = [1, 2, 3, 4], [False, True, False, True], [-0.9, -0.2, -0.3, -0.7]
    assert demo.choose_seeds(seeds, glitch, score, 2) == [4, 2]        # 2: a glitch the reward does not flag
    assert demo.choose_seeds(seeds, glitch, score, 4) == [4, 2, 1, 3]  # then the clean ones, lowest score first
    assert demo.choose_seeds([1, 2], [False, False], [-0.1, -0.8], 1) == [2]


@pytest.mark.slow
def test_the_demo_setting_finds_enough_glitches_and_picks_only_glitched_seeds():
    """Over the full demo's candidates, every picked base image has a glitch by the exact evaluator, and the
    reward flags it (the demo used to rank by the reward alone, at CFG 3, and trained on 3 clean images of 4)."""
    torch.set_num_threads(1)
    model, reward, s = load_default_model(), load_default_rewards()["artifact"], demo.FULL
    seeds, info = demo.pick_glitched_seeds(model, reward, demo.DEMO_FIX_PROMPT, range(*s.candidates), s.n_fix,
                                           s.steps, s.fix_cfg)
    assert len(seeds) == s.n_fix and sum(info["glitch"]) >= s.n_fix + 1  # one glitched seed is left to hold out
    I = model.sample([demo.DEMO_FIX_PROMPT] * len(seeds), seeds, s.steps, s.fix_cfg)  # drawn again, apart
    assert has_glitch(I).all(), seeds
    assert (reward.score(I) < -0.5).all()
    clean = [sd for sd, g in zip(info["seeds"], info["glitch"]) if not g]
    assert not set(seeds) & set(clean)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "demo_summary.json").read_text())


def test_quick_demo_counts_glitches_with_the_exact_evaluator(quick_demo):
    out, summary = quick_demo
    fnf = summary["focus_n_fix"]
    assert fnf["status"] == "done" and fnf["prompt"] == demo.DEMO_FIX_PROMPT
    assert [it["seed"] for it in fnf["items"]] == fnf["seeds"]
    # every seed searched, not [first, last] (read as two seeds, user audit); the trained and held-out among them
    assert fnf["candidate_seeds"] == list(range(*demo.QUICK.candidates)) == [120, 121, 122, 123]
    assert set(fnf["seeds"]) | set(fnf["held_out"]["seeds"]) <= set(fnf["candidate_seeds"])
    assert len(fnf["seeds"]) <= fnf["candidates_with_glitch"] <= len(fnf["candidate_seeds"])
    # the --quick candidates hold glitches too: every trained image has one, read back from what the trainer drew
    assert fnf["glitches_before"] == len(fnf["seeds"]) == demo.QUICK.n_fix
    for k, it in enumerate(fnf["items"]):
        assert it["glitch_before"] and bool(has_glitch(demo._read_png(out / "focus_n_fix" / f"before_{k}.png"))[0])
        after = bool(has_glitch(demo._read_png(out / "focus_n_fix" / f"after_{k}.png"))[0])
        assert it["glitch_after"] == after
    assert fnf["glitches_after"] == sum(it["glitch_after"] for it in fnf["items"])
    held = fnf["held_out"]
    assert held["seeds"] and not set(held["seeds"]) & set(fnf["seeds"])
    assert len(held["glitch_before"]) == len(held["glitch_after"]) == len(held["seeds"])
    assert (out / "focus_n_fix" / "held_out.png").is_file()


def test_quick_demo_counts_both_objects_and_keeps_its_layout(quick_demo):
    out, summary = quick_demo
    se = summary["separate_enhance"]
    assert se["status"] == "done"
    n = len(se["check_seeds"])
    assert len(se["both_objects_before"]) == len(se["both_objects_after"]) == len(demo.DEMO_PAIRS)
    assert all(0 <= k <= n for k in se["both_objects_before"] + se["both_objects_after"])
    held = se["held_out"]  # prompts it did not train on, counted the same way
    assert held["prompts"] == list(demo.DEMO_HELD_OUT_PAIRS[:demo.QUICK.held_out_pairs])
    assert not set(held["prompts"]) & set(se["prompts"])
    assert len(held["both_objects_before"]) == len(held["both_objects_after"]) == len(held["prompts"])
    assert all(0 <= k <= n for k in held["both_objects_before"] + held["both_objects_after"])
    for part, names in (("focus_n_fix", ("lora.safetensors", "before_after.png", "report.json")),
                        ("separate_enhance", ("lora.safetensors", "attention.png", "both_objects.png",
                                              "held_out.png"))):
        for name in names:
            assert (out / part / name).is_file(), (part, name)


def _disk_full_at(monkeypatch, full) -> None:
    """The demo's pictures: writing one for which full(path) holds fails as a full disk does."""
    import errno

    import focusfix_core.viz as viz
    real = viz.save_png

    def save_png(img, path, *a, **k):
        if full(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(img, path, *a, **k)
    monkeypatch.setattr(viz, "save_png", save_png)


def test_a_disk_that_fills_after_the_demos_training_names_the_loras_kept(tmp_path, capsys, monkeypatch):
    """A full disk at the demo's own pictures (held_out.png, both_objects.png) or summary after its LoRAs were
    written was exit 2 "cannot write ...", as if nothing had been saved; now exit 1 naming the LoRAs kept."""
    _disk_full_at(monkeypatch, lambda path: path.name == "held_out.png" and path.parent.name == "focus_n_fix")
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write {out / 'focus_n_fix' / 'held_out.png'}: No space left on device\n" in err, err
    assert f"{out / 'focus_n_fix' / 'lora.safetensors'} hold the trained LoRAs; the pictures and summary are " \
           f"incomplete" in err
    assert (out / "focus_n_fix" / "lora.safetensors").is_file()


# --- found by mutation testing (session 25) ---

def test_choose_seeds_takes_a_glitch_only_when_the_reward_flags_it_strictly():
    """The reward flags a glitch when P(glitch) > 0.5, i.e. score < -0.5: a score of exactly -0.5 is not flagged."""
    assert demo.choose_seeds([1, 2], [True, True], [-0.5, -0.6], 1) == [2]


def test_the_mean_of_report_losses_is_nan_when_one_is_null():
    assert demo._mean([1.0, 3.0]) == 2.0
    assert math.isnan(demo._mean([1.0, None])) and math.isnan(demo._mean([]))


def _png(path, value):
    from focusfix_core.viz import save_png
    return save_png(torch.full((3, 8, 8), value), path)


def test_fix_check_reads_each_items_images_and_holds_out_every_other_glitch_and_a_few_clean_seeds(
        tmp_path, monkeypatch):
    """The counts come from each item's own before and after PNG; the held-out seeds are every glitched candidate
    not trained on plus the first `held_out_clean` clean ones, drawn with the saved LoRA."""
    import focusfix_core.tiny.evaluate as ev
    monkeypatch.setattr(ev, "has_glitch", lambda I: I.mean((1, 2, 3)) > 0.5)  # bright = glitch, for this test
    drawn_with = []

    def fresh(lora_file=None):
        drawn_with.append(lora_file)
        return lora_file
    monkeypatch.setattr(demo, "_fresh_model", fresh)
    # the model with the LoRA draws clean (dark) images; without it, the glitch stays
    monkeypatch.setattr(demo, "base_images",
                        lambda model, prompt, seeds, steps, cfg: torch.full((len(seeds), 3, 8, 8),
                                                                            0.0 if model else 1.0))
    fix = {"items": [{"seed": 10, "before": str(_png(tmp_path / "before_0.png", 1.0)),
                      "after": str(_png(tmp_path / "after_0.png", 0.0))}],
           "reward_before": [-0.9], "reward_after": [0.1], "files": {"lora": str(tmp_path / "lora.safetensors")}}
    seeds, glitch = [10, 11, 12, 13, 14, 15], [True, True, True, False, False, False]
    images = torch.stack([torch.full((3, 8, 8), 1.0 if g else 0.0) for g in glitch])
    pick = {"seeds": seeds, "glitch": glitch, "images": images, "score": [0.0] * 6}
    s = dataclasses.replace(demo.QUICK, held_out_clean=1)
    check = demo._fix_check(fix, pick, [10], "a blue square", s, tmp_path)
    assert check["items"] == [{"seed": 10, "glitch_before": True, "glitch_after": False,
                               "reward_before": -0.9, "reward_after": 0.1}]
    assert (check["glitches_before"], check["glitches_after"]) == (1, 0)
    held = check["held_out"]
    assert held["seeds"] == [11, 12, 13]
    assert held["glitch_before"] == [True, True, False] and held["glitch_after"] == [False, False, False]
    assert drawn_with == [fix["files"]["lora"]]
    assert (tmp_path / "held_out.png").is_file()


def test_both_objects_counts_each_prompts_own_images(monkeypatch):
    """Per prompt, how many of its seeds' images show every object: prompt-major, one block of seeds each."""
    import focusfix_core.tiny.evaluate as ev
    monkeypatch.setattr(ev, "evaluate", lambda I, ps: [{"both_present": bool(x.mean() > 0.5)} for x in I])
    monkeypatch.setattr(demo, "base_images", lambda model, p, seeds, steps, cfg: torch.full(
        (len(seeds), 3, 4, 4), 1.0 if p == "both" else 0.0))
    I, counts = demo._both_objects(None, ["both", "none", "both"], [0, 1, 2], demo.QUICK)
    assert I.shape[0] == 9 and counts == [3, 0, 3]


def test_a_demo_into_a_folder_another_run_writes_is_refused(tmp_path, capsys):
    out = tmp_path / "demo"
    with cli.claim_out(out, overwrite=False, resume=False, resumable=False):  # the other run, writing
        assert cli.main(["demo", "--quick", "--out", str(out)]) == 2
        assert f"another FocusFix run is writing into --out {out}" in capsys.readouterr().err
        assert list(out.iterdir()) == [out / cli.LOCK_NAME]


def test_a_demo_out_that_is_a_file_is_refused_by_name(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["demo", "--quick", "--out", str(afile)]) == 2
    assert f"--out {afile} is a file: give a folder" in capsys.readouterr().err
    assert afile.read_text() == "x"


def test_a_demo_error_before_any_lora_is_trained_is_bad_input_not_a_run_that_kept_loras(tmp_path, monkeypatch,
                                                                                         capsys):
    """An OSError before the first LoRA (an unreadable model file) is exit 2 naming the file, not exit 1 saying
    trained LoRAs are kept."""
    def unreadable(*a, **k):
        raise PermissionError(13, "Permission denied", "tiny_t2i.safetensors")
    monkeypatch.setattr(cli, "load_model", unreadable)
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "tiny_t2i.safetensors: Permission denied" in err and "hold the trained LoRAs" not in err


def test_a_disk_that_fills_after_separate_enhance_names_both_loras_kept(tmp_path, capsys, monkeypatch):
    _disk_full_at(monkeypatch, lambda path: path.name == "both_objects.png")
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert (f"{out / 'focus_n_fix' / 'lora.safetensors'} and {out / 'separate_enhance' / 'lora.safetensors'} hold "
            f"the trained LoRAs") in err, err


def test_ctrl_c_while_separate_enhance_draws_its_images_stops_the_demo_without_saying_nothing_was_written(
        tmp_path, monkeypatch, capsys):
    """A Ctrl-C after Separate-and-Enhance wrote its LoRA (while its after images sample) exits 130; the demo must
    not report that S&E was interrupted before its first step with nothing written."""
    calls = []
    real = cli._samples

    def interrupted_second_time(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(cli, "_samples", interrupted_second_time)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "nothing was written" not in err, err
    assert (out / "separate_enhance" / "lora.safetensors").is_file()


def test_ctrl_c_before_the_demo_wrote_a_lora_says_so(tmp_path, monkeypatch, capsys):
    """Review (session 27): a stop while the demo picked its seeds said "OUT keeps the parts it finished", with
    no OUT at all."""
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "pick_glitched_seeds", interrupted)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 130
    assert capsys.readouterr().err.endswith(f"interrupted: the demo stopped before it wrote a LoRA into {out}\n")


def test_ctrl_c_while_the_tuned_model_is_counted_still_writes_the_summary(tmp_path, monkeypatch, capsys):
    """CLI bad-input hunt (session 27): a Ctrl-C after Separate-and-Enhance finished, while the demo counted the
    tuned model's images, left no demo_summary.json (and --overwrite had removed the earlier one): the summary
    holds what was measured, the counts not reached are null, and the exit stays an interrupt."""
    real, calls = demo._both_objects, []

    def interrupted_on_the_tuned_model(model, prompts, seeds, s):
        calls.append(1)
        if len(calls) == 3:  # base pairs, base held-out pairs, then the tuned model's pairs
            raise KeyboardInterrupt
        return real(model, prompts, seeds, s)
    monkeypatch.setattr(demo, "_both_objects", interrupted_on_the_tuned_model)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert (f"interrupted: the demo stopped; {out} keeps what it finished (focus_n_fix/lora.safetensors, "
            f"separate_enhance/lora.safetensors; run it again with --overwrite to start over)") in err
    assert "--resume" not in err
    summary = json.loads((out / "demo_summary.json").read_text())
    se = summary["separate_enhance"]
    assert se["status"] == "done" and se["both_objects_before"] is not None and se["both_objects_after"] is None
    assert se["held_out"]["both_objects_after"] is None
    assert se["note"] == "interrupted while counting the tuned model's images: the counts not reached are null"
    assert summary["focus_n_fix"]["glitches_after"] is not None


def test_separate_enhance_counts_its_before_images_on_the_base_model(tmp_path, monkeypatch):
    """The both-objects counts 'before' Separate-and-Enhance are of the base model's images, not of the model that
    still has the demo's Focus-N-Fix LoRA hooked on."""
    calls = []
    real = demo._both_objects

    def kept(model, prompts, seeds, s):
        result = real(model, prompts, seeds, s)
        calls.append((list(prompts), list(seeds), result[0]))
        return result
    monkeypatch.setattr(demo, "_both_objects", kept)
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    prompts, seeds, I_before = calls[0]
    base, _ = cli.load_model("tiny", random_ok=True)
    assert torch.equal(I_before, real(base, prompts, seeds, demo.QUICK)[0])


def test_a_demo_runs_the_full_setting_unless_quick(tmp_path, monkeypatch):
    """`demo` trains with FULL, `demo --quick` with QUICK."""
    used = []

    def run(out, s, quick, t0, trained):
        used.append((s, quick))
        return {"status": "done", "files": {}}
    monkeypatch.setattr(demo, "_run", run)
    demo.run_demo(tmp_path / "full")
    demo.run_demo(tmp_path / "quick", quick=True)
    assert used == [(demo.FULL, False), (demo.QUICK, True)]


def test_the_quick_demos_summary_names_its_settings_and_counts(quick_demo):
    """The summary's CFG scales, steps and check seeds are the setting's; candidates_with_glitch counts every
    glitched candidate (the trained ones and the held-out glitched ones); held_out.png is among its files."""
    out, summary = quick_demo
    s, fnf, se = demo.QUICK, summary["focus_n_fix"], summary["separate_enhance"]
    assert (fnf["cfg_scale"], fnf["steps"], se["cfg_scale"]) == (s.fix_cfg, s.steps, s.se_cfg)
    assert se["check_seeds"] == list(range(s.check_seeds))
    assert fnf["candidates_with_glitch"] == fnf["glitches_before"] + sum(fnf["held_out"]["glitch_before"])
    assert fnf["files"]["held_out"] == str(out / "focus_n_fix" / "held_out.png")
    assert "file" not in fnf["held_out"]


def test_a_full_demo_prints_the_summarys_figures(tmp_path, monkeypatch, capsys):
    """`demo` without --quick (FULL made small here) says quick: false; candidates_with_glitch counts every glitched
    candidate, trained or held out; and each printed figure is the summary's: the candidate range, the glitches before -> after, each prompt's both-object counts before -> after and the
    held-out prompts' total out of seeds x prompts, and where the outputs are."""
    # n_fix 1 of the 2 glitched --quick candidates: the other is held out
    monkeypatch.setattr(demo, "FULL", dataclasses.replace(demo.QUICK, n_fix=1, held_out_pairs=2, fix_iterations=1,
                                                          se_iterations=1))
    real_check, real_both = demo._fix_check, demo._both_objects

    def check(*a, **k):  # distinct figures, so that a swapped pair shows
        result = real_check(*a, **k)
        result["glitches_before"], result["glitches_after"] = 2, 1
        return result
    counter = iter(range(100))

    def both(model, prompts, seeds, s):
        I, _ = real_both(model, prompts, seeds, s)
        return I, [next(counter) for _ in prompts]
    monkeypatch.setattr(demo, "_fix_check", check)
    monkeypatch.setattr(demo, "_both_objects", both)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["quick"] is False
    fnf, se = summary["focus_n_fix"], summary["separate_enhance"]
    # every glitched candidate: the trained one and the glitched held-out one(s)
    assert all(it["glitch_before"] for it in fnf["items"]) and sum(fnf["held_out"]["glitch_before"]) >= 1
    assert fnf["candidates_with_glitch"] == len(fnf["seeds"]) + sum(fnf["held_out"]["glitch_before"])
    assert f"candidate seeds 120-123 have a glitch; training on seeds {fnf['seeds']}" in err, err
    assert f"Focus-N-Fix: glitches (exact evaluator) 2 -> 1 of {len(fnf['seeds'])} trained images" in err, err
    assert se["both_objects_before"] == [0, 1] and se["both_objects_after"] == [4, 5]
    p0, p1 = se["prompts"]
    assert f"{p0!r} 0 -> 4 of 2, {p1!r} 1 -> 5 of 2;" in err, err
    assert "prompts it did not train on: 5 -> 13 of 4 with both objects" in err, err  # (2 + 3) -> (6 + 7)
    assert f"; outputs in {out.resolve()}" in err


class _Stop(Exception):
    pass


def test_a_demo_without_the_shipped_weights_runs_on_a_random_model_and_the_sharpness_reward(tmp_path, monkeypatch,
                                                                                           capsys):
    """Without the shipped model or reward weights the demo still runs (random model, sharpness reward), saying
    so, instead of stopping on the missing file."""
    import focusfix_core.tiny.model as tm
    import focusfix_core.tiny.rewards as tr
    from focusfix_core.rewards.image import SharpnessReward

    def missing(*a, **k):
        raise FileNotFoundError("shipped weights missing")
    monkeypatch.setattr(tm, "load_default_model", missing)
    monkeypatch.setattr(tr, "load_default_rewards", missing)
    got = []

    def pick(model, reward, *a):
        got.append((model, reward))
        raise _Stop
    monkeypatch.setattr(demo, "pick_glitched_seeds", pick)
    with pytest.raises(_Stop):
        demo.run_demo(tmp_path / "demo", quick=True)
    (model, reward), = got
    assert isinstance(model, tm.TinyModel) and isinstance(reward, SharpnessReward)
    err = capsys.readouterr().err
    assert "model: RANDOMLY INITIALISED tiny model (shipped weights not found)" in err
    assert "reward: sharpness reward (tiny artifact reward unavailable: shipped weights missing)" in err
