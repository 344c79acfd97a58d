"""benchmarks/compile_check.py (issue 6): one denoiser call through the pack's adapter on ComfyUI's UNet traces
into a single torch.compile graph (what CUDA graphs need), with the LoRA hooked, merged, and with gradients.
The checks that trace a UNet need ComfyUI (COMFYUI_DIR and a python that imports it) and skip with the reason
otherwise; the script's own helpers are checked without it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from bench_scripts import load_script
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


@pytest.fixture(scope="module")
def tiny_calls() -> dict:
    """Both families at tiny size on the CPU, run once for the tests that read it."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    return _run("--models", "sd15,sdxl", "--size", "tiny")


def test_bad_calls_refused_6():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--calls", "nope"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode != 0 and "unknown --calls ['nope']" in proc.stderr


@pytest.mark.comfyui
@compile_checked
def test_one_graph_per_call_through_comfyui_6(tiny_calls):
    for model in tiny_calls["models"]:
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


def test_off_device_nodes_looks_inside_multi_output_nodes_6():
    """A node whose value is a tuple (split, a flash op's outputs) is checked tensor by tensor."""
    cc = load_script("compile_check")
    cpu = torch.zeros(1)
    nodes = [types.SimpleNamespace(op="call_method", target="split", meta={"example_value": (cpu, cpu)}),
             types.SimpleNamespace(op="call_function", target="mul",
                                   meta={"example_value": torch.zeros(1, device="meta")})]
    gm = types.SimpleNamespace(graph=types.SimpleNamespace(nodes=nodes))
    found = cc.off_device_nodes([gm], torch.device("meta"))
    assert found == {"call_method split -> cpu (1,)": 2}


def test_break_location_is_the_innermost_frame_outside_torch_6():
    """A graph break is reported at the last frame not in torch itself (the user's or ComfyUI's line)."""
    cc = load_script("compile_check")
    frame = types.SimpleNamespace
    brk = types.SimpleNamespace(user_stack=[frame(filename="/c/comfy/ldm/attention.py", lineno=3),
                                            frame(filename="/c/nodes/adapters.py", lineno=7),
                                            frame(filename="/v/site-packages/torch/nn/modules/module.py", lineno=9)])
    assert cc._where(brk) == "adapters.py:7"
    assert cc._where(types.SimpleNamespace(user_stack=[])) == "?"


@pytest.mark.parametrize("device, dtype", [("cuda", torch.bfloat16), ("cpu", torch.float32)])
def test_compile_check_builds_in_bf16_on_cuda_6(monkeypatch, device, dtype):
    """On a GPU the traced model is bf16 (what the trainer runs there); on the CPU fp32."""
    cc = load_script("compile_check")
    built = []

    class Built(Exception):
        pass

    def build_comfy(family, size, dev, dt, **kw):
        built.append((family, size, dev.type, dt, kw))
        raise Built

    monkeypatch.setattr(cc.ts, "build_comfy", build_comfy)
    args = cc.parse_args(["--device", device, "--models", "sd15"])
    with pytest.raises(Built):
        cc.run("sd15", args)
    assert built == [("sd15", "tiny", device, dtype, {"inference_weights": True, "attention": "pytorch"})]


@pytest.mark.comfyui
@compile_checked
def test_compile_check_calls_after_the_merged_one_run_the_hooks_6(tiny_calls):
    """The merged call restores the LoRA: the differentiated call after it traces the hooks again (more ops than the
    merged one); tiny size is 64 px."""
    m = next(m for m in tiny_calls["models"] if m["family"] == "sd15")
    assert m["image"] == 64 and m["size"] == "tiny"
    calls = m["calls"]
    assert list(calls) == ["hooks", "merged", "grad"]
    assert calls["grad"]["ops"] > calls["merged"]["ops"]
