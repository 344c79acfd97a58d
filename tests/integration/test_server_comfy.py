"""A real ComfyUI server (main.py, CPU, the `server` fixture of conftest.py) with FocusFix in a custom_nodes folder:
import, /object_info, workflow templates, and one shipped workflow queued over HTTP (POST /prompt, GET /history)."""
from __future__ import annotations

import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_pack_imports_without_failure(server):
    text = (server.tmp / "server.log").read_text()
    failed = [line for line in text.splitlines() if "IMPORT FAILED" in line and server.pack in line]
    assert not failed, failed


def test_object_info_lists_every_node_with_tooltips(server):
    info = server.get("/object_info", timeout=60)
    ours = {k: v for k, v in info.items() if k.startswith("FocusFix") and v["category"].startswith("FocusFix/")}
    assert {k for k, v in ours.items() if v["category"] != "FocusFix/testing"} == {
        "FocusFixLoadReward", "FocusFixCombineRewards", "FocusFixScoreImages", "FocusFixSaliencyMask",
        "FocusFixAttentionMaps", "FocusFixTrainFocusNFix", "FocusFixTrainSeparateEnhance", "FocusFixApplyLoRA",
        "FocusFixLoadLoRA", "FocusFixSaveLoRA", "FocusFixCompare"}
    for k, v in ours.items():
        assert v["display_name"].startswith("FocusFix ")
        for group in ("required", "optional"):
            for name, spec in v["input"].get(group, {}).items():
                assert spec[1].get("tooltip"), f"{k}.{name}"
    assert any(c.startswith("builtin:") for c in info["FocusFixLoadReward"]["input"]["required"]["reward_name"][0])


def test_workflow_templates_served(server):
    templates = server.get("/api/workflow_templates")
    assert sorted(templates[server.pack]) == sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    ui = server.get(f"/api/workflow_templates/{server.pack}/focusfix_4_inspect_attention.json")
    assert ui["nodes"]


def _queue_and_wait(server, api: dict, **extra) -> dict:
    """POST /prompt (with `extra` fields), then poll /history until it completes; its history entry."""
    pid = server.get("/prompt", {"prompt": api, "client_id": "focusfix-test", **extra})["prompt_id"]
    deadline = time.time() + 120
    while time.time() < deadline:
        hist = server.get(f"/history/{pid}")
        if pid in hist and hist[pid]["status"].get("completed") is not None:
            return hist[pid]
        time.sleep(0.5)
    raise AssertionError("workflow did not finish:\n" + (server.tmp / "server.log").read_text()[-3000:])


def test_queue_a_workflow_over_http(server, wt):
    api = wt.shrink(wt.swap_loader(json.loads((REPO / "workflows/api/focusfix_4_inspect_attention.json").read_text()), "sd15"))
    done = _queue_and_wait(server, api)
    assert done["status"]["status_str"] == "success", done["status"]
    assert done["outputs"]


def test_the_mask_can_be_tuned_before_any_training(server, wt):
    """Workflows 2 and 5 say: run only the Saliency Mask's preview (the toolbar's play button) to see the mask
    without training (a whole Queue starts the Train node early). The frontend sends that as
    partial_execution_targets; only the preview's own inputs may run."""
    api = wt.shrink(wt.swap_loader(json.loads(
        (REPO / "workflows/api/focusfix_2_fix_what_reward_dislikes.json").read_text()), "sd15"))
    target = next(k for k, v in api.items() if v["class_type"] == "PreviewImage"
                  and api[v["inputs"]["images"][0]]["class_type"] == "FocusFixSaliencyMask")
    done = _queue_and_wait(server, api, partial_execution_targets=[target])
    assert done["status"]["status_str"] == "success", done["status"]
    assert list(done["outputs"]) == [target]  # the Train node's previews and Save LoRA did not run
