"""requirements.txt (what ComfyUI's Manager installs into ComfyUI's python) says what pyproject.toml says, less
torch, which comes with ComfyUI: a bound raised in one (kornia 0.8.2 for otsu_threshold) must reach both."""
import re
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


def test_requires_comfyui_is_the_version_the_train_nodes_need():
    """The registry's ComfyUI floor (what ComfyUI-Manager warns by) and the Train nodes' own refusal say one version."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib comes with Python 3.11")
    from pack_loader import load_pack
    need = load_pack().nodes.adapters.MIN_COMFYUI_TO_TRAIN
    floor = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]["requires-comfyui"]
    assert floor == f">={need}"
    assert re.fullmatch(r">=\d+\.\d+\.\d+", floor)  # comfy-cli takes X.Y.Z only (else it publishes no floor)


def test_every_docstring_is_valid_utf8_so_python_313_can_compile_it():
    """Python 3.13 strips docstring indentation at compile time, through UTF-8: a lone surrogate in one (a
    non-raw "\\ud800") made its whole file fail to compile there while 3.10-3.12 ran it. Held on any Python."""
    import ast

    bad = []
    for path in sorted(REPO.rglob("*.py")):
        if any(part.startswith(".") or part == "build" for part in path.relative_to(REPO).parts):
            continue  # a venv or build output beside the sources
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                try:
                    (doc or "").encode("utf-8")
                except UnicodeEncodeError:
                    bad.append(f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 1)}")
    assert not bad, f"docstrings Python 3.13 cannot compile (lone surrogates; escape them): {bad}"
