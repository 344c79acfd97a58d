"""benchmarks/compile_check.py (issue 6): one denoiser call through the pack's adapter on ComfyUI's UNet traces
into a single torch.compile graph (what CUDA graphs need), with the LoRA hooked, merged, and with gradients.
Needs ComfyUI (COMFYUI_DIR and a python that imports it); skipped with the reason otherwise."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch_versions import compile_checked

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "compile_check.py"


def _skip_reason() -> str | None:  # a COMFYUI_DIR this python cannot import: tests/conftest.py skips (comfyui mark)
    if not os.environ.get("COMFYUI_DIR", ""):
        return "COMFYUI_DIR is not set: the compile check needs ComfyUI's UNet classes"
    return None


def _run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, f"compile_check.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def test_bad_calls_refused_6():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--calls", "nope"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode != 0 and "unknown --calls ['nope']" in proc.stderr


@pytest.mark.comfyui
@compile_checked
def test_one_graph_per_call_through_comfyui_6():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    doc = _run("--models", "sd15,sdxl", "--size", "tiny")
    for model in doc["models"]:
        assert model["comfy_attention"] == "attention_pytorch"
        assert sorted(model["calls"]) == ["grad", "hooks", "merged"]
        for kind, row in model["calls"].items():
            assert (row["graphs"], row["graph_breaks"]) == (1, 0), (model["family"], kind, row["break_reasons"])
            assert row["ops"] > 100
        # merging removes the adapters' ops from the call
        assert model["calls"]["merged"]["ops"] < model["calls"]["hooks"]["ops"]


def test_off_device_nodes_finds_cpu_work_in_a_device_graph_6():
    """The check itself: a call on meta tensors that builds a tensor on the CPU (as ComfyUI's SDXL encode_adm
    does) is reported, one that stays on meta is not."""
    import torch
    import torch._dynamo
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import compile_check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    def on_cpu(x):
        return x * 2 + torch.tensor([3.0]).sin().to(x.device)

    def on_device(x):
        return x * 2 + torch.full((1,), 3.0, device=x.device).sin()

    x = torch.randn(4, device="meta")
    found = []
    for fn in (on_cpu, on_device):
        torch._dynamo.reset()
        ex = torch._dynamo.explain(fn)(x)
        found.append(sum(compile_check.off_device_nodes(ex.graphs, x.device).values()))
    torch._dynamo.reset()
    assert found[0] >= 2 and found[1] == 0, found


@pytest.mark.comfyui
@compile_checked
def test_sdxl_call_stays_on_the_device_6():
    """Full SDXL on meta: with the cond prepared as the trainers prepare it, the merged graph-free call has no
    CPU work inside (ComfyUI's encode_adm would put its size embeddings there, and CUDA graphs skip such graphs)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "meta", "--models", "sdxl", "--calls", "merged"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = json.loads(proc.stdout)["models"][0]["calls"]["merged"]
    assert (row["graphs"], row["graph_breaks"], row["off_device_nodes"]) == (1, 0, 0), row
