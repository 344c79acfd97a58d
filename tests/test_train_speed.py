"""benchmarks/train_speed.py (issue 6): the harness runs and its JSON has every figure, positive and finite.

The core backend runs everywhere (TinyModel, CPU); the comfy backend runs on tiny ComfyUI-built models when
COMFYUI_DIR points at a checkout this python can import, and is skipped with the reason shown otherwise.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from bench_scripts import StandInClock

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "train_speed.py"
COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
CASE_NUMBERS = ("iterations_per_second", "first_iteration_seconds", "tflop_per_iteration", "achieved_tflops",
                "fraction_of_peak", "peak_memory_bytes", "peak_memory_gib")


def _run(*args: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--threads", "1", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"train_speed.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _check(doc: dict, cases: list[str], models: list[str]) -> None:
    for key in ("device", "torch", "dtype", "peak_source", "settings", "levers"):
        assert doc[key], key
    assert _positive(doc["peak_tflops"])
    assert doc["failed_cases"] == [], [c.get("error") for c in doc["cases"]]
    assert sorted(doc["settings"]) == sorted(models)
    got = [(c["model"], c["case"]) for c in doc["cases"]]
    assert got == [(m, c) for m in models for c in cases]
    for c in doc["cases"]:
        spi = c["seconds_per_iteration"]
        assert _positive(spi["median"]) and _positive(spi["min"]) and spi["min"] <= spi["median"], spi
        assert len(spi["all"]) == c["iterations_timed"] == doc["iters"]
        for key in CASE_NUMBERS:
            assert _positive(c[key]), (c["case"], key, c[key])
        assert math.isfinite(c["last_loss"])
        assert c["achieved_tflops"] == pytest.approx(c["tflop_per_iteration"] / spi["median"])


@pytest.fixture(scope="module")
def core_doc() -> dict:
    return _run("--backend", "core", "--size", "tiny", "--iters", "1", "--warmup", "0", "--device", "cpu")


def test_profile_says_where_an_iteration_goes_6():
    """--profile: one more iteration per case under torch.profiler, after the timed ones (which it leaves as they
    are), with the host-side figures on a CPU: op calls, host seconds in ops and the ops that took the time."""
    doc = _run("--backend", "core", "--size", "tiny", "--iters", "1", "--warmup", "0", "--device", "cpu",
               "--cases", "fnf_b1,se_b4", "--profile")
    _check(doc, ["fnf_b1", "se_b4"], ["tiny"])
    for c in doc["cases"]:
        prof = c["profile"]
        assert "error" not in prof, prof
        assert _positive(prof["wall_seconds"]) and _positive(prof["host_seconds_in_ops"])
        assert prof["aten_op_calls"] > 100, prof["aten_op_calls"]
        assert prof["top"] and all(t["name"].startswith("aten::") and t["calls"] >= 1 for t in prof["top"])
        ms = [t["self_ms"] for t in prof["top"]]
        assert ms == sorted(ms, reverse=True) and ms[0] > 0
        assert "kernel_launches" not in prof  # device figures only on cuda
        assert len(c["history"]) == 1 + 1 + 1  # timed, FLOP-counted, profiled
    fnf, se = doc["cases"]
    assert fnf["profile"]["aten_op_calls"] > se["profile"]["aten_op_calls"]  # 4 sampler steps vs one maps pass


def test_train_speed_core_tiny_6(core_doc):
    cases = ["draft_b1", "fnf_b1", "fnf_b4", "se_preserve_b4", "se_b4"]
    assert core_doc["backend"] == "core" and core_doc["device"].startswith("cpu")
    _check(core_doc, cases, ["tiny"])
    by = {c["case"]: c for c in core_doc["cases"]}
    assert by["fnf_b4"]["tflop_per_iteration"] > by["fnf_b1"]["tflop_per_iteration"]  # batch shows in the count
    assert by["se_preserve_b4"]["tflop_per_iteration"] > by["se_b4"]["tflop_per_iteration"]  # + 2 UNet passes


def test_train_speed_levers_6(core_doc):
    """Levers switch on, keep every figure valid; the S&E early exit changes no loss and saves FLOPs."""
    doc = _run("--backend", "core", "--size", "tiny", "--iters", "1", "--warmup", "0", "--device", "cpu",
               "--cases", "draft_b1,se_b4", "--no-checkpoint", "--merge-nograd", "--se-early-exit",
               "--reward-dtype", "bf16")
    assert doc["levers"]["no_checkpoint"] and doc["levers"]["merge_nograd"] and doc["levers"]["se_early_exit"]
    assert doc["reward_dtype"] == "bf16"
    _check(doc, ["draft_b1", "se_b4"], ["tiny"])
    base = {c["case"]: c for c in core_doc["cases"]}["se_b4"]
    fast = doc["cases"][1]
    assert fast["last_loss"] == base["last_loss"]
    import focusfix_core.trainers as trainers
    if hasattr(trainers, "_StopForward"):  # the core stops early itself (benchmarks/README.md patch): no gain left
        assert fast["tflop_per_iteration"] <= base["tflop_per_iteration"] * (1 + 1e-6)
    else:
        assert fast["tflop_per_iteration"] < 0.8 * base["tflop_per_iteration"]


def test_train_speed_sampler_and_scheduler_6():
    """--sampler-name/--scheduler reach the Focus-N-Fix cases and the breakdown (the fewer-steps lever); the run
    records them, and an untrained LoRA still gives I == I0 at step 0 with the multistep sampler."""
    doc = _run("--backend", "core", "--size", "tiny", "--iters", "1", "--warmup", "0", "--device", "cpu",
               "--cases", "fnf_b1", "--sampler-name", "dpmpp_2m", "--scheduler", "karras", "--steps", "6", "--breakdown")
    _check(doc, ["fnf_b1"], ["tiny"])
    assert doc["settings"]["tiny"]["sampler_name"] == "dpmpp_2m" and doc["settings"]["tiny"]["scheduler"] == "karras"
    case = doc["cases"][0]
    assert case["breakdown_seconds"]["sample_no_grad_lora_merged"] > 0
    assert case["history"][0]["region"] == pytest.approx(0.0, abs=1e-6)


def test_train_speed_bad_case_6():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--backend", "core", "--size", "tiny", "--cases", "nope",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0 and "unknown --cases ['nope']" in proc.stderr


def test_a_failed_case_keeps_the_other_cases_figures_6(monkeypatch):
    """A case that fails (here a stand-in CUDA out-of-memory) is recorded with its error, the next case still
    runs and keeps every figure, and the run lists it under failed_cases (the command line then exits 1)."""
    train_speed = _module()
    real = train_speed.run_case

    def flaky(name, *args):
        if name == "draft_b1":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (stand-in)")
        return real(name, *args)

    monkeypatch.setattr(train_speed, "run_case", flaky)
    doc = train_speed.main(["--backend", "core", "--size", "tiny", "--iters", "1", "--warmup", "0", "--device", "cpu",
                            "--cases", "draft_b1,se_b4"])
    assert doc["failed_cases"] == ["tiny/draft_b1"]
    bad, good = doc["cases"]
    assert bad == {"model": "tiny", "case": "draft_b1",
                   "error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (stand-in)"}
    assert good["case"] == "se_b4" and _positive(good["fraction_of_peak"]) and _positive(good["iterations_per_second"])


def _comfy_skip_reason() -> str | None:
    if not COMFYUI_DIR:
        return "COMFYUI_DIR is not set: comfy-backend benchmark skipped (point it at a ComfyUI checkout)"
    if not Path(COMFYUI_DIR, "comfy").is_dir():
        return f"COMFYUI_DIR={COMFYUI_DIR!r} holds no ComfyUI checkout (no comfy/)"
    return None  # one this python cannot import: tests/conftest.py skips the test (comfyui mark)


@pytest.mark.comfyui
def test_train_speed_comfy_tiny_6():
    reason = _comfy_skip_reason()
    if reason:
        pytest.skip(reason)
    cases = ["fnf_b1", "se_preserve_b4"]
    doc = _run("--backend", "comfy", "--size", "tiny", "--models", "sd15,sdxl", "--cases", ",".join(cases),
               "--iters", "1", "--warmup", "0", "--device", "cpu", "--breakdown")
    _check(doc, cases, ["sd15", "sdxl"])
    assert doc["levers"]["inference_weights"] is True
    for case in doc["cases"]:  # the Focus-N-Fix breakdown also times ComfyUI's own KSampler on the same model
        if case["case"] == "fnf_b1":
            parts = case["breakdown_seconds"]
            assert parts["ksampler_comfy_lora_off"] > 0 and parts["sample_no_grad_lora_off"] > 0


def test_merge_when_no_grad_matches_hooks_6():
    """The merged-weights lever samples what the hooks sample and restores the host weights bit-exactly."""
    import importlib.util

    import torch

    from focusfix_core.sampler import sample

    spec = importlib.util.spec_from_file_location("train_speed", SCRIPT)
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    dev = torch.device("cpu")
    model, core = ts.build_core("tiny", dev, torch.float32)
    reward = ts.build_reward(core, "tiny", dev, torch.float32)
    args = ts.parse_args(["--backend", "core", "--size", "tiny", "--steps", "3"])
    tr = ts.make_trainer(core, "fix", {"mask_source": "none", "lam": 0.0}, 1, model, reward,
                         ts.GEOMETRY[("tiny", "tiny")], args, 1)
    with torch.no_grad():
        for a in tr.lora.adapters:
            a.up.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    x, cond = tr._noise([0]), tr._cond([0])
    weights = [h.weight.clone() for h in tr.lora._hosts]
    with torch.no_grad():
        ref = sample(tr.denoiser, x, tr.sigmas, cond, K=0)
        merge = ts.MergeWhenNoGrad(tr.denoiser, tr.lora)
        got = sample(merge, x, tr.sigmas, cond, K=0)
    assert merge.merged and not tr.lora.enabled
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    with torch.enable_grad():  # a differentiated call unmerges first
        merge(x, tr.sigmas[:1].expand(1), cond)
    assert not merge.merged and tr.lora.enabled
    assert all(torch.equal(w, h.weight) for w, h in zip(weights, tr.lora._hosts))
    tr.lora.remove()



def _module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_speed
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return train_speed


TINY = ["--backend", "core", "--size", "tiny", "--iters", "2", "--warmup", "1", "--device", "cpu"]


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"),
                    reason="--compile needs torch 2.6 (torch.compiler.set_stance keeps the FLOP count eager)")
def test_compiled_sampler_still_runs_compiled_after_the_flop_count_6(monkeypatch):
    """FlopCounterMode is a dispatch mode: a compiled frame called under it is skipped by dynamo for the rest of the
    process, and the next case (or the profile, the breakdown) would time eager code. Counted eagerly, the next
    case's timed graph-free calls all run the compiled graph, and the JSON says so. The eager backend stands in for
    Inductor (no C++ build), with compile_denoiser's own shape (a closure of one function, compiled per trainer)."""
    import torch
    import torch._dynamo

    import focusfix_core.trainers as trainers

    def compile_denoiser(denoiser, mode):
        def graph_free_call(x, sigma, cond):
            return denoiser(x, sigma, cond)
        return torch.compile(graph_free_call, backend="eager", dynamic=False)

    monkeypatch.setattr(trainers, "compile_denoiser", compile_denoiser)
    torch._dynamo.reset()
    try:
        doc = _module().main([*TINY, "--cases", "draft_b1,fnf_b1", "--compile", "default", "--breakdown",
                              "--profile"])
    finally:
        torch._dynamo.reset()
    assert doc["failed_cases"] == []
    for c in doc["cases"]:
        calls = c["compiled_sampler_calls"]
        # 2 timed iterations x (steps - K) = 3 graph-free calls each (DRaFT samples no I0)
        assert calls["timed"] == {"compiled": 6, "eager": 0}, (c["case"], calls)
        assert calls["failure"] is None
        # the FLOP-counted iteration's 3 calls ran eagerly; the profiled one, the breakdown and I0 compiled
        assert calls["whole_case"]["eager"] == 3, (c["case"], calls)
        assert "error" not in c["breakdown_seconds"] and "error" not in c["profile"]


