"""benchmarks/freeu_cost.py (issue 6): how its figures are formed, with ComfyUI and the Train node replaced by a
stand-in that reports scripted seconds per step (the script itself needs a real ComfyUI)."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from bench_scripts import load_script


class _FakeComfy:
    """comfy.run for freeu_cost: Train Focus-N-Fix's report line, with scripted seconds per step per MODEL."""

    def __init__(self, seconds):
        self.seconds = {k: list(v) for k, v in seconds.items()}

    def run(self, node, **kw):
        if node == "FocusFixLoadReward":
            return ("reward",)
        if node in ("FreeU", "FreeU_V2"):
            return (node,)
        s = self.seconds[kw["model"]].pop(0)
        return None, f"trained {kw['iterations']} steps in 0:01 ({s:.2f} s per step)\nother line"


def test_freeu_cost_ratio_and_runs_6(monkeypatch, capsys):
    """--runs runs of each MODEL; the ratio is the least FreeU_V2 step over the least FreeU step."""
    mod = load_script("freeu_cost")
    fake = _FakeComfy({"FreeU": [0.40, 0.20], "FreeU_V2": [0.30, 0.50]})
    tiny = types.SimpleNamespace(tiny_checkpoint=lambda family, seed: ("model", "clip", "vae"))
    monkeypatch.setattr(mod, "_comfy", lambda: (fake, tiny))
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    out = mod.main(["--runs", "2", "--iterations", "3"])
    assert out["s_per_step"] == {"FreeU": [0.40, 0.20], "FreeU_V2": [0.30, 0.50]}
    assert out["ratio_FreeU_V2_over_FreeU"] == pytest.approx(0.30 / 0.20)
    assert json.loads(capsys.readouterr().out) == out
