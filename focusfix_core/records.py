"""Step records: what a trainer yields after each optimizer step (STYLE rule 9)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["StepRecord"]


@dataclass(frozen=True)
class StepRecord:
    """One finished training iteration. Terms that a method does not use are None."""

    step: int                      # 0-based index of the iteration just finished
    total: int                     # iterations planned
    loss: float                    # the optimised objective
    grad_norm: float               # adapter gradient norm before clipping
    seconds: float                 # wall time of this iteration
    reward: float | None = None    # Focus-N-Fix: mean reward of I
    region: float | None = None    # Focus-N-Fix: mean ||(1-M)*(I0-I)||_F (outside-mask change)
    separate: float | None = None  # Separate-and-Enhance terms
    enhance: float | None = None
    preserve: float | None = None
    loss_scale: float | None = None  # fp16 in the gradient path: the loss scale of this step (None: no scaling)

    @property
    def skipped(self) -> bool:
        """The update was skipped: fp16 gradients overflowed at this loss scale, which is then halved."""
        return not math.isfinite(self.grad_norm)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"step {self.step + 1}/{self.total}", f"loss {self.loss:.4f}"]
        for name in ("reward", "region", "separate", "enhance", "preserve"):
            v = getattr(self, name)
            if v is not None:
                parts.append(f"{name} {v:.4f}")
        if self.skipped:
            parts.append("update skipped (fp16 overflow; loss scale halved)")
        parts.append(f"{self.seconds:.2f}s")
        return "  ".join(parts)