def test_no_checkpoint_turns_every_checkpoint_off_6(core_doc):
    """--no-checkpoint: no block-wise checkpointing either (train_step passes checkpoint= itself, and
    checkpoints the model's blocks): the recompute's FLOPs go."""
    doc = _run("--backend", "core", "--size", "tiny", "--iters", "1", "--warmup", "0", "--device", "cpu",
               "--cases", "fnf_b1", "--no-checkpoint")
    base = {c["case"]: c for c in core_doc["cases"]}["fnf_b1"]
    assert doc["cases"][0]["tflop_per_iteration"] < 0.95 * base["tflop_per_iteration"]


def test_breakdown_has_its_own_peak_and_never_costs_the_case_6(monkeypatch):
    """The case's peak is the training step's: the breakdown (whose decode keeps every activation) is measured
    apart; a breakdown that fails gives its error, the case keeps its figures."""
    import time as _time

    import torch

    ts = _module()

    def big_breakdown(*args, **kwargs):
        held = torch.ones(64 * 2**20)  # 256 MiB, touched
        _time.sleep(0.1)  # sampled by the RSS thread
        return {"held": float(held[0])}

    monkeypatch.setattr(ts, "breakdown", big_breakdown)
    (case,) = ts.main([*TINY, "--cases", "draft_b1", "--breakdown"])["cases"]
    assert case["breakdown_peak_memory_bytes"] >= 200 * 2**20
    assert case["peak_memory_bytes"] < 128 * 2**20, case["peak_memory_bytes"]

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access (stand-in)")

    monkeypatch.setattr(ts, "breakdown", broken)
    doc = ts.main([*TINY, "--cases", "draft_b1", "--breakdown"])
    assert doc["failed_cases"] == []
    case = doc["cases"][0]
    assert case["breakdown_seconds"] == {"error": "RuntimeError: CUDA error: an illegal memory access (stand-in)"}
    assert _positive(case["iterations_per_second"])


