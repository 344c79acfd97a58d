"""benchmarks/cfg_split.py still runs (a small layer) and times what CFGDenoiser does for both kinds of lengths."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cfg_split.py"


@pytest.mark.parametrize("tokens, joined, batchable", [("85,77", 6545, False), ("154,77", 154, True)])
def test_cfg_split_small(capsys, tokens, joined, batchable):
    spec = importlib.util.spec_from_file_location("cfg_split", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.main(["--latent", "4", "--channels", "16", "--heads", "2", "--width", "8", "--runs", "1",
                  "--tokens", tokens])
    assert (r["batched_tokens"], r["batchable"]) == (joined, batchable)
    assert r["ms_batched"] > 0 and r["ms_apart"] > 0
    assert json.loads(capsys.readouterr().out) == r
