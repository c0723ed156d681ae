"""The adaptive keep ratio: a teacher masked as far as its targets allow, and no further.

Every `probe_every` steps the method also runs its teacher on all patches (DMAE: all visible
patches) for a few images of the batch, and measures how far the masked teacher's targets are
from the full teacher's, in the terms its loss uses (the gap). The controller lowers the keep
ratio by `step_size` while the gap stays under `tolerance · (1 − hysteresis)`, raises it by
`step_size` when the gap exceeds `tolerance`, holds it in between, and keeps it within
[`minimum`, `maximum`]. At the full ratio the masked teacher is the full teacher: the gap is 0
and no probe needs to run.

Pure Python, no config: its state is a dict of numbers, saved in the checkpoint, so a resumed
run goes on from the same ratio. Under torch.distributed every rank feeds it the gap averaged
over the ranks, so every rank moves its ratio identically.
"""

from __future__ import annotations

import math
from typing import Any

from ssl_kd.masking import num_kept


class KeepRatioController:
    """Owns the current keep ratio of an adaptively masked teacher.

    Args:
        start: the first ratio, in [minimum, maximum].
        tolerance: the largest gap tolerated (in the method's loss units), >= 0; 0 never lowers.
        minimum, maximum: bounds of the ratio, 0 < minimum <= maximum <= 1.
        step_size: how far one probe moves the ratio, > 0.
        hysteresis: dead band in [0, 1): lowered only while gap < tolerance · (1 − hysteresis).
        probe_every: probe every N steps (steps 0, N, 2N, ...).
        probe_fraction: the share of each process's batch the probe runs on (at least 1 image).
    """

    def __init__(
        self, start: float, tolerance: float, *, minimum: float = 0.1, maximum: float = 1.0,
        step_size: float = 0.05, hysteresis: float = 0.2, probe_every: int = 50,
        probe_fraction: float = 0.125,
    ) -> None:  # fmt: skip
        # The config's checks say this per key (MaskingConfig.check); here for direct users.
        if not 0.0 < minimum <= start <= maximum <= 1.0:
            raise ValueError(
                f"need 0 < minimum {minimum} <= start {start} <= maximum {maximum} <= 1"
            )
        if not (tolerance >= 0 and step_size > 0 and 0 <= hysteresis < 1 and probe_every >= 1):
            raise ValueError(
                "need tolerance >= 0, step_size > 0, 0 <= hysteresis < 1 and probe_every >= 1"
            )
        if not 0.0 < probe_fraction <= 1.0:
            raise ValueError(f"probe_fraction={probe_fraction} must lie in (0, 1]")
        self.start, self.tolerance = start, tolerance
        self.minimum, self.maximum = minimum, maximum
        self.step_size, self.hysteresis = step_size, hysteresis
        self.probe_every, self.probe_fraction = probe_every, probe_fraction
        self.ratio = start
        self.steps = 0  # steps recorded
        self.ratio_sum = 0.0  # of the ratio each recorded step used
        self.lowest = start
        self.probes = 0  # probes that gave a finite gap
        self.gap_sum = 0.0
        self.last_gap: float | None = None
        self.lowered = self.raised = 0
        self.epoch_ratio_sums: list[float] = []  # per epoch, for the run's summary
        self.epoch_steps: list[int] = []

    def probe_due(self, step: int) -> bool:
        """Whether step `step` probes (the same steps on every rank)."""
        return step % self.probe_every == 0

    def probe_size(self, batch: int) -> int:
        """Images the probe runs on out of this process's `batch`: the first ones."""
        return num_kept(batch, self.probe_fraction)

    def update(self, gap: float | None, epoch: int) -> float:
        """Records a step that used `self.ratio`, then moves the ratio by its probe's gap.

        Args:
            gap: the step's gap (averaged over ranks), None on a step without a probe; a
                non-finite gap (a poisoned step) moves nothing.
            epoch: the step's epoch, for the per-epoch means of the summary.

        Returns:
            The ratio of the next step.
        """
        self.steps += 1
        self.ratio_sum += self.ratio
        while len(self.epoch_steps) <= epoch:
            self.epoch_ratio_sums.append(0.0)
            self.epoch_steps.append(0)
        self.epoch_ratio_sums[epoch] += self.ratio
        self.epoch_steps[epoch] += 1
        if gap is None or not math.isfinite(gap):
            return self.ratio
        self.probes += 1
        self.gap_sum += gap
        self.last_gap = gap
        if gap > self.tolerance and self.ratio < self.maximum:
            self.ratio = min(self.maximum, round(self.ratio + self.step_size, 9))
            self.raised += 1
        elif gap < self.tolerance * (1 - self.hysteresis) and self.ratio > self.minimum:
            self.ratio = max(self.minimum, round(self.ratio - self.step_size, 9))
            self.lowered += 1
        self.lowest = min(self.lowest, self.ratio)
        return self.ratio

    def summary(self) -> dict[str, Any]:
        """The ratio's trajectory in numbers, for summary.json."""
        return {
            "start": self.start,
            "final": self.ratio,
            "mean": self.ratio_sum / self.steps if self.steps else self.ratio,
            "lowest": self.lowest,
            "per_epoch": [
                total / steps
                for total, steps in zip(self.epoch_ratio_sums, self.epoch_steps, strict=True)
                if steps
            ],
            "tolerance": self.tolerance,
            "probes": self.probes,
            "gap_last": self.last_gap,
            "gap_mean": self.gap_sum / self.probes if self.probes else None,
            "lowered": self.lowered,
            "raised": self.raised,
        }

    _STATE = ("ratio", "steps", "ratio_sum", "lowest", "probes", "gap_sum", "last_gap",
              "lowered", "raised", "epoch_ratio_sums", "epoch_steps")  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self._STATE:
            value = state[name]
            setattr(self, name, list(value) if isinstance(value, list) else value)