def test_out_is_rewritten_after_every_case_as_strict_json_6(monkeypatch, tmp_path):
    """--out: after every case the file is a whole document of the cases so far ("finished": false until the
    end), so a run stopped at a time limit keeps them; non-finite numbers are written as null."""
    ts = _module()
    out = tmp_path / "run.json"
    seen = []

    def fake(name, *args):
        seen.append(json.loads(out.read_text()) if out.exists() else None)
        return {"case": name, "achieved_tflops": 1e-3, "history": [{"grad_norm": math.inf, "loss": math.nan}]}

    monkeypatch.setattr(ts, "run_case", fake)
    doc = ts.main([*TINY, "--cases", "draft_b1,fnf_b1", "--out", str(out)])
    assert seen[0] is None and [c["case"] for c in seen[1]["cases"]] == ["draft_b1"]
    assert seen[1]["finished"] is False
    text = out.read_text()
    assert "Infinity" not in text and "NaN" not in text
    final = json.loads(text)
    assert final["finished"] is True and [c["case"] for c in final["cases"]] == ["draft_b1", "fnf_b1"]
    assert final["cases"][0]["history"] == [{"grad_norm": None, "loss": None}]
    assert doc["cases"][0]["history"][0]["grad_norm"] == math.inf  # the document in memory is left as it is
    assert not list(tmp_path.glob("*.tmp"))


def test_out_leaves_stdout_to_the_log_6(tmp_path):
    out = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--threads", "1", *TINY, "--iters", "1", "--warmup", "0",
                           "--cases", "se_b4", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout == "" and f"wrote {out}" in proc.stderr
    doc = json.loads(out.read_text())
    _check(doc, ["se_b4"], ["tiny"])


def test_a_family_that_fails_to_build_keeps_the_others_figures_6(monkeypatch):
    """A model family's build or session failing (here SDXL's, a stand-in) is recorded under failed_models; the
    other family's cases and the document's figures stay."""
    ts = _module()

    def run_family(family, args, device, dtype, doc, save):
        if family == "sdxl":
            raise RuntimeError("CUDA out of memory while building (stand-in)")
        doc["settings"][family] = {"image": 64}
        doc["cases"].append({"model": family, "case": "fnf_b1", "achieved_tflops": 1.0})
        save()

    monkeypatch.setattr(ts, "run_family", run_family)
    doc = ts.main(["--backend", "comfy", "--size", "tiny", "--models", "sd15,sdxl", "--device", "cpu"])
    assert doc["failed_models"] == {"sdxl": "RuntimeError: CUDA out of memory while building (stand-in)"}
    assert [c["model"] for c in doc["cases"]] == ["sd15"] and doc["finished"] and _positive(doc["peak_tflops"])


def test_checkpoint_decode_swaps_the_decoders_blocks_for_one_checkpoint_6():
    """--checkpoint-decode keeps the UNet's block checkpoints and drops the VAE decoder's (the decode is then
    checkpointed whole, not nested over them); --no-checkpoint drops them all."""
    ts = _module()
    unet, decoder = torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model = SimpleNamespace(vae=SimpleNamespace(first_stage_model=SimpleNamespace(decoder=decoder)))
    for flags, kept in ((["--checkpoint-decode"], [unet]), (["--no-checkpoint"], []), ([], [unet, *decoder])):
        trainer = SimpleNamespace(_checkpoint_modules=[unet, *decoder])
        ts.checkpoint_levers(trainer, model, ts.parse_args(flags))
        assert trainer._checkpoint_modules == kept, flags


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("gpu", ["NVIDIA H100 80GB HBM3", "NVIDIA H200"])
def test_peak_table_is_used_for_fp16_and_gives_hopper_one_figure_6(monkeypatch, gpu, dtype):
    """fp16 reads the table too (the same dense rate), and the H200 (the same die as the H100) gets the issue's
    790, so a run's fraction of peak compares across dtypes and kinds."""
    import torch

    ts = _module()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    peak, source = ts.device_peak_tflops(torch.device("cuda"), getattr(torch, {"bf16": "bfloat16",
                                                                               "fp16": "float16"}[dtype]), None)
    assert peak == 790.0 and source.startswith("spec sheet")


def test_randomize_makes_one_generator_per_device_6(monkeypatch):
    import torch

    ts = _module()
    made = []
    real = torch.Generator

    def counting(*args, **kwargs):
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "Generator", counting)
    ts.randomize(torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(5))), 0)
    assert len(made) == 1


