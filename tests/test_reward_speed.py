"""benchmarks/reward_speed.py still runs (tiny tower) and reports sane figures and pictures."""
import math

import torch
from bench_scripts import StandInClock, load_script


def test_reward_speed_tiny(tmp_path, capsys):
    mod = load_script("reward_speed")
    result = mod.main(["--tiny", "--size", "48", "--repeats", "1", "--out", str(tmp_path)])
    for kind in ("aesthetic", "safety"):
        r = result["rewards"][kind]
        assert r["forward_backward_s_median"] > 0 and math.isfinite(r["score"])
        assert 0 < r["mask_coverage"] < 0.5
        assert (tmp_path / f"{kind}_mask.png").is_file()
    assert '"rewards"' in capsys.readouterr().out


def test_reward_speed_reports_median_and_least_forward_backward_6(monkeypatch):
    """Per repeat: forward + backward from before the forward to after the backward; the median and the least of
    those, and the median forward."""
    mod = load_script("reward_speed")
    # three repeats: (start, after forward, after backward)
    monkeypatch.setattr(mod, "time", StandInClock(0, 1, 3, 10, 11, 12, 20, 21, 27))
    r = mod.time_forward_backward(lambda x: x.mean((1, 2, 3)), torch.rand(1, 3, 4, 4), 3)
    assert r["forward_backward_s_median"] == 3 and r["forward_backward_s_min"] == 2
    assert r["forward_s_median"] == 1


def test_reward_speed_times_a_frozen_reward_6(monkeypatch, capsys):
    """The timed reward is frozen, as in the trainer's step: backward reaches the image only."""
    mod = load_script("reward_speed")
    frozen, timer = [], mod.time_forward_backward

    def spy(reward, I, repeats):
        frozen.append(not any(p.requires_grad for p in reward.parameters()))
        return timer(reward, I, repeats)

    monkeypatch.setattr(mod, "time_forward_backward", spy)
    mod.main(["--tiny", "--size", "32", "--repeats", "1"])
    assert frozen == [True, True]


def test_reward_speed_mask_keeps_the_top_tenth_6(tmp_path, capsys):
    """The saved mask is the saliency's top 10 % (top_percent 0.1, no dilation or feathering)."""
    mod = load_script("reward_speed")
    result = mod.main(["--tiny", "--size", "48", "--repeats", "1", "--rewards", "aesthetic", "--out", str(tmp_path)])
    assert 0.08 <= result["rewards"]["aesthetic"]["mask_coverage"] <= 0.15
