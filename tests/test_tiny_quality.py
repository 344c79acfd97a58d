"""benchmarks/quality.py runs end to end on its reduced CI setting (issue 4)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from focusfix_core.tiny.model import DEFAULT_WEIGHTS
from focusfix_core.tiny.world import WorldConfig, make_batch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped tiny weights not built")
def test_quality_benchmark_quick(quality, capsys):
    table = quality.main(["--quick", "--only", "artifact"])
    lines = table.splitlines()
    assert lines[0].startswith("| experiment | method | reward")
    assert [ln.split("|")[2].strip() for ln in lines[2:]] == ["base", "DRaFT", "Focus-N-Fix"]
    assert "setting: quick" in capsys.readouterr().out


def test_defect_regions_cover_ground_truth(quality):
    I, _, scenes = make_batch(16, seed=5, cfg=WorldConfig(glitch_rate=1.0), prompts=["a red circle"] * 16)
    R, Rr = quality.glitch_region(I, px=2), quality.colour_region(I, "red", px=0)
    for i, s in enumerate(scenes):
        if s.glitch is not None:
            x0, y0, x1, y1 = s.glitch
            assert R[i, y0:y1, x0:x1].all()                              # covers the glitch ...
            near = torch.zeros(32, 32, dtype=torch.bool)
            near[max(y0 - 3, 0):y1 + 3, max(x0 - 3, 0):x1 + 3] = True
            assert not (R[i] & ~near).any()                              # ... within 3 px
        assert (Rr[i] <= s.masks[0] | ~s.masks[0]).all() and Rr[i][s.masks[0]].float().mean() > 0.9
    mae, psnr = quality.outside_change(I, I, R)
    assert mae == 0 and psnr == 99.0
    assert quality.outside_change(I.clamp(0.1, 0.9), I, torch.zeros_like(R))[0] > 0


def test_attribute_rows_count_the_objects_that_are_not_red(quality):
    """A fix that removes the red object and keeps the other one counts as both objects kept (evaluate's own
    both_present asks for red too, so no fix could pass it); an image that lost the other object does not."""
    clean = WorldConfig(glitch_rate=0.0)
    kept, _, _ = make_batch(4, seed=1, cfg=clean, prompts=["a blue square"] * 4)
    lost, _, _ = make_batch(4, seed=2, cfg=clean, prompts=["a green circle"] * 4)
    prompts = ["a red circle and a blue square"] * 8
    I = torch.cat([kept, lost])
    R = torch.zeros(8, 32, 32, dtype=torch.bool)
    row = quality._row("attribute", "x", 0.0, I, I, prompts, R, 0.0, red=0.0)
    assert row["both"] == pytest.approx(50.0) and row["alignment"] == pytest.approx(50.0)
    assert quality.summarize(quality.evaluate(I, prompts))["both_objects_rate"] == 0.0