@pytest.mark.comfyui
def test_checkpoint_levers_and_fp16_vae_on_comfy_models_6():
    """On ComfyUI's models (UNet and VAE decoder blocks checkpointed one by one): --no-checkpoint drops every
    recompute; --checkpoint-decode checkpoints the decode whole instead of its blocks. The whole-decode recompute
    costs more than the blocks' (non-reentrant checkpointing stops each block's recompute before its last conv):
    +16 % here, against +27 % when it was nested over the block checkpoints. An fp16 run decodes in ComfyUI's VAE
    dtype (bf16 or fp32, never fp16). The text encoders leave the device once the trainer is built, as in the
    nodes."""
    reason = _comfy_skip_reason()
    if reason:
        pytest.skip(reason)
    common = ("--backend", "comfy", "--size", "tiny", "--models", "sd15", "--cases", "fnf_b1", "--iters", "1",
              "--warmup", "0", "--device", "cpu")
    flops = {}
    for lever in ("", "--no-checkpoint", "--checkpoint-decode"):
        doc = _run(*common, *([lever] if lever else []))
        _check(doc, ["fnf_b1"], ["sd15"])
        flops[lever] = doc["cases"][0]["tflop_per_iteration"]
        assert isinstance(doc["cases"][0]["idle_models_released"], int)
    assert flops["--no-checkpoint"] < 0.9 * flops[""]
    assert flops[""] < flops["--checkpoint-decode"] < 1.2 * flops[""]
    doc = _run(*common, "--dtype", "fp16")
    assert doc["settings"]["sd15"]["vae_dtype"] in ("bfloat16", "float32")


def test_a_failure_brings_its_traceback_to_the_log_6(monkeypatch, capsys):
    """On a GPU a failure must be found from what the device tool brings back: a failed case, a failed diagnostic and
    a failed model family print their whole traceback to stderr (gpu_plan.sh keeps it in $OUT/NAME.log); the JSON
    keeps its one line."""
    ts = _module()
    real = ts.run_case

    def deep_in_the_first_case():
        raise RuntimeError("CUDA error: an illegal memory access was encountered (stand-in)")

    def flaky(name, *args):
        if name == "draft_b1":
            deep_in_the_first_case()
        return real(name, *args)

    def profiler_stand_in(*args, **kwargs):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED (stand-in)")

    monkeypatch.setattr(ts, "run_case", flaky)
    monkeypatch.setattr(ts, "profile_iteration", profiler_stand_in)
    doc = ts.main([*TINY, "--iters", "1", "--warmup", "0", "--cases", "draft_b1,se_b4", "--profile"])
    err = capsys.readouterr().err
    bad, good = doc["cases"]
    assert bad["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered (stand-in)"
    assert good["profile"] == {"error": "RuntimeError: CUPTI_ERROR_NOT_INITIALIZED (stand-in)"}
    assert err.count("Traceback (most recent call last)") == 2
    assert "in deep_in_the_first_case" in err and "in profiler_stand_in" in err
    assert "[train_speed] draft_b1 FAILED" in err and "[train_speed] se_b4 profile FAILED" in err

    def building_the_unet(*args, **kwargs):
        raise RuntimeError("CUDA out of memory while building (stand-in)")

    monkeypatch.setattr(ts, "build_comfy", building_the_unet)
    doc = ts.main(["--backend", "comfy", "--size", "tiny", "--models", "sd15", "--device", "cpu"])
    err = capsys.readouterr().err
    assert doc["failed_models"] == {"sd15": "RuntimeError: CUDA out of memory while building (stand-in)"}
    assert "Traceback (most recent call last)" in err and "in building_the_unet" in err


needs_set_stance = pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"),
                                      reason="--compile needs torch 2.6 (torch.compiler.set_stance keeps the FLOP "
                                             "count eager)")


def _counting_compiler(monkeypatch, on_first_call=None) -> list:
    """compile_denoiser's shape with a backend that records each graph it is given (and runs it as traced);
    on_first_call() runs at each compiled function's first call."""
    import torch._dynamo

    import focusfix_core.trainers as trainers

    graphs = []

    def compile_denoiser(denoiser, mode):
        def graph_free_call(x, sigma, cond):
            return denoiser(x, sigma, cond)

        def backend(gm, example_inputs):
            graphs.append(len(example_inputs))
            return gm.forward

        compiled, first = torch.compile(graph_free_call, backend=backend, dynamic=False), [True]

        def call(*args):
            if first and on_first_call is not None:
                first.clear()
                on_first_call()
            return compiled(*args)
        return call

    monkeypatch.setattr(trainers, "compile_denoiser", compile_denoiser)
    torch._dynamo.reset()
    return graphs


@needs_set_stance
def test_the_breakdown_reuses_the_steps_compiled_graph_6(monkeypatch):
    """The breakdown's compiled sampling runs as a training step's graph-free calls do (the trainer's
    `_as_in_a_step`: net frozen, block checkpoint wrappers in place): dynamo's guards hold and it reuses the step's
    graph. Outside, they failed and it compiled a second graph (timing the recompile with `--breakdown-reps 1`)."""
    import torch._dynamo

    graphs = _counting_compiler(monkeypatch)
    try:
        doc = _module().main([*TINY, "--iters", "1", "--warmup", "0", "--cases", "fnf_b1", "--compile", "default",
                              "--breakdown", "--breakdown-reps", "1"])
    finally:
        torch._dynamo.reset()
    (case,) = doc["cases"]
    parts = case["breakdown_seconds"]
    assert "error" not in parts and parts["sample_no_grad_lora_merged_compiled"] > 0
    assert list(parts)[:4] == ["sample_no_grad_lora_on", "sample_no_grad_lora_off", "sample_no_grad_lora_merged",
                               "decode_reward_fwd_bwd"]
    assert len(graphs) == 1, graphs  # one graph for batch 1: I0, the steps and the breakdown
    assert case["compiled_sampler_calls"]["whole_case"]["eager"] == 3  # the FLOP-counted iteration's, as before


