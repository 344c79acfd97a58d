"""The shipped workflows validate and run headless through ComfyUI's own executor (in-process).

The checkpoint loader is swapped for the test-only tiny loader, and sizes/steps are shrunk so a CPU run
takes seconds; everything else (node types, links, widget values) is the checked-in API twin.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
# Workflow 5 needs reward and CLIP vision files: test_reward_families_comfy.py runs it with tiny test files.
API = sorted(p for p in (REPO / "workflows" / "api").glob("*.json") if "aesthetic_safety" not in p.stem)
PAINTED = "focusfix_I0_painted.png"


@pytest.fixture
def painted(comfy):
    """An RGBA PNG in the input folder whose alpha is the painted region (LoadImage's MASK = 1 - alpha)."""
    from PIL import Image
    import numpy as np
    import folder_paths
    rgba = np.full((64, 64, 4), 128, dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[16:48, 16:48, 3] = 0  # painted (erased) in the mask editor
    Image.fromarray(rgba, "RGBA").save(Path(folder_paths.get_input_directory()) / PAINTED)
    return PAINTED


@pytest.mark.parametrize("path", API, ids=lambda p: p.stem)
def test_full_size_workflow_validates(comfy, wt, path, painted):
    """ComfyUI's own validation accepts every widget value and link of the shipped settings."""
    import asyncio
    import execution
    api = wt.swap_loader(json.loads(path.read_text()), "sd15")
    ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt("v", api, None))
    assert ok, (err, node_errors)
    assert outputs


@pytest.mark.parametrize("path", API, ids=lambda p: p.stem)
def test_workflow_runs_headless(fresh, wt, path, layout, painted):
    api = wt.shrink(wt.swap_loader(json.loads(path.read_text()), layout))
    ex = fresh.execute(api)
    errors = [d for e, d in ex.status_messages if e == "execution_error"]
    assert ex.success and not errors, errors[:1]
    assert any(e == "execution_success" for e, _ in ex.status_messages)
    outputs = ex.history_result["outputs"]
    previews = [nid for nid, node in api.items() if node["class_type"] in ("PreviewImage", "SaveImage", "PreviewAny")]
    assert previews and all(nid in outputs for nid in previews), set(previews) - set(outputs)
    saves = [n for n in api.values() if n["class_type"] == "FocusFixSaveLoRA"]
    if saves:
        names = [p.relative_to(fresh.loras).as_posix() for p in fresh.loras.rglob("*.safetensors")]
        assert names == [saves[0]["inputs"]["filename"] + ".safetensors"]
        if "preview" in saves[0]["inputs"]:  # the Train node's after image is the LoRA's thumbnail
            assert (fresh.loras / (saves[0]["inputs"]["filename"] + ".preview.png")).is_file()


def test_cancel_through_the_executor_leaves_no_lora(fresh, wt, painted):
    """Interrupt mid-training in a real graph: an execution_interrupted event, no file, the model clean."""
    path = next(p for p in API if "reward_dislikes" in p.stem)
    api = wt.shrink(wt.swap_loader(json.loads(path.read_text()), "sd15"))
    for node in api.values():
        if node["class_type"] == "FocusFixTrainFocusNFix":
            node["inputs"]["iterations"] = 6
    fresh.interrupt_at, fresh.interrupt_total = 2, 6  # the training node's bar, not KSampler's
    ex = fresh.execute(api)
    events = [e for e, _ in ex.status_messages]
    assert "execution_interrupted" in events and "execution_success" not in events
    assert not list(fresh.loras.rglob("*.safetensors"))
    assert not [p for p in fresh.loras.rglob("*") if p.suffix == ".tmp"]
    training = [v for v, t, _ in fresh.progress if t == 6]
    assert training and max(training) == 2, training


def test_k_larger_than_steps_is_refused_before_running(comfy, wt):
    """VALIDATE_INPUTS turns K > steps into a node error at queue time, naming both numbers (ComfyUI then
    runs only the outputs that do not depend on the training node, or answers 400 when none is left)."""
    import asyncio
    import execution
    path = next(p for p in API if "reward_dislikes" in p.stem)
    api = wt.swap_loader(json.loads(path.read_text()), "sd15")
    train = next(k for k, n in api.items() if n["class_type"] == "FocusFixTrainFocusNFix")
    api[train]["inputs"].update(K=30, steps=20)
    ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt("v", api, None))
    assert train in node_errors
    assert "K (now 30)" in json.dumps(node_errors[train]) and "steps (now 20)" in json.dumps(node_errors[train])


