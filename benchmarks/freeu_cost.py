"""What a MODEL whose patch writes in place into saved tensors (FreeU_V2) costs a training step, against FreeU (v1).

The trainer draws such a step again under `torch.autograd.graph.allow_mutation_on_saved_tensors` (and every later
one). This runs Train Focus-N-Fix through a real ComfyUI, in process as the integration tests do, on the tiny SD1.5
layout (random weights, no checkpoint), and prints JSON: seconds per step for each MODEL and their ratio.

    COMFYUI_DIR=/path/ComfyUI python benchmarks/freeu_cost.py [--size 128] [--steps 10] [--iterations 6] [--runs 2]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _comfy():
    spec = importlib.util.spec_from_file_location("ff_conftest", REPO / "tests" / "integration" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    sys.modules["ff_conftest"] = conftest
    spec.loader.exec_module(conftest)
    if not conftest.COMFYUI_DIR:
        raise SystemExit("set COMFYUI_DIR to a ComfyUI checkout")
    return conftest._setup(Path(tempfile.mkdtemp(prefix="focusfix-freeu-"))), conftest.load_tool("tiny_models")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--runs", type=int, default=2)
    a = p.parse_args(argv)
    comfy, tiny = _comfy()
    with torch.inference_mode():
        model, clip, vae = tiny.tiny_checkpoint("sd15", 0)
    (reward,) = comfy.run("FocusFixLoadReward", reward_name="builtin:sharpness")
    models = {name: comfy.run(name, model=model, b1=1.3, b2=1.4, s1=0.9, s2=0.2)[0] for name in ("FreeU", "FreeU_V2")}
    seconds = {name: [] for name in models}
    for _ in range(a.runs):
        for name, m in models.items():
            *_, report = comfy.run(
                "FocusFixTrainFocusNFix", model=m, clip=clip, vae=vae, reward=reward, prompts="a cat",
                negative_prompt="", seeds="3", width=a.size, height=a.size, steps=a.steps, cfg=3.0, K=1, lam=1.0,
                mask_source="heatmap", rank=2, targets="attn", lr=1e-2, iterations=a.iterations, seed=0)
            line = next(x for x in report.splitlines() if x.startswith("trained "))
            seconds[name].append(float(line.split("(")[1].split(" s per step")[0]))
    import comfy.model_management as mm  # importable once _comfy() has set ComfyUI up
    out = {"device": str(mm.get_torch_device()), "settings": vars(a), "s_per_step": seconds,
           "ratio_FreeU_V2_over_FreeU": min(seconds["FreeU_V2"]) / min(seconds["FreeU"])}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
