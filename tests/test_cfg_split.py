"""benchmarks/cfg_split.py still runs (a small layer) and times what CFGDenoiser does for both kinds of lengths."""
import json

import pytest
import torch
from bench_scripts import StandInClock, load_script


@pytest.mark.parametrize("tokens, joined, batchable", [("85,77", 6545, False), ("154,77", 154, True)])
def test_cfg_split_small(capsys, tokens, joined, batchable):
    mod = load_script("cfg_split")
    r = mod.main(["--latent", "4", "--channels", "16", "--heads", "2", "--width", "8", "--runs", "1",
                  "--tokens", tokens])
    assert (r["batched_tokens"], r["batchable"]) == (joined, batchable)
    assert r["ms_batched"] > 0 and r["ms_apart"] > 0
    assert json.loads(capsys.readouterr().out) == r


def test_cfg_split_time_is_the_least_of_its_runs_after_a_warm_up_6(monkeypatch):
    """_time: one untimed warm-up call, then the least of `runs` timed calls."""
    mod = load_script("cfg_split")
    monkeypatch.setattr(mod, "time", StandInClock(0.0, 3.0, 10.0, 11.0, 20.0, 22.0))
    calls = []
    best = mod._time(lambda: calls.append(1), torch.device("cpu"), 3)
    assert best == 1.0 and len(calls) == 4


def test_cfg_split_waits_for_the_device_around_each_timed_call_6(monkeypatch):
    """On cuda, _time synchronizes before starting the clock and again before reading it (kernels are async)."""
    mod = load_script("cfg_split")
    events = []

    class Clock:
        def perf_counter(self):
            events.append("clock")
            return float(len(events))

    monkeypatch.setattr(mod, "time", Clock())
    monkeypatch.setattr(mod.torch.cuda, "synchronize", lambda *a: events.append("sync"))
    mod._time(lambda: events.append("fn"), torch.device("cuda"), 1)
    assert events == ["fn", "sync", "clock", "fn", "sync", "clock"]


def test_cfg_split_ratio_is_batched_over_apart_6(monkeypatch, capsys):
    """The JSON's ratio is ms_batched / ms_apart (a ratio above 1: the joined batch costs more)."""
    mod = load_script("cfg_split")
    monkeypatch.setattr(mod, "time", StandInClock(0.0, 0.004, 1.0, 1.002))
    r = mod.main(["--latent", "2", "--channels", "8", "--heads", "2", "--width", "8", "--runs", "1"])
    assert (r["ms_batched"], r["ms_apart"], r["ratio_batched_over_apart"]) == (4.0, 2.0, 2.0)


def test_cfg_split_times_what_the_two_ways_run_6(monkeypatch, capsys):
    """batched: 2B rows against the joined context; apart: B rows against each half's own context; queries =
    latent side squared."""
    mod = load_script("cfg_split")
    seen, attention = [], mod._attention

    def spy(x, context, w, heads):
        seen.append((tuple(x.shape[:2]), context.shape[1]))
        return attention(x, context, w, heads)

    monkeypatch.setattr(mod, "_attention", spy)
    r = mod.main(["--latent", "4", "--channels", "8", "--heads", "2", "--width", "8", "--runs", "1",
                  "--tokens", "85,77"])
    assert r["queries"] == 16
    assert set(seen) == {((2, 16), 6545), ((1, 16), 85), ((1, 16), 77)}
