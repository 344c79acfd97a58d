"""benchmarks/gpu_plan.sh (issue 6): every step hands train_speed.py / compile_check.py arguments they accept, so
a GPU session spends no device time on a typo. Run here with stand-ins for python3 and nvidia-smi."""
from __future__ import annotations

import os
import re
import shutil
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


def _stand_ins(tmp_path: Path, fail_if: str = "", sleep_if: str = "") -> tuple[Path, Path]:
    """(bin folder, log): a python3 that logs its arguments, writes '{}' to its --out file, says on stderr its
    arguments and PYTORCH_CUDA_ALLOC_CONF (what the run's log must keep), exits 1 when they contain fail_if and
    sleeps when they contain sleep_if; an nvidia-smi."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    fail = f'case "$*" in *"{fail_if}"*) exit 1;; esac\n' if fail_if else ""
    # sleeping, it leaves a JSON rewrite half done (train_speed writes NAME.json.tmp, then renames it)
    sleep = f'case "$*" in *"{sleep_if}"*) echo "{{" > "$o.tmp"; exec sleep 60;; esac\n' if sleep_if else ""
    out = 'prev=; o=; for a in "$@"; do [ "$prev" = --out ] && echo "{}" > "$a" && o=$a; prev=$a; done\n'
    pip = 'case "$*" in *"pip download"*) mkdir -p .whl;; esac\n'
    said = 'echo "stand-in python3 $* alloc=${PYTORCH_CUDA_ALLOC_CONF:-unset}" >&2\n'
    (bin_dir / "python3").write_text(f'#!/bin/sh\nprintf "%s\\037" "$@" >> "{log}"\necho >> "{log}"\n'
                                     f'{out}{pip}{said}{fail}{sleep}')
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: stand-in'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    log.write_text("")
    return bin_dir, log


def _calls(log: Path) -> list[list[str]]:
    return [line.split("\x1f")[:-1] for line in log.read_text().splitlines() if line]


def _run(step: str | list[str], tmp_path: Path, fail_if: str = "", sleep_if: str = "",
         env: dict | None = None) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run the plan with stand-ins for python3 and nvidia-smi (see `_stand_ins`)."""
    bin_dir, log = _stand_ins(tmp_path, fail_if, sleep_if)
    (tmp_path / "comfy").mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "COMFYUI_DIR": str(tmp_path / "comfy"), **(env or {})}
    steps = [step] if isinstance(step, str) else step
    proc = subprocess.run(["bash", str(SCRIPT), *steps], capture_output=True, text=True, env=env, timeout=60)
    return proc, _calls(log)


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
            # its JSON rewritten after every case in $OUT (stdout is the log): a run cut off keeps its cases
            assert Path(parsed.out).parent == tmp_path / "out" and Path(parsed.out).is_file()
            assert not parsed.checkpoint_decode  # nested over the decoder's block checkpoints: dropped
    if step.endswith("-compile"):
        assert all("reduce-overhead" in argv for argv in runs)
    if step == "smoke":  # the first KSampler reference and the first profiled CUDA-graph replay, at tiny size
        first, compiled, under_async = (train_speed.parse_args(argv[1:]) for argv in runs)
        assert first.breakdown and first.profile and compiled.profile and compiled.compile == "reduce-overhead"
        # then CUDA graphs under ComfyUI's own allocator, with the core's check off: do they fail, does it fall back
        assert under_async.compile == "reduce-overhead" and under_async.allocator_check == "off"
        logs = {n: (tmp_path / "out" / f"{n}.log").read_text() for n in ("smoke", "smoke_compile", "smoke_async")}
        assert "alloc=backend:cudaMallocAsync" in logs["smoke_async"]
        assert "alloc=unset" in logs["smoke"] and "alloc=unset" in logs["smoke_compile"]
    if step == "sd15-memory":
        assert any(train_speed.parse_args(argv[1:]).no_checkpoint for argv in runs)