def test_prompt_and_seed_formats_are_refused_before_running(comfy, wt):
    """A typo in seeds (workflow 2) or an S&E prompt line without its object words (workflow 3) is a node error
    at queue time, not a failure after the models have loaded."""
    import asyncio
    import execution
    for stem, node_type, inputs, expected in (
            ("reward_dislikes", "FocusFixTrainFocusNFix", {"seeds": "0, 1, x"}, "seeds: 'x' is not an integer"),
            ("separate_and_enhance", "FocusFixTrainSeparateEnhance", {"prompts": "a cat and a dog"},
             "needs object words after '|'")):
        path = next(p for p in API if stem in p.stem)
        api = wt.swap_loader(json.loads(path.read_text()), "sd15")
        node = next(k for k, n in api.items() if n["class_type"] == node_type)
        api[node]["inputs"].update(inputs)
        _, _, _, node_errors = asyncio.run(execution.validate_prompt("v", api, None))
        assert expected in json.dumps(node_errors[node]), node_errors


def test_saved_loras_carry_the_graph_that_made_them(fresh, wt, painted):
    """As ComfyUI's checkpoint and image saves do: the LoRA that Save LoRA writes, and the Train node's
    checkpoints, hold the API prompt and the editor's workflow in their metadata (none with --disable-metadata)."""
    from comfy.cli_args import args
    from safetensors import safe_open
    path = next(p for p in API if "reward_dislikes" in p.stem)
    ui = json.loads((REPO / "workflows" / path.name).read_text())
    api = wt.shrink(wt.swap_loader(json.loads(path.read_text()), "sd15"))
    train = next(k for k, n in api.items() if n["class_type"] == "FocusFixTrainFocusNFix")
    api[train]["inputs"].update(checkpoint_every=1, checkpoint_name="ckpt/fix")
    save = next(n for n in api.values() if n["class_type"] == "FocusFixSaveLoRA")
    for disabled in (False, True):
        for f in fresh.loras.rglob("*"):  # previews too: a preview left behind keeps its name taken
            if f.is_file():
                f.unlink()
        args.disable_metadata = disabled
        try:
            ex = fresh.execute(api, extra_data={"extra_pnginfo": {"workflow": ui}})
        finally:
            args.disable_metadata = False
        assert ex.success
        files = sorted(p.relative_to(fresh.loras).as_posix() for p in fresh.loras.rglob("*.safetensors"))
        assert files == ["ckpt/fix.safetensors", save["inputs"]["filename"] + ".safetensors"]
        for name in files:
            with safe_open(str(fresh.loras / name), "pt") as f:
                meta = f.metadata()
            assert meta["ss_network_dim"] and meta["focusfix_method"] == "focus-n-fix"
            if disabled:
                assert "workflow" not in meta and "prompt" not in meta
            else:
                assert json.loads(meta["workflow"]) == ui and json.loads(meta["prompt"]) == api


def _linked(wt, layout: str):
    """Workflow 2 with its steps shared the way artists share them: one PrimitiveInt drives KSampler's steps and
    the Train node's (ComfyUI's validator then passes None for them)."""
    path = next(p for p in API if "reward_dislikes" in p.stem)
    api = wt.shrink(wt.swap_loader(json.loads(path.read_text()), layout))
    api["900"] = {"class_type": "PrimitiveInt", "inputs": {"value": wt.SHRINK["steps"]}}
    train = next(k for k, n in api.items() if n["class_type"] == "FocusFixTrainFocusNFix")
    for node in api.values():
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = ["900", 0]
    return api, train


def test_linked_steps_and_sigmas_pass_validation(comfy, wt):
    import asyncio
    import execution
    api, train = _linked(wt, "sd15")
    ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt("v", api, None))
    assert ok and not node_errors, (err, node_errors)
    # SIGMAS connected: their step count, not the steps widget, bounds K (checked when the node runs)
    api[train]["inputs"].update(steps=20, K=25)
    api["901"] = {"class_type": "BasicScheduler", "inputs": {"model": api[train]["inputs"]["model"],
                                                            "scheduler": "karras", "steps": 30, "denoise": 1.0}}
    api[train]["inputs"]["sigmas"] = ["901", 0]
    ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt("v", api, None))
    assert ok and not node_errors, (err, node_errors)
    api[train]["inputs"]["K"] = 0  # a value still gets the range check ComfyUI skips for inputs we validate
    _, _, _, node_errors = asyncio.run(execution.validate_prompt("v", api, None))
    assert "K (0) must be at least 1" in json.dumps(node_errors[train])


