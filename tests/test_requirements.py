"""requirements.txt (what ComfyUI's Manager installs into ComfyUI's python) says what pyproject.toml says, less
torch, which comes with ComfyUI: a bound raised in one (kornia 0.8.2 for otsu_threshold) must reach both."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_requirements_txt_is_pyprojects_dependencies_without_torch():
    tomllib = pytest.importorskip("tomllib", reason="tomllib comes with Python 3.11")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [ln.strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    # one requirement a line, no inline comment: an installer may hand each line to pip as it is
    reqs = [ln for ln in lines if ln and not ln.startswith("#")]
    assert all("#" not in r for r in reqs)
    assert sorted(reqs) == sorted(d for d in deps if not d.startswith("torch"))
    assert any(d.startswith("torch>=") for d in deps)