def test_several_steps_in_one_call_run_in_order_6(tmp_path):
    proc, calls = _run(["se", "sd15-fp16", "compile-check"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = [c for c in calls if c and c[0].startswith("benchmarks/")]
    assert [r[0].split("/")[1] for r in runs] == ["train_speed.py", "train_speed.py", "compile_check.py"]
    assert "--preservation" in runs[0] and "fp16" in runs[1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "compile_check.json", "compile_check.log", "sd15_fp16.json", "sd15_fp16.log", "sd15_se_outputs.json",
        "sd15_se_outputs.log"]


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


def _plan_copy(tmp_path: Path) -> Path:
    """A copy of the script's folder (steps that read .comfy / .whl beside it, or pack, which rewrites .comfy)."""
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(SCRIPT, tmp_path / "benchmarks" / "gpu_plan.sh")
    return tmp_path / "benchmarks" / "gpu_plan.sh"


def test_pack_fetches_the_wheels_comfy_samplers_needs_6(tmp_path):
    """pack downloads torchsde and trampoline beside kornia: comfy.samplers (every Focus-N-Fix/DRaFT case)
    imports them and the device image has neither. Run in a copy of the script's folder (pack rewrites .comfy)."""
    script = _plan_copy(tmp_path)
    (tmp_path / "src" / "comfy").mkdir(parents=True)
    bin_dir, log = _stand_ins(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "COMFYUI_DIR": str(tmp_path / "src")}
    proc = subprocess.run(["bash", str(script), "pack"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (download,) = [c for c in _calls(log) if c[:3] == ["-m", "pip", "download"]]
    assert "--only-binary=:all:" in download and "--no-deps" in download
    for wheel in ("kornia==0.9.0", "kornia_rs==0.2.0", "torchsde==0.2.6", "trampoline==0.1.2"):
        assert wheel in download
    assert (tmp_path / ".comfy" / "ComfyUI" / "comfy").is_dir()


def test_smoke_stops_the_call_when_comfy_samplers_cannot_be_imported_6(tmp_path):
    """No wheels carried: every fix case would fail, so smoke says why and the call ends before any run."""
    proc, calls = _run(["smoke", "sd15"], tmp_path, fail_if="import comfy.samplers")
    assert proc.returncode == 1
    assert "cannot import comfy.samplers and kornia" in proc.stderr and "gpu_plan.sh pack" in proc.stderr
    assert calls and not [c for c in calls if c[0].startswith("benchmarks/")]


def test_a_run_past_the_calls_budget_is_stopped_and_the_next_not_started_6(tmp_path):
    """Each run is under `timeout` (its own limit, capped by what is left of PLAN_SECONDS): a hung run is
    stopped, noted, and the call ends in time; what it wrote after its finished cases stays in $OUT."""
    proc, calls = _run(["sd15", "se"], tmp_path, sleep_if="--breakdown", env={"PLAN_SECONDS": "10"})
    assert proc.returncode == 1
    # the limit is what is left of the 10 s when the run starts: bash's SECONDS may tick over during start-up
    # on a loaded machine, so 10 or a little less (at least 5, or the run would not have started)
    stopped = re.search(r"\[gpu_plan\] sd15_base stopped at its (\d+)s limit", proc.stderr)
    assert stopped and 5 <= int(stopped.group(1)) <= 10, proc.stderr
    assert "[gpu_plan] sd15_se_outputs not started" in proc.stderr
    assert "[gpu_plan] failed: sd15_base sd15_se_outputs" in proc.stderr
    assert [c[0] for c in calls if c[0].startswith("benchmarks/")] == ["benchmarks/train_speed.py"]
    assert (tmp_path / "out" / "sd15_base.json").is_file()
    assert not list((tmp_path / "out").glob("*.tmp"))  # not a file to spend the tool's 8 on


def test_suggested_calls_fit_ten_minutes_by_the_plans_own_estimates_6():
    """The header's estimates (the upper end of a range), summed over each suggested call, stay under the
    tool's 10 minutes a call; every step is in one suggested call."""
    head = SCRIPT.read_text().split("set -euo pipefail")[0]
    estimates = {step: int(re.search(rf"^#   {step} .*?~(?:\d+-)?(\d+) min", head, re.M | re.S).group(1))
                 for step in STEPS}
    suggested = head.split("Suggested calls", 1)[1].split("A failed case")[0]
    calls = re.findall(r'"([a-z0-9 -]+)"', suggested)
    assert sorted(s for c in calls for s in c.split()) == sorted(STEPS)
    for call in calls:
        assert sum(estimates[s] for s in call.split()) <= 9, call


def test_each_run_keeps_its_log_in_out_6(tmp_path):
    """A run that fails on the GPU must bring its traceback back: each run's output is kept in $OUT/NAME.log (and
    still shown), a failed run's too; compile_check's stdout stays its JSON, its stderr goes to the log."""
    proc, _ = _run(["sd15", "compile-check"], tmp_path, fail_if="--breakdown")
    assert proc.returncode == 1
    out = tmp_path / "out"
    base = (out / "sd15_base.log").read_text()
    assert "stand-in python3 benchmarks/train_speed.py" in base and "--breakdown" in base
    assert "stand-in python3 benchmarks/train_speed.py" in proc.stderr  # still shown as the run goes
    check = (out / "compile_check.log").read_text()
    assert "stand-in python3 benchmarks/compile_check.py" in check
    assert "stand-in" not in (out / "compile_check.json").read_text()


def test_a_long_log_is_cut_to_what_the_tool_returns_6(tmp_path):
    """The device tool returns files of 16 MiB at most: a log past 8 MiB keeps its first 1 and last 6 MiB."""
    bin_dir, _ = _stand_ins(tmp_path)
    chatty = bin_dir / "python3"
    chatty.write_text(chatty.read_text() + 'head -c 10485760 /dev/zero | tr "\\0" x >&2\necho THE-END >&2\n')
    (tmp_path / "comfy").mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "COMFYUI_DIR": str(tmp_path / "comfy")}
    proc = subprocess.run(["bash", str(SCRIPT), "se"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "out" / "sd15_se_outputs.log").read_bytes()
    assert 7 << 20 < len(log) < 8 << 20
    assert log.startswith(b"stand-in python3") and log.rstrip().endswith(b"THE-END") and b"log cut here" in log


def test_each_suggested_call_returns_every_file_6(tmp_path):
    """The device tool returns at most 8 files a call, no more than 2 folders down, named in letters, digits, '.',
    '_' and '-': every suggested call's $OUT (a JSON and a log per run) fits, a run cut off mid-rewrite too."""
    head = SCRIPT.read_text().split("set -euo pipefail")[0]
    suggested = head.split("Suggested calls", 1)[1].split("A failed case")[0]
    calls = re.findall(r'"([a-z0-9 -]+)"', suggested)
    assert len(calls) >= 8
    for k, call in enumerate(calls):
        where = tmp_path / f"call{k}"
        where.mkdir()
        proc, _ = _run(call.split(), where)
        assert proc.returncode == 0, (call, proc.stderr[-2000:])
        files = [p for p in (where / "out").rglob("*") if p.is_file()]
        assert len(files) <= 8, (call, sorted(p.name for p in files))
        for p in files:
            rel = p.relative_to(where / "out")
            assert len(rel.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
            assert p.stat().st_size < 16 << 20


def test_plan_kills_a_run_that_ignores_sigterm_and_says_it_was_stopped_6(tmp_path):
    """A hung run that ignores SIGTERM (a stuck CUDA call) is killed 10 s after its limit (timeout -k 10), and the
    plan still reports it as stopped at its limit (rc 137), so the call ends in time."""
    bin_dir, _ = _stand_ins(tmp_path, sleep_if="--breakdown")
    py = bin_dir / "python3"
    py.write_text(py.read_text().replace("exec sleep 60", "trap '' TERM; exec sleep 60"))
    (tmp_path / "comfy").mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "COMFYUI_DIR": str(tmp_path / "comfy"), "PLAN_SECONDS": "6"}
    proc = subprocess.run(["bash", str(SCRIPT), "sd15"], capture_output=True, text=True, env=env, timeout=45)
    assert proc.returncode == 1
    assert "[gpu_plan] sd15_base stopped at its" in proc.stderr and "(rc 137;" in proc.stdout, proc.stderr


def test_plan_default_budget_is_570_seconds_6(tmp_path):
    """PLAN_SECONDS defaults to 570 of the tool's 600 s: with under 5 s of it left a run is not started (bash takes
    SECONDS from the environment, so the call starts as if 566 s had passed)."""
    proc, calls = _run("se", tmp_path, env={"SECONDS": "566"})
    assert proc.returncode == 1
    assert "[gpu_plan] sd15_se_outputs not started" in proc.stderr and "PLAN_SECONDS=570" in proc.stderr
    assert not [c for c in calls if c[0].startswith("benchmarks/")]


def test_plan_finds_the_packed_comfyui_by_default_6(tmp_path):
    """Without COMFYUI_DIR the plan uses the carried .comfy/ComfyUI (what pack writes), not .comfy."""
    script = _plan_copy(tmp_path)
    (tmp_path / ".comfy" / "ComfyUI" / "comfy").mkdir(parents=True)
    bin_dir, _ = _stand_ins(tmp_path)
    py = bin_dir / "python3"
    py.write_text(py.read_text() + 'echo "comfyui=$COMFYUI_DIR" >&2\n')
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_DIR"}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(script), "se"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "out" / "sd15_se_outputs.log").read_text()
    assert "comfyui=" in log and log.split("comfyui=")[1].split()[0].endswith("/.comfy/ComfyUI"), log


def test_plan_installs_the_carried_wheels_where_the_runs_import_them_6(tmp_path):
    """Carried .whl/*.whl are installed to /tmp/site (offline, no deps) and /tmp/site leads every run's PYTHONPATH."""
    script = _plan_copy(tmp_path)
    (tmp_path / ".comfy" / "ComfyUI").mkdir(parents=True)
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "kornia-0.9.0-py3-none-any.whl").write_text("")
    bin_dir, log = _stand_ins(tmp_path)
    py = bin_dir / "python3"
    py.write_text(py.read_text() + 'echo "pythonpath=$PYTHONPATH" >&2\n')
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_DIR", "PYTHONPATH")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(script), "se"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (install,) = [c for c in _calls(log) if c[:3] == ["-m", "pip", "install"]]
    assert "--no-index" in install and "--no-deps" in install and install[install.index("--target") + 1] == "/tmp/site"
    assert ".whl/kornia-0.9.0-py3-none-any.whl" in install
    run_log = (tmp_path / "out" / "sd15_se_outputs.log").read_text()
    assert "pythonpath=/tmp/site" in run_log, run_log


def test_smoke_leaves_the_native_allocator_to_the_steps_after_it_6(tmp_path):
    """Only smoke_async runs under cudaMallocAsync: a step after smoke in the same call (the suggested
    "smoke sd15") measures torch's native allocator again."""
    proc, _ = _run(["smoke", "sd15"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "alloc=backend:cudaMallocAsync" in (tmp_path / "out" / "smoke_async.log").read_text()
    assert "alloc=unset" in (tmp_path / "out" / "sd15_base.log").read_text()


def _parsed(step: str, tmp_path: Path) -> list:
    train_speed, _ = _scripts()
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc, calls = _run(step, tmp_path)
    assert proc.returncode == 0, proc.stderr
    return [train_speed.parse_args(c[1:]) for c in calls if c and c[0] == "benchmarks/train_speed.py"]


@pytest.mark.parametrize("step", ["sd15", "sd15-compile", "sdxl", "sdxl-compile"])
def test_baseline_and_compile_steps_profile_an_iteration_6(step, tmp_path):
    """The header's promise: the baseline and compile steps profile one extra iteration per case (--profile)."""
    runs = _parsed(step, tmp_path)
    assert runs and all(r.profile for r in runs)


def test_each_lever_step_sets_its_lever_6(tmp_path):
    """sd15-memory, sdxl-memory and sd15-sampler each measure the lever the header names."""
    no_ckpt, plain = _parsed("sd15-memory", tmp_path / "m")
    assert no_ckpt.no_checkpoint and plain.inference_weights == "off" and not plain.no_checkpoint
    fp8, reward_bf16 = _parsed("sdxl-memory", tmp_path / "x")
    assert fp8.weight_dtype == "fp8_e4m3fn" and reward_bf16.reward_dtype == "bf16"
    assert reward_bf16.weight_dtype == "default"
    (sampler,) = _parsed("sd15-sampler", tmp_path / "s")
    assert (sampler.sampler_name, sampler.scheduler, sampler.steps) == ("dpmpp_2m", "karras", 20)


def test_pack_leaves_out_git_and_bytecode_6(tmp_path):
    """pack copies ComfyUI without its .git and __pycache__ folders (the carry is 64 MiB in all)."""
    script = _plan_copy(tmp_path)
    src = tmp_path / "src"
    for d in ("comfy/__pycache__", ".git/objects"):
        (src / d).mkdir(parents=True)
    (src / ".git" / "objects" / "pack").write_text("x")
    (src / "comfy" / "__pycache__" / "m.pyc").write_text("x")
    bin_dir, _ = _stand_ins(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "COMFYUI_DIR": str(src)}
    proc = subprocess.run(["bash", str(script), "pack"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    packed = tmp_path / ".comfy" / "ComfyUI"
    assert (packed / "comfy").is_dir()
    assert not (packed / ".git").exists() and not list(packed.rglob("__pycache__"))


def test_smoke_stops_the_call_when_kornia_cannot_be_imported_6(tmp_path):
    """kornia (a carried wheel) is part of smoke's import check: without it no run starts."""
    proc, calls = _run(["smoke", "sd15"], tmp_path, fail_if="kornia")
    assert proc.returncode == 1 and "cannot import comfy.samplers and kornia" in proc.stderr
    assert not [c for c in calls if c[0].startswith("benchmarks/")]