@needs_set_stance
def test_compiled_sampler_calls_count_the_cuda_graphs_skipped_6(monkeypatch):
    """Inductor compiles a graph without the CUDA graphs reduce-overhead asks for (CPU tensors in it, a mutated
    input, ...) with a logged reason and nothing else: each case's compiled_sampler_calls has the change of its
    `cudagraph_skips` counter and the reasons. Here the stand-in compiler calls Inductor's own skip at its first
    call (Inductor's C++ build is too slow for this test)."""
    import torch._dynamo
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    ts = _module()
    reason = "skipping cudagraphs due to cpu device (stand-in)"
    _counting_compiler(monkeypatch, on_first_call=lambda: log_cudagraph_skip_and_bump_counter(reason))
    try:
        doc = ts.main([*TINY, "--iters", "1", "--warmup", "0", "--cases", "draft_b1,se_b4", "--compile",
                       "reduce-overhead"])
    finally:
        torch._dynamo.reset()
    fix, se = doc["cases"]
    calls = fix["compiled_sampler_calls"]
    assert calls["cudagraph_skips"] == 1 and calls["cudagraph_skip_reasons"] == [reason], calls
    assert calls["failure"] is None  # a CPU run: no CUDA device, so no allocator check
    assert "compiled_sampler_calls" not in se  # S&E steps all carry gradients: nothing compiled


def test_the_run_records_the_cuda_allocator_and_can_turn_the_cores_check_off_6(monkeypatch):
    """ComfyUI's main.py sets PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync on most GPUs and this harness does not
    import it: the JSON says which allocator a run measured. `--allocator-check off` turns the core's refusal of
    CUDA graphs under that allocator off for the run (gpu_plan's smoke_async: do they fail, does the fallback
    hold), and puts it back after."""
    import focusfix_core.sampler as sampler

    ts = _module()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    doc = ts.main([*TINY, "--iters", "1", "--warmup", "0", "--cases", "se_b4"])
    assert doc["pytorch_cuda_alloc_conf"] == "expandable_segments:True"
    assert doc["cuda_allocator_backend"] == ts.cuda_allocator_backend()
    assert doc["cuda_allocator_backend"] in ((None,) if torch.version.cuda is None else ("native", "cudaMallocAsync"))
    assert doc["levers"]["allocator_check"] == "on"

    monkeypatch.setattr(torch.cuda.memory, "get_allocator_backend", lambda: "cudaMallocAsync")
    assert sampler.cuda_graphs_blocked("reduce-overhead", "cuda")
    with ts.levers("focusfix_core", None, ts.parse_args(["--allocator-check", "off"])):
        assert sampler.cuda_graphs_blocked("reduce-overhead", "cuda") is None
    assert sampler.cuda_graphs_blocked("reduce-overhead", "cuda")


def test_peak_memory_reserved_is_recorded_beside_allocated_6(monkeypatch):
    """What fits on a 12 GiB card is what the caching allocator reserves, not only what tensors hold: on cuda each
    case (and its breakdown) records torch.cuda.max_memory_reserved beside max_memory_allocated."""
    ts = _module()
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 5 * 2**30)
    with ts._memory(torch.device("cuda")) as mem:
        pass
    assert mem["peak_memory_bytes"] == 3 * 2**30 and mem["peak_memory_reserved_bytes"] == 5 * 2**30

    from contextlib import contextmanager

    real = ts._memory

    @contextmanager
    def as_on_cuda(device):  # the CUDA figures (stand-ins) for a CPU run
        with real(torch.device("cuda")) as mem:
            yield mem

    monkeypatch.setattr(ts, "_memory", as_on_cuda)
    (case,) = ts.main([*TINY, "--iters", "1", "--warmup", "0", "--cases", "draft_b1", "--breakdown"])["cases"]
    assert case["peak_memory_reserved_gib"] == 5.0 and case["breakdown_peak_memory_reserved_bytes"] == 5 * 2**30


# -- how the figures are formed (mutation testing found these unheld) --------------------------------------------
def _marks(durations):
    """[0, d0, d0, d0 + d1, ...]: start and end readings of back-to-back intervals."""
    out, t = [], 0.0
    for d in durations:
        out += [t, t + d]
        t += d
    return out


@pytest.fixture(scope="module")
def tiny():
    ts = _module()
    dev = torch.device("cpu")
    model, core = ts.build_core("tiny", dev, torch.float32)
    reward = ts.build_reward(core, "tiny", dev, torch.float32)
    return ts, model, reward, core, dev


def _case(tiny, name, *flags, capture=None, monkeypatch=None):
    ts, model, reward, core, dev = tiny
    args = ts.parse_args([*TINY, *flags])
    if capture is not None:
        real = ts.make_trainer

        def keep(*a, **k):
            capture.append(real(*a, **k))
            return capture[-1]

        monkeypatch.setattr(ts, "make_trainer", keep)
    return ts.run_case(name, model, reward, core, ts.GEOMETRY[("tiny", "tiny")], args, dev, torch.float32)


# -- the timing window and its arithmetic ------------------------------------------------------------------------
def test_timed_window_excludes_warmup_and_reports_median_min_first_6(tiny, monkeypatch):
    """Warm-up iterations run but are not timed; median (not mean), min, all, iterations/s = 1/median, the first
    iteration's seconds (a warm-up one), CPU seconds and achieved TFLOP/s = TFLOP / median."""
    ts = tiny[0]
    log = []
    clock = StandInClock(*_marks([10.0, 3.0, 1.0, 8.0]), cpu=_marks([20.0, 6.0, 2.0, 16.0]), log=log)
    monkeypatch.setattr(ts, "time", clock)
    monkeypatch.setattr(ts, "_sync", lambda device: log.append("sync"))
    out = _case(tiny, "se_b4", "--warmup", "1", "--iters", "3")
    assert out["iterations_timed"] == 3
    assert out["seconds_per_iteration"] == {"median": 3.0, "min": 1.0, "all": [3.0, 1.0, 8.0]}
    assert out["iterations_per_second"] == pytest.approx(1 / 3.0)
    assert out["first_iteration_seconds"] == 10.0
    assert out["cpu_seconds_per_iteration"] == {"median": 6.0, "min": 2.0}
    assert out["achieved_tflops"] == pytest.approx(out["tflop_per_iteration"] / 3.0)
    assert len(out["history"]) == 1 + 3 + 1  # warm-up, timed, FLOP-counted: every iteration ran
    # every iteration's clock reads sit between device syncs: sync, read, (step), sync, read
    assert log == ["sync", "clock", "sync", "clock"] * 4, log


def test_sync_synchronizes_cuda_only_6(monkeypatch):
    """_sync waits for the device on cuda (else the clock reads time the launches, not the work), not on cpu."""
    ts = _module()
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    ts._sync(torch.device("cpu"))
    assert calls == []
    ts._sync(torch.device("cuda"))
    assert calls == [torch.device("cuda")]


