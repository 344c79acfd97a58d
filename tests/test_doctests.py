"""The docstring examples of every focusfix_core module run and pass (STYLE.md 14: public functions get a
`.shape` doctest; a doctest nobody runs can go stale, as `lora.diffusers_unet_names`'s could).

doctest runs on the normally imported package: pytest --doctest-modules would import a second copy under the
repo folder's name, since the node pack root has an __init__.py.
"""
import doctest
import importlib
from pathlib import Path

import pytest

import focusfix_core

# every module whose docstrings hold examples (test_every_module_with_examples_is_listed keeps this complete)
MODULES = [
    "attention",
    "denoisers",
    "io",
    "lora",
    "losses",
    "saliency",
    "rewards.aesthetic",
    "rewards.clip_vision",
    "rewards.composite",
    "rewards.image",
    "rewards.loading",
    "rewards.safety",
    "tiny.model",
    "tiny.world",
]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    m = importlib.import_module(f"focusfix_core.{module}")
    result = doctest.testmod(m, optionflags=doctest.ELLIPSIS)  # failures are printed: pytest shows them
    assert result.attempted > 0 and result.failed == 0, result


def test_every_module_with_examples_is_listed():
    root = Path(focusfix_core.__file__).parent
    found = set()
    for path in root.rglob("*.py"):
        if ">>>" in path.read_text(encoding="utf-8"):
            parts = path.relative_to(root).with_suffix("").parts
            found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert found == set(MODULES)
