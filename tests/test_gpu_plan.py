"""benchmarks/gpu_plan.sh (issue 6): every step hands train_speed.py / compile_check.py arguments they accept, so
a GPU session spends no device time on a typo. Run here with stand-ins for python3 and nvidia-smi."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_plan.sh"
STEPS = ["smoke", "sd15", "sd15-compile", "sd15-memory", "sd15-flags", "sd15-fp16", "se", "sdxl", "sdxl-compile", "sdxl-memory", "compile-check",
         "sd15-sampler"]


def _scripts():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import compile_check
        import train_speed
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return train_speed, compile_check


def _run(step: str | list[str], tmp_path: Path, fail_if: str = "") -> tuple[subprocess.CompletedProcess,
                                                                            list[list[str]]]:
    """Run the plan with a python3 stand-in that logs its arguments (and exits 1 when they contain fail_if)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    fail = f'case "$*" in *"{fail_if}"*) exit 1;; esac\n' if fail_if else ""
    (bin_dir / "python3").write_text(f'#!/bin/sh\nprintf "%s\\037" "$@" >> "{log}"\necho >> "{log}"\n{fail}')
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: stand-in'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / "comfy").mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "COMFYUI_DIR": str(tmp_path / "comfy")}
    log.write_text("")
    steps = [step] if isinstance(step, str) else step
    proc = subprocess.run(["bash", str(SCRIPT), *steps], capture_output=True, text=True, env=env, timeout=60)
    calls = [line.split("\x1f")[:-1] for line in log.read_text().splitlines() if line]
    return proc, calls


@pytest.mark.parametrize("step", STEPS)
def test_each_step_passes_arguments_the_scripts_accept_6(step, tmp_path):
    train_speed, compile_check = _scripts()
    proc, calls = _run(step, tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = [c for c in calls if c and c[0].startswith("benchmarks/")]
    assert runs, calls
    for argv in runs:
        script, args = argv[0], argv[1:]
        parse = {"benchmarks/train_speed.py": train_speed.parse_args,
                 "benchmarks/compile_check.py": compile_check.parse_args}[script]
        parsed = parse(args)  # argparse exits (SystemExit) on an argument the script does not take
        assert parsed.device == "cuda"
        if script.endswith("train_speed.py"):
            assert (parsed.backend, parsed.size) == ("comfy", "tiny" if step == "smoke" else "full")
            assert parsed.dtype == ("fp16" if step == "sd15-fp16" else "bf16")
    if step.endswith("-compile"):
        assert all("reduce-overhead" in argv for argv in runs)


def test_several_steps_in_one_call_run_in_order_6(tmp_path):
    proc, calls = _run(["se", "sd15-fp16", "compile-check"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = [c for c in calls if c and c[0].startswith("benchmarks/")]
    assert [r[0].split("/")[1] for r in runs] == ["train_speed.py", "train_speed.py", "compile_check.py"]
    assert "--preservation" in runs[0] and "fp16" in runs[1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["compile_check.json", "sd15_fp16.json",
                                                                     "sd15_se_outputs.json"]


def test_a_failed_run_is_noted_and_the_plan_goes_on_6(tmp_path):
    """Device time is scarce: a run that fails (here every --breakdown run, i.e. sd15's) does not stop the steps
    after it; the plan names it and exits 1 at the end."""
    proc, calls = _run(["sd15", "se", "compile-check"], tmp_path, fail_if="--breakdown")
    assert proc.returncode == 1
    runs = [c for c in calls if c and c[0].startswith("benchmarks/")]
    assert [r[0].split("/")[1] for r in runs] == ["train_speed.py", "train_speed.py", "compile_check.py"]
    assert "[gpu_plan] failed: sd15_base (" in proc.stderr and "rc 1;" in proc.stdout


def test_unknown_step_and_missing_comfyui_are_refused_6(tmp_path):
    proc, calls = _run(["sd15", "nope"], tmp_path)  # refused before any step runs
    assert proc.returncode == 2 and "unknown step 'nope'" in proc.stderr and calls == []
    proc, _ = _run([], tmp_path)
    assert proc.returncode == 2 and "usage: gpu_plan.sh" in proc.stderr
    env = {**os.environ, "COMFYUI_DIR": str(tmp_path / "missing")}
    proc = subprocess.run(["bash", str(SCRIPT), "sd15"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "gpu_plan.sh pack" in proc.stderr
