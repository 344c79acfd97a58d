"""The benchmark scripts under test: each loaded fresh from benchmarks/, and a stand-in clock for their timing code
(tests check what is timed and how the figures are formed, never how long something takes)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    """benchmarks/<name>.py as a new module; benchmarks/ is on sys.path while it imports (cost_model and
    compile_check import train_speed beside them)."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


class StandInClock:
    """Stands in for a script's `time` module: perf_counter returns the given readings in order (each read is
    logged as "clock" in `log`, beside whatever else a test logs there), process_time the `cpu` readings."""

    def __init__(self, *readings: float, cpu=(), log: list | None = None):
        self.readings, self.cpu, self.log = list(readings), list(cpu), log if log is not None else []

    def perf_counter(self) -> float:
        self.log.append("clock")
        return self.readings.pop(0)

    def process_time(self) -> float:
        return self.cpu.pop(0)
