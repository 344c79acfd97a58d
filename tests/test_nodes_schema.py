"""Every FocusFix node's V1 schema is valid, without ComfyUI installed (issue #3)."""
from __future__ import annotations

import inspect
import math
import subprocess
import sys
from pathlib import Path

import pytest
from pack_loader import load_pack

REPO = Path(__file__).resolve().parents[1]
SOCKET_TYPES = {"MODEL", "CLIP", "VAE", "SIGMAS", "IMAGE", "MASK", "CONDITIONING", "LATENT", "CLIP_VISION",
                "FOCUSFIX_LORA", "FOCUSFIX_REWARD"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
FILE_LISTS = {("FocusFixLoadLoRA", "lora_name")}



PACK = load_pack()
NODES = sorted(PACK.NODE_CLASS_MAPPINGS.items())


def _inputs(cls):
    it = cls.INPUT_TYPES()
    assert set(it) <= {"required", "optional", "hidden"}, set(it)
    return [(name, spec, group) for group in ("required", "optional") for name, spec in it.get(group, {}).items()]


def test_pack_imports_without_comfyui():
    code = ("import importlib.util, sys; r = sys.argv[1]; "
            "s = importlib.util.spec_from_file_location('p', r + '/__init__.py', submodule_search_locations=[r]); "
            "m = importlib.util.module_from_spec(s); sys.modules['p'] = m; s.loader.exec_module(m); "
            "bad = [k for k in sys.modules if k.split('.')[0] in ('comfy', 'folder_paths', 'nodes', 'comfy_extras')]; "
            "assert not bad, bad; print(len(m.NODE_CLASS_MAPPINGS))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "11"


def test_mappings_ids_and_display_names():
    assert set(PACK.NODE_CLASS_MAPPINGS) == set(PACK.NODE_DISPLAY_NAME_MAPPINGS)
    assert len(NODES) == 11
    for node_id, cls in NODES:
        assert node_id.startswith("FocusFix") and node_id == cls.__name__
        assert PACK.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("FocusFix ")


@pytest.mark.parametrize("node_id, cls", NODES)
def test_class_attributes(node_id, cls):
    assert cls.CATEGORY.startswith("FocusFix/") and cls.CATEGORY.count("/") == 1
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20
    assert callable(getattr(cls, cls.FUNCTION))
    n = len(cls.RETURN_TYPES)
    assert isinstance(cls.RETURN_TYPES, tuple) and n >= 1
    assert len(cls.RETURN_NAMES) == n and len(set(cls.RETURN_NAMES)) == n
    assert len(cls.OUTPUT_TOOLTIPS) == n and all(isinstance(t, str) and t for t in cls.OUTPUT_TOOLTIPS)
    if hasattr(cls, "OUTPUT_IS_LIST"):
        assert len(cls.OUTPUT_IS_LIST) == n
    for t in cls.RETURN_TYPES:
        assert t in SOCKET_TYPES | WIDGET_TYPES, t


@pytest.mark.parametrize("node_id, cls", NODES)
def test_inputs_have_types_tooltips_and_ranges(node_id, cls):
    for name, spec, group in _inputs(cls):
        kind, opts = spec
        assert isinstance(opts.get("tooltip"), str) and len(opts["tooltip"]) > 5, f"{node_id}.{name}: tooltip"
        if isinstance(kind, list):
            if (node_id, name) in FILE_LISTS:  # the files in a models folder: none here, as in a fresh ComfyUI
                assert all(isinstance(c, str) for c in kind) and "default" not in opts
                continue
            assert kind and all(isinstance(c, str) for c in kind), f"{node_id}.{name}: empty combo"
            assert opts.get("default", kind[0]) in kind
            continue
        assert kind in SOCKET_TYPES | WIDGET_TYPES, f"{node_id}.{name}: unknown type {kind}"
        if kind in ("INT", "FLOAT"):
            lo, hi, default = opts["min"], opts["max"], opts["default"]
            assert lo <= default <= hi, f"{node_id}.{name}: default {default} outside [{lo}, {hi}]"
            if kind == "INT":
                assert all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi, default))
            assert opts.get("step", 1) > 0
        if kind == "BOOLEAN":
            assert isinstance(opts["default"], bool)
        if kind == "STRING":
            assert isinstance(opts.get("default", ""), str)
        if kind == "INT" and name == "seed":  # training seeds stay fixed between runs (no randomize widget)
            assert opts.get("control_after_generate") is False


