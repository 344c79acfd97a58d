"""benchmarks/quality.py runs end to end on its reduced CI setting (issue 4)."""
import importlib.util
import math
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


def test_hinge_objective_stops_pushing_below_its_target(quality):
    """The attribute hinge is -logit P(red) above the target and flat (no gradient) below it."""
    class Fixed(torch.nn.Module):
        def logit(self, I):
            return I.mean(dim=(1, 2, 3)) * 10 - 5  # logits -5 (P 0.007) .. 5 (P 0.993)

    hinge, logit = quality.LogitAttribute(Fixed(), target=0.1), quality.LogitAttribute(Fixed())
    I = torch.stack([torch.full((3, 4, 4), v) for v in (0.1, 0.9)]).requires_grad_()
    s = hinge.score(I)
    s.sum().backward()
    s = s.detach()
    assert float(s[0]) == 0 and I.grad[0].abs().sum() == 0             # logit -4: P(red) 0.018 < 0.1, left alone
    assert float(s[1]) == pytest.approx(-(4.0 - math.log(0.1 / 0.9)), rel=1e-5) and I.grad[1].abs().sum() > 0
    assert float(logit.score(I.detach())[0]) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="hinge_target"):
        quality.LogitAttribute(Fixed(), target=1.5)
