"""The demo (`python -m focusfix_core demo`) trains Focus-N-Fix on images that really have a glitch, and reports
what the tiny world's exact evaluator says before and after. The full demo takes about a minute: these run its
picking on the shipped model and the --quick setting end to end."""
import json

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


def test_a_disk_that_fills_after_the_demos_training_names_the_loras_kept(tmp_path, capsys, monkeypatch):
    """A full disk at the demo's own pictures (held_out.png, both_objects.png) or summary after its LoRAs were
    written was exit 2 "cannot write ...", as if nothing had been saved; now exit 1 naming the LoRAs kept."""
    import errno

    import focusfix_core.viz as viz
    real = viz.save_png

    def full(img, path, *a, **k):
        if path.name == "held_out.png" and path.parent.name == "focus_n_fix":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(img, path, *a, **k)
    monkeypatch.setattr(viz, "save_png", full)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write {out / 'focus_n_fix' / 'held_out.png'}: No space left on device\n" in err, err
    assert f"{out / 'focus_n_fix' / 'lora.safetensors'} hold the trained LoRAs; the pictures and summary are " \
           f"incomplete" in err
    assert (out / "focus_n_fix" / "lora.safetensors").is_file()
