"""Shared fixtures: a very small randomly initialised tiny model and a reward that looks at one square. And the
one check of whether this python can run ComfyUI, for the tests that need it."""
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from focusfix_core.rewards.base import Reward

torch.set_num_threads(1)  # tiny nets: threading overhead dominates, and CI has 2 shared cores

# The property tests draw the same examples on every run, so CI's verdict on a commit does not depend on luck;
# HYPOTHESIS_PROFILE=explore draws new ones (a local bug hunt). No time limits either: Hypothesis's per-example
# deadline and its too-slow health check are timed asserts, which a loaded 2-core machine fails by chance (speed
# is measured in benchmarks/).
_UNTIMED = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, **_UNTIMED)
settings.register_profile("explore", derandomize=False, **_UNTIMED)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class SquareRedReward(Reward):
    """Mean redness minus greenness inside a known square; its heatmap is that square."""

    has_heatmap = True
    name = "square_red"

    def __init__(self, box=(4, 12, 4, 12)):
        super().__init__()
        self.box = box

    def score(self, I):
        y0, y1, x0, x1 = self.box
        patch = I[:, :, y0:y1, x0:x1]
        return (patch[:, 0] - patch[:, 1]).mean((1, 2))

    def heatmap(self, I):
        y0, y1, x0, x1 = self.box
        H = torch.zeros_like(I[:, :1])
        H[:, :, y0:y1, x0:x1] = 1.0
        return H


@pytest.fixture
def small_model():
    from focusfix_core.tiny.model import TinyConfig, TinyModel

    cfg = TinyConfig(image_size=16, channels=(16, 16, 32), heads=2, context_dim=16, text_layers=1)
    return TinyModel.random(seed=0, config=cfg)


@pytest.fixture
def square_reward():
    return SquareRedReward()


@functools.cache
def comfy_import_problem() -> str | None:
    """Why this python cannot import ComfyUI from COMFYUI_DIR; None when it can, or when COMFYUI_DIR names no
    checkout (each test then skips with its own reason). E.g. the README's test command in the project's venv
    on a machine whose shell sets COMFYUI_DIR: ComfyUI's own requirements are in ComfyUI's python."""
    root = os.environ.get("COMFYUI_DIR", "")
    if not root or not Path(root, "comfy").is_dir():
        return None
    code = "import sys; sys.path.insert(0, sys.argv[1]); import comfy.cli_args; comfy.cli_args.args.cpu = True; import comfy.sd"
    probe = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, timeout=300)
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["?"])[-1]
    return (f"COMFYUI_DIR is set, but this python cannot import ComfyUI from it ({last}): run these tests with "
            f"ComfyUI's python (.ci/run: COMFYUI_PYTHON)")


def pytest_collection_modifyitems(config, items):
    """Tests marked comfyui, and everything under tests/integration, skip with the reason when this python
    cannot import the ComfyUI that COMFYUI_DIR names."""
    needing = [i for i in items if i.get_closest_marker("comfyui") or "integration" in Path(str(i.path)).parts]
    reason = comfy_import_problem() if needing else None
    for item in needing if reason else []:
        item.add_marker(pytest.mark.skip(reason=reason))
