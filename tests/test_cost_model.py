"""benchmarks/cost_model.py (issue 6): the live-bytes tracker is exact on known cases; at full SD1.5 size
(meta device, needs ComfyUI) the figures are consistent with the architecture and with block checkpointing."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch_versions import meta_checked

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "cost_model.py"
COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
MIB = 2**20


def _module():
    spec = importlib.util.spec_from_file_location("cost_model_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_live_bytes_counts_what_autograd_keeps_6():
    cm = _module()
    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024))
        x = torch.randn(64, 1024)
    with torch.no_grad(), cm.LiveBytes() as live:  # hidden 1 MiB + GELU 1 MiB (+ output 0.25 MiB); no weights
        y = net(x)
    assert 2 * MIB <= live.peak <= 2.25 * MIB and live.live == y.numel() * 4
    with cm.LiveBytes() as live:  # backward: the weight and bias gradients stay, activations go
        net(x).sum().backward()
    grads = sum(p.numel() for p in net.parameters()) * 4
    assert live.live == grads and grads <= live.peak < grads + 3 * MIB


def test_op_counter_skips_views_6():
    cm = _module()
    x = torch.randn(4, 6, device="meta")
    with cm.OpCounter() as n:
        (x.unsqueeze(0).expand(2, 4, 6) * 2).view(48).relu()
    assert n.kernels == 2 and n.views == 3


@pytest.mark.comfyui
@meta_checked
def test_cost_model_sd15_full_size_6():
    if not COMFYUI_DIR or not Path(COMFYUI_DIR, "comfy").is_dir():
        pytest.skip("COMFYUI_DIR is not set: the full-size cost model needs ComfyUI's model classes")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--models", "sd15", "--batches", "1", "--variants"],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    (m,) = json.loads(proc.stdout)["models"]
    assert m["unet_parameters"] == 859_520_964  # the real SD1.5 UNet
    assert m["weights_gib"]["unet"] == pytest.approx(859_520_964 * 2 / 2**30)  # bf16
    row = m["per_batch"]["1"]
    assert 0 < row["unet_call_merged"]["kernels"] < row["unet_call_hooks"]["kernels"]
    tails = {k: v["above_weights_gib"] for k, v in row.items() if k.startswith("tail")}
    assert 0 < tails["tail"] < tails["tail_call_checkpoint"] < tails["tail_no_checkpoint"]
    assert tails["tail"] < 0.5 * tails["tail_call_checkpoint"]  # block-wise checkpointing: 1.4 vs 3.3 GiB here