def _frontend_float(value: float, opts: dict) -> float:
    """What ComfyUI's frontend stores for a FLOAT widget typed as `value` (comfyui_frontend_package 1.27,
    useFloatWidget + onFloatValueChange): its decimals come from `step`, even when `round` is finer."""
    precision = max(0, -math.floor(math.log10(opts.get("step", 0.5))))
    r = opts.get("round") or (10.0 ** -precision if precision else None)
    if r:
        value = float(f"{round(value / r) * r:.{precision}f}")
    return min(max(value, opts["min"]), opts["max"])


@pytest.mark.parametrize("node_id, cls", NODES)
def test_float_widgets_keep_the_values_their_round_allows(node_id, cls):
    """lr had step 1e-5 and round 1e-6: the frontend kept 5 decimals, so a typed 5e-6 was stored as 1e-6 (and
    any lr between 1e-6 and 1e-5 as another one), silently (review A1)."""
    for name, (kind, opts), _ in _inputs(cls):
        if kind != "FLOAT":
            continue
        assert _frontend_float(opts["default"], opts) == pytest.approx(opts["default"], rel=1e-9), name
        r = opts.get("round")
        if r:
            for k in (1, 3, 5, 7, 15, 25):  # values on the round's own grid come back as typed
                v = opts["min"] + k * r
                if v <= opts["max"]:
                    assert _frontend_float(v, opts) == pytest.approx(v, rel=1e-9), f"{node_id}.{name}: {v}"


@pytest.mark.parametrize("node_id, cls", NODES)
def test_function_signature_matches_inputs(node_id, cls):
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    for name, _, group in _inputs(cls):
        assert name in params, f"{node_id}.{cls.FUNCTION} lacks parameter {name}"
        if group == "optional":
            assert params[name].default is not inspect.Parameter.empty, f"{node_id}: optional {name} needs a default"
    if hasattr(cls, "VALIDATE_INPUTS"):
        names = {n for n, _, _ in _inputs(cls)}
        assert set(inspect.signature(cls.VALIDATE_INPUTS).parameters) <= names


def test_focus_n_fix_validate_inputs_names_k_and_steps():
    cls = PACK.NODE_CLASS_MAPPINGS["FocusFixTrainFocusNFix"]
    msg = cls.VALIDATE_INPUTS(steps=4, K=6)
    assert isinstance(msg, str) and "K (now 6)" in msg and "steps (now 4)" in msg
    assert cls.VALIDATE_INPUTS(steps=4, K=4) is True
    assert "K (0) must be at least 1" in cls.VALIDATE_INPUTS(steps=4, K=0)
    assert "steps (0) must be at least 1" in cls.VALIDATE_INPUTS(steps=0, K=1)


def test_saliency_mask_checks_its_threshold_at_queue_time():
    cls = PACK.NODE_CLASS_MAPPINGS["FocusFixSaliencyMask"]
    assert cls.VALIDATE_INPUTS(threshold_mode="top_percent", threshold=0.15) is True
    assert "top_percent" in cls.VALIDATE_INPUTS(threshold_mode="top_percent", threshold=0.0)
    assert "threshold (1.5) must be at most 1" in cls.VALIDATE_INPUTS(threshold_mode="value", threshold=1.5)
    assert cls.VALIDATE_INPUTS(threshold_mode="top_percent", threshold=None) is True  # linked: checked when it runs
    # a combo VALIDATE_INPUTS names skips ComfyUI's own check: a bad value in an API prompt is refused here
    assert "threshold_mode must be one of" in cls.VALIDATE_INPUTS(threshold_mode="bogus", threshold=None)
    fnf = PACK.NODE_CLASS_MAPPINGS["FocusFixTrainFocusNFix"]
    assert "mask_source must be one of" in fnf.VALIDATE_INPUTS(steps=4, K=1, mask_source="painted")


