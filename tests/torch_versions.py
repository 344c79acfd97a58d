"""Skips for the torch.compile and meta-device paths on a torch older than the one they are checked on.

The package runs on torch 2.5 or newer (the tests that need neither pass on 2.5.1); these paths were checked
on torch 2.11 (the GPU machines' build; ComfyUI's tests included, session 17) and 2.13. On 2.5.1 dynamo
graph-broke inside ComfyUI's model call and compiled the sampler again for every trajectory, and activation
checkpointing failed on the meta device (benchmarks/RESULTS.md, session 16).
None of them is offered by the nodes or the CLI."""
import re

import pytest
import torch

TORCH = tuple(int(v) for v in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
CHECKED = (2, 11)

compile_checked = pytest.mark.skipif(
    TORCH < CHECKED, reason=f"torch.compile paths are checked on torch 2.11+; this is {torch.__version__} (torch "
                            f"2.5.1 graph-broke and recompiled them)")
meta_checked = pytest.mark.skipif(
    TORCH < CHECKED, reason=f"the meta-device cost model is checked on torch 2.11+; this is {torch.__version__} "
                            f"(torch 2.5.1 failed in checkpoint's fork_rng on meta)")