def test_linked_steps_run_and_are_checked_when_the_node_runs(fresh, wt):
    api, train = _linked(wt, "sd15")
    ex = fresh.execute(api)
    assert ex.success, [d for e, d in ex.status_messages if e == "execution_error"][:1]
    api, train = _linked(wt, "sd15")
    api[train]["inputs"]["K"] = wt.SHRINK["steps"] + 1
    ex = fresh.execute(api)
    errors = [d for e, d in ex.status_messages if e == "execution_error"]
    assert errors and errors[0]["node_id"] == train
    message = errors[0]["exception_message"]
    assert "K (now 4) must be between 1 and steps (now 3)" in message, message


def test_painted_region_workflow_pass_1_on_a_fresh_install(fresh, wt):
    """Workflow 1's pass 1, before anything is painted (no such file in input/): ComfyUI refuses only the nodes
    that need the mask, and 'KSampler (base)' still saves the image to paint (the trainer's I0)."""
    import asyncio
    import execution
    import folder_paths
    (Path(folder_paths.get_input_directory()) / PAINTED).unlink(missing_ok=True)
    path = REPO / "workflows" / "api" / "focusfix_1_fix_painted_region.json"
    api = wt.shrink(wt.swap_loader(json.loads(path.read_text()), "sd15"))
    ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt("v", api, None))
    base = next(i for i, n in api.items() if n["inputs"].get("filename_prefix") == "focusfix/before")
    assert ok and outputs == [base], (err, outputs)
    load = next(i for i, n in api.items() if n["class_type"] == "LoadImage")
    assert any(load in str(e) or load == i for i, e in node_errors.items())
    ex = fresh.execute({k: v for k, v in api.items() if k in _ancestors(api, base)})
    assert ex.success and ex.history_result["outputs"][base]["images"]


def _ancestors(api: dict, nid: str) -> set[str]:
    """nid and every node it reads from (what ComfyUI runs for that one output)."""
    seen, todo = set(), [nid]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += [v[0] for v in api[n]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return seen


def test_painted_region_workflow_ksamplers_draw_the_trainers_images(fresh, wt, layout, painted):
    """Workflow 1 as shipped (shrunk, lr raised so two steps show): 'KSampler (base)' saves the trainer's I0 and
    'KSampler (with the LoRA)' its after image, pixel for pixel in the 8-bit files (float rounding may move a
    value by one level)."""
    import numpy as np
    import folder_paths
    from PIL import Image
    path = REPO / "workflows" / "api" / "focusfix_1_fix_painted_region.json"
    api = wt.shrink(wt.swap_loader(json.loads(path.read_text()), layout))
    for node in api.values():
        if node["class_type"] == "FocusFixTrainFocusNFix":
            node["inputs"]["lr"] = 1e-2
    ex = fresh.execute(api)
    assert ex.success
    outputs = ex.history_result["outputs"]

    def saved(pick):
        (nid,) = [i for i, n in api.items() if n["class_type"] in ("SaveImage", "PreviewImage") and pick(n)]
        (f,) = outputs[nid]["images"]
        file = Path(folder_paths.get_directory_by_type(f["type"])) / f["subfolder"] / f["filename"]
        return np.asarray(Image.open(file)).astype(int)

    before = saved(lambda n: n["inputs"].get("filename_prefix") == "focusfix/before")  # KSampler (base)
    after = saved(lambda n: n["inputs"].get("filename_prefix") == "focusfix/after")    # KSampler (with the LoRA)
    assert np.abs(saved(lambda n: n["_meta"]["title"] == "Before (trainer)") - before).max() <= 1
    assert np.abs(saved(lambda n: n["_meta"]["title"] == "After (trainer)") - after).max() <= 1
    assert np.abs(before - after).max() > 1, "two steps should change the image (else this test proves nothing)"
