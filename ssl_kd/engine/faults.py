"""What a non-finite loss does to a run: stop, or skip the step within a bound.

A skipped step changes nothing that the next step reads: no backward, no optimizer step, no
teacher update, and the method's buffers (the DINO center, which lightly's DINOLoss updates
inside its forward, and BatchNorm statistics) are put back as they were before the forward.
The step counter still advances, so schedules and the data order stay those of the run.

Skipping only helps while the weights are finite: once a parameter or buffer holds NaN/Inf
(an update from an infinite gradient), every later loss is NaN, so the run stops at once,
naming it, and such a state is never saved. The advice after a stop can be followed: the
optimisation keys (engine/rundir.py `RETUNABLE_ON_RESUME`) may change when the same command
resumes.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssl_kd.config import TrainConfig
from ssl_kd.errors import NonFiniteLoss, RunFailed

HINT = (
    "To go on, run the same command with a lower optim.lr (say half), a longer "
    "optim.warmup_epochs, a smaller dino.clip_grad (DINO) or train.on_nonfinite=skip: these "
    "keys may change on resume, and the log names each change."
)


def first_nonfinite(module: nn.Module) -> str | None:
    """The name of the first floating-point parameter or buffer holding a NaN or Inf, or None.
    One device sync for the whole module; the per-tensor search runs only when one is bad."""
    named = [
        (name, tensor)
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers())
        if tensor.is_floating_point()
    ]
    if not named or torch.stack([t.detach().isfinite().all() for _, t in named]).all():
        return None
    return next(name for name, tensor in named if not tensor.detach().isfinite().all())


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
            dead = first_nonfinite(method)
            if dead is not None:  # skipping would spend every skip on a state that is lost
                raise RunFailed(
                    f"{where}, and the weights themselves are not finite ({dead} holds "
                    f"NaN/Inf), so skipping cannot recover. Stopping without saving: "
                    f"{self.kept()}. {HINT}"
                )
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
        raise NonFiniteLoss(f"{where}{bound}. Stopping without saving: {self.kept()}. {HINT}")

    def check_state(self, method: nn.Module, step: int) -> None:
        """Before a save: a state with a NaN/Inf parameter or buffer is never written (it would
        replace the last good checkpoint, and the numbered copies behind it get pruned).

        Raises:
            RunFailed: naming the first non-finite parameter or buffer.
        """
        dead = first_nonfinite(method)
        if dead is not None:
            raise RunFailed(
                f"the weights are not finite at step {step} ({dead} holds NaN/Inf) although "
                f"the losses were: an update diverged. Not saving: {self.kept()}. {HINT}"
            )

    def kept(self) -> str:
        """What a stopped run leaves to resume from, for the messages."""
        if self.checkpoint_path.exists():
            return f"{self.checkpoint_path} still holds the last good state"
        return "no checkpoint was written yet, so the same command starts from step 0"

    @property
    def first_skipped(self) -> int | None:
        """The first skipped step: checkpoints up to it hold the state before any divergence
        showed (`CheckpointStore.save` never prunes the newest of them)."""
        return self.skipped_steps[0] if self.skipped_steps else None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = list(state.get("skipped_steps", []))