# -- the device peak and the fraction of it ----------------------------------------------------------------------
def test_measured_peak_is_the_best_of_five_matmul_rounds_6(monkeypatch):
    """A measured peak (fp32, CPU, unknown GPUs): 2 n^3 FLOP per n x n matmul, best of 5 rounds of 4 matmuls."""
    ts = _module()
    monkeypatch.setattr(ts, "time", StandInClock(*_marks([8.0, 4.0, 12.0, 6.0, 10.0])))
    peak, source = ts.device_peak_tflops(torch.device("cpu"), torch.float32, None)
    assert peak == pytest.approx(2 * 512**3 / (4.0 / 4) / 1e12)
    assert source == "measured 512x512 float32 matmul"


def test_peak_tflops_override_is_used_everywhere_6(monkeypatch):
    """--peak-tflops replaces the table and the measurement on any device, and the fraction of peak is the
    achieved TFLOP/s (not the TFLOP per iteration) over it."""
    ts = _module()
    assert ts.device_peak_tflops(torch.device("cpu"), torch.float32, 123.0) == (123.0, "--peak-tflops")

    def fake(name, *args):
        return {"case": name, "achieved_tflops": 2.0, "tflop_per_iteration": 5.0}

    monkeypatch.setattr(ts, "run_case", fake)
    doc = ts.main([*TINY, "--cases", "se_b4", "--peak-tflops", "100"])
    assert doc["peak_tflops"] == 100.0 and doc["peak_source"] == "--peak-tflops"
    assert doc["cases"][0]["fraction_of_peak"] == pytest.approx(0.02)


# -- memory ------------------------------------------------------------------------------------------------------
def _fake_cuda_memory(monkeypatch, log):
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: log.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 5 * 2**30)


def test_cuda_peak_is_reset_before_the_block_6(monkeypatch):
    """On cuda the peak counters are reset when the block starts (else an earlier case's or the build's peak
    shows as this case's)."""
    ts = _module()
    log = []
    _fake_cuda_memory(monkeypatch, log)
    with ts._memory(torch.device("cuda")) as mem:
        log.append("body")
    assert log == ["reset", "body"]
    assert mem["peak_memory_bytes"] == 3 * 2**30


def test_release_idle_resets_the_peak_after_the_encoders_leave_6(monkeypatch):
    """comfy: the peak is counted from after the text encoders leave the device (idle_models_released), so the
    peak-memory stats are reset once they are released; the core backend releases nothing."""
    ts = _module()
    log = []
    _fake_cuda_memory(monkeypatch, log)
    monkeypatch.setattr(ts, "_import_pack", lambda: SimpleNamespace(
        release_idle_models=lambda model: log.append("released") or 2))
    assert ts.release_idle(SimpleNamespace(patcher=object()), torch.device("cuda")) == 2
    assert log == ["released", "reset"]
    assert ts.release_idle(SimpleNamespace(), torch.device("cuda")) is None


def test_peak_memory_gib_is_bytes_over_2_to_the_30_6(monkeypatch):
    """peak_memory_gib is GiB (2^30 bytes), as peak_memory_reserved_gib."""
    ts = _module()
    _fake_cuda_memory(monkeypatch, [])
    real = ts._memory

    @contextmanager
    def as_on_cuda(device):
        with real(torch.device("cuda")) as mem:
            yield mem

    monkeypatch.setattr(ts, "_memory", as_on_cuda)
    (case,) = ts.main([*TINY, "--iters", "1", "--warmup", "0", "--cases", "se_b4"])["cases"]
    assert case["peak_memory_gib"] == 3.0 and case["peak_memory_reserved_gib"] == 5.0


def test_session_enter_bytes_is_a_difference_6(monkeypatch):
    """session_enter_bytes is what entering the session cost (the core's session is a no-op: about 0), not the
    process's whole memory."""
    ts = _module()
    monkeypatch.setattr(ts, "run_case", lambda name, *a: {"case": name, "achieved_tflops": 1.0})
    doc = ts.main([*TINY, "--cases", "se_b4"])
    assert abs(doc["settings"]["tiny"]["session_enter_bytes"]) < 64 * 2**20


# -- the profile's units -----------------------------------------------------------------------------------------
def _fake_profiler(monkeypatch, events):
    class Prof:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return events

    monkeypatch.setattr(torch.profiler, "profile", lambda **kw: Prof())


def test_profile_units_on_cpu_6(monkeypatch):
    """The profiler's microseconds become host_seconds_in_ops (s) and the top ops' self_ms (ms)."""
    ts = _module()
    ev = lambda key, count, us: SimpleNamespace(key=key, count=count, self_cpu_time_total=us,  # noqa: E731
                                               device_type=None, self_device_time_total=0)
    _fake_profiler(monkeypatch, [ev("aten::mm", 3, 2_000_000), ev("aten::add", 5, 500_000),
                                 ev("autograd::engine", 1, 500_000)])
    monkeypatch.setattr(ts, "time", StandInClock(0.0, 4.0))
    out = ts.profile_iteration(lambda: None, torch.device("cpu"))
    assert out["wall_seconds"] == 4.0 and out["aten_op_calls"] == 8
    assert out["host_seconds_in_ops"] == pytest.approx(3.0)
    assert out["top"] == [{"name": "aten::mm", "calls": 3, "self_ms": 2000.0},
                          {"name": "aten::add", "calls": 5, "self_ms": 500.0}]


def test_profile_device_busy_fractions_on_cuda_6(monkeypatch):
    """cuda (stand-in profiler): busy seconds from the kernels, over the profiled wall time (device_busy_fraction)
    and over the unprofiled median (device_busy_fraction_of_median)."""
    from torch.autograd import DeviceType

    ts = _module()
    kernel = SimpleNamespace(key="sm90_gemm", count=10, self_cpu_time_total=0, device_type=DeviceType.CUDA,
                             self_device_time_total=1_000_000)
    launch = SimpleNamespace(key="cudaLaunchKernel", count=10, self_cpu_time_total=100, device_type=DeviceType.CPU,
                             self_device_time_total=0)
    _fake_profiler(monkeypatch, [kernel, launch])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(ts, "time", StandInClock(0.0, 4.0))
    out = ts.profile_iteration(lambda: None, torch.device("cuda"), median=2.0)
    assert out["device_busy_seconds"] == pytest.approx(1.0) and out["kernel_launches"] == 10
    assert out["device_busy_fraction"] == pytest.approx(0.25)
    assert out["device_busy_fraction_of_median"] == pytest.approx(0.5)
    assert out["host_kernel_launches"] == 10 and out["top"][0]["self_ms"] == 1000.0


