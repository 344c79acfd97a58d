"""The FocusFix pack imported as a package from its root `__init__.py`, the way ComfyUI imports it (without
ComfyUI). tests/ is on sys.path through pyproject's `pythonpath`; build_workflows.py adds it itself."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_pack():
    """The pack's root module, imported once under the name `focusfix_pack`."""
    name = "focusfix_pack"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]