def test_prompts_and_seeds_formats_are_checked_at_queue_time():
    fnf = PACK.NODE_CLASS_MAPPINGS["FocusFixTrainFocusNFix"]
    assert fnf.VALIDATE_INPUTS(steps=4, K=1, seeds="0, 2-4") is True
    assert "seeds: 'x' is not an integer" in fnf.VALIDATE_INPUTS(steps=4, K=1, seeds="0, x")
    assert "seeds is empty" in fnf.VALIDATE_INPUTS(steps=4, K=1, seeds=" ")
    sne = PACK.NODE_CLASS_MAPPINGS["FocusFixTrainSeparateEnhance"]
    assert sne.VALIDATE_INPUTS(prompts="a cat and a dog | cat, dog\n# a comment") is True
    assert "needs object words after '|'" in sne.VALIDATE_INPUTS(prompts="a cat and a dog")
    assert "at least two object words" in sne.VALIDATE_INPUTS(prompts="a cat and a dog | cat")
    assert "prompts is empty" in sne.VALIDATE_INPUTS(prompts="")
    assert sne.VALIDATE_INPUTS(prompts=None) is True  # linked: checked when the node runs


def test_focus_n_fix_validate_inputs_leaves_linked_inputs_to_run_time():
    """ComfyUI passes None for a linked input at queue time; its value is checked when the node runs."""
    cls = PACK.NODE_CLASS_MAPPINGS["FocusFixTrainFocusNFix"]
    assert cls.VALIDATE_INPUTS(steps=None, K=6) is True
    assert cls.VALIDATE_INPUTS(steps=4, K=None) is True
    assert cls.VALIDATE_INPUTS(steps=4, K=6, sigmas=None) is True  # SIGMAS' own step count bounds K


def test_node_classes_are_thin():
    """STYLE rule 11: the execute bodies stay short (the schema may be long, the logic lives elsewhere)."""
    for node_id, cls in NODES:
        lines = inspect.getsourcelines(getattr(cls, cls.FUNCTION))[0]
        assert len(lines) <= 45, f"{node_id}.{cls.FUNCTION} has {len(lines)} lines"


def test_clock():
    clock = sys.modules[f"{PACK.__name__}.nodes.common"].clock
    assert [clock(s) for s in (0, 59.6, 75, 3725)] == ["0:00", "1:00", "1:15", "1:02:05"]


def test_separate_enhance_with_no_loss_weight_is_refused_at_queue_time():
    se = PACK.NODE_CLASS_MAPPINGS["FocusFixTrainSeparateEnhance"]
    line = "a cat and a dog | cat, dog"
    assert "lam_sep and lam_en are both 0" in se.VALIDATE_INPUTS(prompts=line, lam_sep=0.0, lam_en=0.0)
    assert se.VALIDATE_INPUTS(prompts=line, lam_sep=0.0, lam_en=1.0) is True
    assert "lam_sep (-1.0) must be at least 0.0" in se.VALIDATE_INPUTS(prompts=line, lam_sep=-1.0, lam_en=1.0)


def test_seed_widgets_take_ksamplers_range():
    """A seed linked from KSampler's (or a primitive shared with it) may be any 64-bit value: the nodes check a
    linked value against their own widget range when they run, so their range is KSampler's."""
    for name in ("FocusFixAttentionMaps", "FocusFixTrainFocusNFix", "FocusFixTrainSeparateEnhance"):
        seed = PACK.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["required"]["seed"][1]
        assert (seed["min"], seed["max"]) == (0, 0xFFFFFFFFFFFFFFFF), name