# -- the breakdown -----------------------------------------------------------------------------------------------
def test_breakdown_is_the_best_of_its_reps_6(tiny, monkeypatch):
    """Every breakdown part is the best (min) of --breakdown-reps rounds, not the first or the last."""
    ts = tiny[0]
    seen = {}

    def scripted(fn, device):
        seen[fn] = seen.get(fn, -1) + 1
        return [5.0, 2.0, 7.0][seen[fn]]

    monkeypatch.setattr(ts, "_time", scripted)
    out = _case(tiny, "draft_b1", "--iters", "1", "--warmup", "0", "--breakdown")
    parts = out["breakdown_seconds"]
    assert set(parts) == {"sample_no_grad_lora_on", "sample_no_grad_lora_off", "sample_no_grad_lora_merged",
                          "decode_reward_fwd_bwd"}
    assert all(v == 2.0 for v in parts.values()), parts


def test_no_breakdown_for_separate_and_enhance_6(tiny):
    """--breakdown times the Focus-N-Fix/DRaFT sampling: an S&E case has none (not an error in its place)."""
    out = _case(tiny, "se_b4", "--iters", "1", "--warmup", "0", "--breakdown")
    assert "breakdown_seconds" not in out and "breakdown_peak_memory_bytes" not in out


# -- what runs: cases, trainers, settings ------------------------------------------------------------------------
def test_each_case_runs_its_method_6(tiny):
    """draft_b1 is DRaFT, fnf_* Focus-N-Fix with a saliency mask, se_* Separate-and-Enhance (the method the JSON
    reports), with the case's batch."""
    ts, model, reward, core, _ = tiny
    args = ts.parse_args(TINY)
    want = {"draft_b1": "draft", "fnf_b1": "focus-n-fix", "fnf_b4": "focus-n-fix",
            "se_preserve_b4": "separate-and-enhance", "se_b4": "separate-and-enhance"}
    for name, (kind, overrides, batch) in ts.CASES.items():
        tr = ts.make_trainer(core, kind, overrides, batch, model, reward, ts.GEOMETRY[("tiny", "tiny")], args, 1)
        try:
            assert tr.method == want[name] and tr.cfg.batch_size == batch, name
        finally:
            tr.lora.remove()


def test_trainers_are_built_with_the_recorded_settings_6(tiny):
    """The overrides reach the trainers (steps, image side, scheduler, S&E resolution and preservation), and the
    fixed settings are the ones the JSON records: CFG 7.5, K = 1, LoRA rank 4."""
    ts, model, reward, core, _ = tiny
    args = ts.parse_args([*TINY, "--steps", "3", "--size-px", "48", "--scheduler", "karras", "--resolution", "12",
                          "--preservation", "outputs"])
    geo = ts.GEOMETRY[("tiny", "tiny")]
    fix = ts.make_trainer(core, "fix", {"mask_source": "none", "lam": 0.0}, 1, model, reward, geo, args, 1)
    try:
        c = fix.cfg
        assert (c.steps, c.height, c.width, c.scheduler, c.cfg_scale, c.K, c.rank) == (3, 48, 48, "karras", 7.5, 1, 4)
        assert len(fix.sigmas) == 3 + 1
    finally:
        fix.lora.remove()
    se = ts.make_trainer(core, "se", {"lam_preserve": 1.0}, 4, model, reward, geo, args, 1)
    try:
        assert (se.cfg.resolution, se.cfg.preservation, se.cfg.rank, se.cfg.height) == (12, "outputs", 4, 48)
    finally:
        se.lora.remove()


def test_settings_record_the_overrides_6(monkeypatch):
    """settings: the image side and steps the run used (--size-px, --steps), the S&E resolution."""
    ts = _module()
    monkeypatch.setattr(ts, "run_case", lambda name, *a: {"case": name, "achieved_tflops": 1.0})
    doc = ts.main([*TINY, "--cases", "se_b4", "--size-px", "48", "--steps", "3", "--resolution", "12"])
    s = doc["settings"]["tiny"]
    assert (s["image"], s["steps"], s["se_resolution"], s["cfg_scale"], s["K"]) == (48, 3, 12, 7.5, 1)


def test_default_families_and_their_cases_6(monkeypatch):
    """comfy without --models runs SD1.5 and SDXL; SD1.5 runs every case, SDXL draft_b1 and fnf_b1 (the GPU plan's
    sdxl step relies on it to fit its time)."""
    ts = _module()
    model = SimpleNamespace(net=torch.nn.Linear(2, 2), vae=SimpleNamespace(vae_dtype=torch.float32))
    adapters = SimpleNamespace(training_session=lambda model, rewards: nullcontext())
    monkeypatch.setattr(ts, "build_comfy", lambda family, *a, **k: (model, adapters, "focusfix_core"))
    monkeypatch.setattr(ts, "run_case_kept", lambda name, *a: {"case": name, "achieved_tflops": 1.0})
    monkeypatch.setattr(ts, "device_peak_tflops", lambda *a: (1.0, "stand-in"))
    doc = ts.main(["--backend", "comfy", "--size", "tiny", "--device", "cpu"])
    got = [(c["model"], c["case"]) for c in doc["cases"]]
    assert got == [("sd15", n) for n in ts.CASES] + [("sdxl", "draft_b1"), ("sdxl", "fnf_b1")]


def test_default_dtype_is_fp32_on_cpu_6(monkeypatch):
    """--dtype's default: fp32 on a CPU (bf16 on cuda)."""
    ts = _module()
    monkeypatch.setattr(ts, "run_case", lambda name, *a: {"case": name, "achieved_tflops": 1.0})
    doc = ts.main(["--backend", "core", "--size", "tiny", "--device", "cpu", "--cases", "se_b4"])
    assert doc["dtype"] == "float32"


