"""Per-iteration schedules, precomputed as arrays (as the official DINO code does)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> Tensor:
    """Linear warm-up from `warmup_start` to `base`, then a half cosine from `base` to `final`.

    Returns:
        [total_steps] float64 values, one per iteration.
    """
    warmup_steps = min(warmup_steps, total_steps)
    warmup = torch.linspace(warmup_start, base, warmup_steps, dtype=torch.float64)
    rest = total_steps - warmup_steps
    progress = torch.arange(rest, dtype=torch.float64) / max(rest, 1)
    cosine = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * progress))
    return torch.cat([warmup, cosine])


def epoch_warmup_schedule(
    start: float, end: float, warmup_epochs: int, epochs: int, steps_per_epoch: int
) -> Tensor:
    """Linear per-epoch warm-up then constant, repeated for each iteration of an epoch.

    DINO's teacher temperature: 0.04 → teacher_temp over `warmup_epochs`, one value per epoch.
    """
    per_epoch = torch.full((epochs,), float(end), dtype=torch.float64)
    warmup_epochs = min(warmup_epochs, epochs)
    if warmup_epochs > 0:
        per_epoch[:warmup_epochs] = torch.linspace(start, end, warmup_epochs, dtype=torch.float64)
    return per_epoch.repeat_interleave(steps_per_epoch)
