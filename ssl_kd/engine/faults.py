"""What a non-finite loss does to a run: stop, or skip the step within a bound.

A skipped step changes nothing that the next step reads: no backward, no optimizer step, no
teacher update, and the method's buffers (the DINO center, which lightly's DINOLoss updates
inside its forward, and BatchNorm statistics) are put back as they were before the forward.
The step counter still advances, so schedules and the data order stay those of the run.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssl_kd.config import TrainConfig
from ssl_kd.errors import NonFiniteLoss

HINT = (
    "Lower optim.lr, raise optim.warmup_epochs or tighten dino.clip_grad, or set "
    "train.on_nonfinite=skip; the same command then resumes from the checkpoint."
)


class NonFiniteGuard:
    """Applies `train.on_nonfinite` (stop | skip, at most `train.max_skipped_steps` skips)."""

    def __init__(self, cfg: TrainConfig, checkpoint_path: Path) -> None:
        self.policy = cfg.on_nonfinite
        self.max_skipped = cfg.max_skipped_steps
        self.nan_steps = set(cfg.debug_nan_at_steps)
        self.checkpoint_path = checkpoint_path
        self.skipped_steps: list[int] = []

    def poison(self, views: list[Tensor], step: int) -> list[Tensor]:
        """Test hook (`train.debug_nan_at_steps`): NaN inputs, so the loss is NaN for real."""
        if step not in self.nan_steps:
            return views
        return [torch.full_like(view, math.nan) for view in views]

    def snapshot(self, method: nn.Module) -> dict[str, Tensor] | None:
        """The buffers a forward may change; only taken when a step can be skipped."""
        if self.policy != "skip":
            return None
        return {name: buffer.detach().clone() for name, buffer in method.named_buffers()}

    def should_skip(
        self,
        loss: float,
        terms: dict[str, Any],
        step: int,
        epoch: int,
        method: nn.Module,
        snapshot: dict[str, Tensor] | None,
    ) -> bool:
        """False for a finite loss; True if this step is skipped (buffers restored).

        Raises:
            NonFiniteLoss: stop policy, or the skip bound reached; names the step and
                every loss term.
        """
        if math.isfinite(loss):
            return False
        values = ", ".join(
            f"{name}={float(value):.4g}"
            for name, value in terms.items()
            if name.endswith("loss") and name != "loss"  # the terms, not their total
        )
        where = f"loss is {loss} at step {step} (epoch {epoch}; terms: {values or 'none'})"
        if self.policy == "skip" and len(self.skipped_steps) < self.max_skipped:
            assert snapshot is not None
            buffers = dict(method.named_buffers())
            with torch.no_grad():
                for name, saved in snapshot.items():
                    buffers[name].copy_(saved)
            self.skipped_steps.append(step)
            print(
                f"warning: {where}; step skipped without an update ({len(self.skipped_steps)} "
                f"of at most train.max_skipped_steps={self.max_skipped})",
                file=sys.stderr,
                flush=True,
            )
            return True
        bound = (
            f"; {len(self.skipped_steps)} steps were skipped already, the bound "
            f"train.max_skipped_steps={self.max_skipped}"
            if self.policy == "skip"
            else ""
        )
        raise NonFiniteLoss(
            f"{where}{bound}. Stopping without saving, so {self.checkpoint_path} still holds "
            f"the last good state. {HINT}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = list(state.get("skipped_steps", []))
