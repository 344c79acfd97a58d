"""A real ComfyUI server (main.py, CPU) with FocusFix in a custom_nodes folder: import, /object_info,
workflow templates, and one shipped workflow queued over HTTP (POST /prompt, GET /history)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK = "ComfyUI-FocusFix"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, data=None, timeout=10):
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = os.environ.get("COMFYUI_DIR")
    if not root:
        pytest.skip("COMFYUI_DIR is not set")
    tmp = tmp_path_factory.mktemp("server")
    custom = tmp / "custom_nodes"
    custom.mkdir()
    (custom / PACK).symlink_to(REPO, target_is_directory=True)
    (custom / "focusfix_test_tiny").symlink_to(REPO / "tests" / "comfy_testing", target_is_directory=True)
    (tmp / "extra.yaml").write_text(f"focusfix_test:\n    base_path: {tmp}\n    custom_nodes: custom_nodes/\n")
    for d in ("out", "in", "user"):
        (tmp / d).mkdir()
    port = _free_port()
    log = open(tmp / "server.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--database-url", "sqlite:///:memory:", "--output-directory", str(tmp / "out"),
         "--input-directory", str(tmp / "in"), "--user-directory", str(tmp / "user"),
         "--temp-directory", str(tmp),  # previews go to tmp/temp, not into the ComfyUI checkout
         "--extra-model-paths-config", str(tmp / "extra.yaml")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                _get(url + "/object_info/FocusFixApplyLoRA", timeout=5)
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError("server did not start:\n" + (tmp / "server.log").read_text()[-3000:])
                time.sleep(1)
        yield url, tmp
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_pack_imports_without_failure(server):
    _, tmp = server
    text = (tmp / "server.log").read_text()
    failed = [line for line in text.splitlines() if "IMPORT FAILED" in line and PACK in line]
    assert not failed, failed


def test_object_info_lists_every_node_with_tooltips(server):
    url, _ = server
    info = _get(url + "/object_info", timeout=60)
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
    url, _ = server
    templates = _get(url + "/api/workflow_templates")
    assert sorted(templates[PACK]) == sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    ui = _get(f"{url}/api/workflow_templates/{PACK}/focusfix_4_inspect_attention.json")
    assert ui["nodes"]


def _queue_and_wait(server, api: dict, **extra) -> dict:
    """POST /prompt (with `extra` fields), then poll /history until it completes; its history entry."""
    url, tmp = server
    pid = _get(url + "/prompt", {"prompt": api, "client_id": "focusfix-test", **extra})["prompt_id"]
    deadline = time.time() + 120
    while time.time() < deadline:
        hist = _get(f"{url}/history/{pid}")
        if pid in hist and hist[pid]["status"].get("completed") is not None:
            return hist[pid]
        time.sleep(0.5)
    raise AssertionError("workflow did not finish:\n" + (tmp / "server.log").read_text()[-3000:])


def test_queue_a_workflow_over_http(server, wt):
    api = wt.shrink(wt.swap_loader(json.loads((REPO / "workflows/api/focusfix_4_inspect_attention.json").read_text()), "sd15"))
    done = _queue_and_wait(server, api)
    assert done["status"]["status_str"] == "success", done["status"]
    assert done["outputs"]


def test_the_mask_can_be_tuned_before_any_training(server, wt):
    """Workflows 2 and 5 say: 'Queue Selected Output Nodes' on the Saliency Mask's preview shows the mask
    without training (a whole Queue starts the Train node early). The frontend sends that as
    partial_execution_targets; only the preview's own inputs may run."""
    api = wt.shrink(wt.swap_loader(json.loads(
        (REPO / "workflows/api/focusfix_2_fix_what_reward_dislikes.json").read_text()), "sd15"))
    target = next(k for k, v in api.items() if v["class_type"] == "PreviewImage"
                  and api[v["inputs"]["images"][0]]["class_type"] == "FocusFixSaliencyMask")
    done = _queue_and_wait(server, api, partial_execution_targets=[target])
    assert done["status"]["status_str"] == "success", done["status"]
    assert list(done["outputs"]) == [target]  # the Train node's previews and Save LoRA did not run