def test_core_backend_refuses_full_size_6():
    """--backend core has --size tiny only: a full-size request is refused, not run tiny under the full name."""
    ts = _module()
    with pytest.raises(SystemExit, match="--size tiny only"):
        ts.build_core("full", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("flags", [["--iters", "0"], ["--breakdown-reps", "0"], ["--warmup", "-1"]])
def test_counts_below_their_minimum_are_usage_errors_6(flags, capsys):
    """--iters and --breakdown-reps must be >= 1 (a median of nothing, a best of nothing), --warmup >= 0."""
    ts = _module()
    with pytest.raises(SystemExit):
        ts.parse_args(flags)
    assert "must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("flags, said", [
    (["--backend", "comfy", "--models", "sd15,sdx1"], "unknown --models ['sdx1']; known: sd15, sdxl"),
    (["--backend", "core", "--models", "sd15"], "--backend core runs its tiny model only")])
def test_models_are_checked_when_the_arguments_are_read_6(flags, said, capsys):
    """A misspelt family is a usage error before anything is built (not a failure after the first family's run),
    and --models with the core backend is refused rather than ignored (its tiny model would be timed instead)."""
    ts = _module()
    with pytest.raises(SystemExit):
        ts.parse_args(flags)
    assert said in capsys.readouterr().err
    assert ts.parse_args(["--backend", "comfy", "--models", "sdxl"]).models == ["sdxl"]


# -- reward ------------------------------------------------------------------------------------------------------
def test_reward_dtype_and_seed_6():
    """--reward-dtype sets the tower's weights (the head stays fp32), and the reward's random weights come from its
    seed, not from the process's generator: two builds are the same reward."""
    ts = _module()
    dev = torch.device("cpu")
    a = ts.build_reward("focusfix_core", "tiny", dev, torch.bfloat16)
    assert {p.dtype for p in a.tower.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in a.head.parameters()} == {torch.float32}
    built = []
    for global_seed in (1, 2):  # whatever the process's generator holds: the reward is seeded by `seed`
        torch.manual_seed(global_seed)
        built.append(ts.build_reward("focusfix_core", "tiny", dev, torch.float32))
    b, c = built
    assert all(torch.equal(x, y) for x, y in zip(b.state_dict().values(), c.state_dict().values()))


# -- levers ------------------------------------------------------------------------------------------------------
def test_fused_adam_lever_builds_a_fused_adamw_without_decay_6(tiny, monkeypatch):
    """--fused-adam: AdamW(fused=True) with the trainer's lr and no weight decay (the trainer's own optimizer)."""
    trainers = []
    _case(tiny, "se_b4", "--iters", "1", "--warmup", "0", "--fused-adam", capture=trainers, monkeypatch=monkeypatch)
    (tr,) = trainers
    group = tr.optimizer.param_groups[0]
    assert isinstance(tr.optimizer, torch.optim.AdamW)
    assert group["fused"] is True and group["weight_decay"] == 0.0 and group["lr"] == tr.cfg.lr


def test_no_cache_lever_clears_the_cache_every_iteration_6(tiny, monkeypatch):
    """--no-cache (Focus-N-Fix/DRaFT): I0 and M are rebuilt before every timed and warm-up iteration."""
    class Counting(dict):
        clears = 0

        def clear(self):
            Counting.clears += 1
            super().clear()

    ts = tiny[0]
    real = ts.make_trainer

    def counted(*a, **k):
        tr = real(*a, **k)
        tr._cache = Counting(tr._cache)
        return tr

    monkeypatch.setattr(ts, "make_trainer", counted)
    _case(tiny, "draft_b1", "--iters", "2", "--warmup", "1")
    base = Counting.clears
    _case(tiny, "draft_b1", "--iters", "2", "--warmup", "1", "--no-cache")
    assert Counting.clears - 2 * base == 3


def test_autocast_lever_changes_the_computation_6(tiny):
    """--autocast runs each iteration under bf16 autocast: an fp32 run's loss changes."""
    plain = _case(tiny, "se_b4", "--iters", "1", "--warmup", "0")
    cast = _case(tiny, "se_b4", "--iters", "1", "--warmup", "0", "--autocast")
    assert cast["history"][0]["loss"] != plain["history"][0]["loss"]


def test_cudagraph_skips_count_the_change_over_the_block_6():
    """cudagraph_skips is the change of Inductor's counter over the case, not its running total."""
    from torch._dynamo.utils import counters

    ts = _module()
    before = counters["inductor"]["cudagraph_skips"]
    counters["inductor"]["cudagraph_skips"] += 5  # an earlier case's skips
    try:
        with ts._cudagraph_skips(True) as out:
            counters["inductor"]["cudagraph_skips"] += 1
        assert out["cudagraph_skips"] == 1
    finally:
        counters["inductor"]["cudagraph_skips"] = before


def test_no_checkpoint_also_turns_whole_call_checkpoints_off_6():
    """--no-checkpoint empties the block list and turns the trainer's whole-call checkpoints off too."""
    ts = _module()
    trainer = SimpleNamespace(_checkpoint_modules=[torch.nn.Linear(2, 2)], _checkpoint_calls=True)
    ts.checkpoint_levers(trainer, SimpleNamespace(), ts.parse_args(["--no-checkpoint"]))
    assert trainer._checkpoint_modules == [] and trainer._checkpoint_calls is False


@pytest.mark.comfyui
def test_comfy_args_cannot_change_once_comfy_is_imported_6():
    """ComfyUI's modules read their launch flags once: a later model asking for other --comfy-args is refused."""
    reason = _comfy_skip_reason()
    if reason:
        pytest.skip(reason)
    code = ("import sys, torch; sys.path.insert(0, 'benchmarks'); import train_speed as ts\n"
            "ts._import_comfy(torch.device('cpu'))\n"
            "try:\n    ts._import_comfy(torch.device('cpu'), comfy_args='--fast')\n"
            "except SystemExit as e:\n    print('REFUSED', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "COMFYUI_DIR": COMFYUI_DIR})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED --comfy-args '--fast': ComfyUI was already imported with ''" in proc.stdout


def test_cpu_peak_is_rss_growth_at_least_one_byte_6(monkeypatch):
    """On a CPU the peak is the RSS growth over the block (weights excluded), and a block that grew nothing still
    reports 1 byte, so the figure stays positive (a reader divides by it)."""
    ts = _module()
    monkeypatch.setattr(ts, "_rss", lambda: 500 * 2**20)
    with ts._memory(torch.device("cpu")) as mem:
        pass
    assert mem["peak_memory_bytes"] == 1 and mem["peak_memory_kind"].startswith("RSS growth")
