"""The linear probe's lr, chosen by a sweep when none is given.

DINO's and MAE's probe lrs are tuned for 100 ImageNet epochs (DINO: ~125k steps at batch 1024;
MAE: ~7k at 16384). The same epochs on a small data set are a few hundred steps, and the head
then barely leaves its initialisation: on the bundled digits both protocols' default lrs stay
near a quarter of what the head can reach. DINOv2's linear evaluation does not fix one lr: it
trains one head per lr of a grid (1e-5 … 0.1, batch-scaled) on the same features and keeps the
best. So does this sweep, with two differences, both for small data sets and honesty:

- the grid spans the protocol's base lr × 0.01 … 1000 (dino: 1e-5 … 1, mae: 1e-3 … 100), wider
  at the top, where few steps need it;
- the lr is chosen on a held-out tenth of the train split, never on the evaluation split; the
  probe is then trained on the whole train split with that lr, so the reported run is exactly
  `--lr CHOSEN` (DINOv2 picks on the evaluation split itself, which is optimistic).

On cached features the sweep costs little (16 small heads, one batched matmul); with random
augmentation the sweep's batches go through the backbone too (about twice a probe's time), and
its held-out images are augmented like the train images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssl_kd.errors import UserError
from ssl_kd.evaluation.linear_head import BASE_LR, LinearProbeConfig, head_scores, train_heads
from ssl_kd.evaluation.probe_data import ProbeData
from ssl_kd.seeding import generator_for

SWEEP_FACTORS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
HOLDOUT_FRACTION = 0.1


def sweep_lr(
    cfg: LinearProbeConfig,
    data: ProbeData,
    dim: int,
    num_classes: int,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Trains one head per base lr of the grid on 90% of the train rows (cfg's epochs and
    schedule) and scores each on the other 10%.

    Returns:
        {"base_lrs", "holdout_top1", "holdout_loss", "chosen_base_lr", "fit_size",
        "holdout_size", "selection"}: the chosen lr has the best held-out top-1 (ties: the
        lower held-out loss).

    Raises:
        UserError: fewer than 2 train images, too few to hold one out.
    """
    rows = data.train_size
    if rows < 2:
        raise UserError(f"{rows} train image(s): too few to choose the lr on; give --lr")
    generator = generator_for(cfg.seed, "linear-probe-holdout")
    shuffled = torch.randperm(rows, generator=generator)
    held = max(1, round(HOLDOUT_FRACTION * rows))
    holdout, fit = shuffled[:held].sort().values, shuffled[held:].sort().values
    base_lrs = [BASE_LR[cfg.protocol] * factor for factor in SWEEP_FACTORS]
    heads: list[nn.Module] = train_heads(
        cfg, base_lrs, dim, num_classes,
        lambda epoch: data.train_batches(fit, epoch), data.steps_per_epoch(len(fit)), device,
    )  # fmt: skip
    features, labels = data.features("train", holdout)
    scores = [head_scores(head, features, labels, device) for head in heads]
    best = max(range(len(heads)), key=lambda i: (scores[i]["top1"], -scores[i]["loss"]))
    return {
        "base_lrs": base_lrs,
        "holdout_top1": [score["top1"] for score in scores],
        "holdout_loss": [score["loss"] for score in scores],
        "chosen_base_lr": base_lrs[best],
        "fit_size": len(fit),
        "holdout_size": len(labels),
        "selection": (
            f"best top-1 on a held-out {HOLDOUT_FRACTION:.0%} of the train split ({len(labels)} "
            f"images; ties: lower loss) of {len(base_lrs)} heads trained on the other "
            f"{len(fit)}; then trained on the whole train split with it"
        ),
    }
