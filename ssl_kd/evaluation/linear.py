"""Linear probe on a frozen backbone, with the DINO or the MAE protocol (named in the output).

- `dino` (Caron et al., arXiv:2104.14294, eval_linear): [CLS] of the last n blocks (n = 4 for
  ViT-S), optionally + the average patch token (ViT-B: n = 1 + avgpool) → Linear; SGD.
- `mae` (He et al., arXiv:2111.06377 §A.2): [CLS] after the final norm → BatchNorm1d(affine=False)
  → Linear; LARS.

The heads and their training: evaluation/linear_head.py. Without a given lr it is swept on a
held-out part of the train split first (evaluation/lr_sweep.py): the recipes' lrs are tuned for
100 ImageNet epochs and leave the head near its initialisation on a small data set. The result
says which lr was used and how it was chosen, and warns when the probe is at chance level or had
few steps. Without random augmentation the features are extracted once (evaluation/probe_data.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import Tensor, nn

from ssl_kd.data.splits import EvalSplits
from ssl_kd.evaluation.features import FeatureSpec
from ssl_kd.evaluation.linear_head import (
    DINO_PROTOCOL,
    PROTOCOLS,
    REPORTS,
    LinearProbeConfig,
    base_lr,
    train_head,
    warmup_epochs,
)
from ssl_kd.evaluation.lr_sweep import SWEEP_FACTORS, sweep_lr
from ssl_kd.evaluation.probe_data import ProbeData
from ssl_kd.models.backbone import ViTBackbone

__all__ = ["LinearProbeConfig", "linear_probe", "probe_warnings"]

# Fewer steps than this and the recipes' lrs (tuned for ~7k-125k steps) may leave the head
# untrained: said when the lr was given rather than swept.
FEW_STEPS = 1000


def linear_probe(
    backbone: ViTBackbone,
    splits: EvalSplits,
    cfg: LinearProbeConfig,
    device: torch.device | str = "cpu",
    log: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], nn.Module]:
    """Linear probe of a frozen backbone on labelled splits (cfg.lr None: swept first).

    Returns:
        (the `linear_eval.json` content, the trained head on the CPU). Its `config` holds the
        values used (the lr chosen, the blocks read), `warnings` what the user should know.
    """
    if cfg.protocol not in PROTOCOLS or cfg.report not in REPORTS:
        raise ValueError(
            f"protocol {cfg.protocol!r} / report {cfg.report!r}: choose from "
            f"{PROTOCOLS} / {REPORTS}"
        )
    start = time.perf_counter()
    dino = cfg.protocol == DINO_PROTOCOL
    n_blocks = min(cfg.n_last_blocks, backbone.num_blocks) if dino else 1
    spec = FeatureSpec(n_blocks, cfg.avgpool and dino)
    used = replace(cfg, n_last_blocks=n_blocks, avgpool=spec.avgpool,
                   warmup_epochs=warmup_epochs(cfg), lr=base_lr(cfg))  # fmt: skip
    data = ProbeData(backbone, splits, spec, cfg, device, progress)
    dim = spec.dim(backbone.embed_dim)
    sweep = None
    if cfg.lr is None:
        sweep = sweep_lr(used, data, dim, splits.num_classes, device)
        used = replace(used, lr=sweep["chosen_base_lr"])
    rows = torch.arange(data.train_size)
    steps_per_epoch = data.steps_per_epoch(data.train_size)
    history, head = train_head(
        used, dim, splits.num_classes, lambda epoch: data.train_batches(rows, epoch),
        steps_per_epoch, lambda: data.features("val"), device, log,
    )  # fmt: skip
    reported = history[-1] if cfg.report == "last" else max(history, key=lambda h: h["top1"])
    lr = (used.lr or 0.0) * cfg.batch_size / 256
    tokens = f"[CLS] of the last {n_blocks} block(s) after the final norm" + (
        " + average patch token" if spec.avgpool else ""
    )
    recipe = "Linear; SGD momentum 0.9" if dino else "BatchNorm1d(affine=False) + Linear; LARS"
    unreadable = splits.unreadable.files
    result = {
        "protocol": cfg.protocol,
        "protocol_details": (
            f"frozen backbone; {tokens}; {recipe}, lr {lr:g} (base {used.lr:g} x batch / 256), "
            f"{used.warmup_epochs} warm-up epochs, cosine to 0, weight decay "
            f"{cfg.weight_decay:g}"
        ),
        "top1": reported["top1"],
        "top5": reported["top5"],
        "reported_epoch": int(reported["epoch"]),
        "epoch_choice": (
            "last epoch (default): no epoch is selected on the evaluation split"
            if cfg.report == "last"
            else "best val top-1 over all epochs: selected on the evaluation split itself, so "
            "optimistic (as the official DINO eval_linear reports)"
        ),
        "lr_choice": sweep["selection"] if sweep else "given (--lr)",
        "lr_sweep": sweep,
        "steps": cfg.epochs * steps_per_epoch,
        "feature_dim": dim,
        "cached_features": data.cached,
        "augmentation": splits.augmented,
        "data": splits.description,
        "train_size": len(splits.train_labels) - len(unreadable.get("train", {})),
        "val_size": len(splits.val_labels) - len(unreadable.get("val", {})),
        "unreadable_images": {split: list(files) for split, files in unreadable.items()},
        "config": asdict(used),
        "per_epoch": history,
    }
    result["warnings"] = probe_warnings(result, data.labels["val"], sweep)
    result["wall_s"] = time.perf_counter() - start
    return result, head


def probe_warnings(
    result: dict[str, Any], val_labels: Tensor, sweep: dict[str, Any] | None
) -> list[str]:
    """What a user should know about a probe's result: at chance level, too few steps.

    Chance level is the rate of the most frequent val class (what always answering it scores);
    a top-1 within two binomial standard errors of it is no evidence that the head learned.
    """
    warnings = []
    counts = torch.bincount(val_labels)
    chance = counts.max().item() / len(val_labels)
    margin = 2 * math.sqrt(chance * (1 - chance) / len(val_labels))
    if result["top1"] <= 100 * (chance + margin):
        warnings.append(
            f"top-1 {result['top1']:.2f} is at chance level ({100 * chance:.2f}: always "
            f"answering the most frequent of the {len(counts)} val classes; within 2 standard "
            f"errors on {len(val_labels)} images): the head learned nothing from these "
            "features. Check that the checkpoint holds trained weights"
            + ("; leave --lr out (the lr is then swept) or raise --epochs" if not sweep else "")
        )
    steps, config = result["steps"], result["config"]
    if sweep is None and steps < FEW_STEPS:
        warnings.append(
            f"only {steps} steps ({config['epochs']} epochs of {steps // config['epochs']} "
            f"batches of {config['batch_size']}): the protocols' lrs are tuned for ~7k (MAE) "
            "to ~125k (DINO) steps and may leave the head under-trained; leave --lr out (the "
            "lr is then swept) or raise --epochs"
        )
    if sweep is not None and sweep["chosen_base_lr"] == sweep["base_lrs"][-1]:
        warnings.append(
            f"the best lr of the sweep is its largest ({sweep['chosen_base_lr']:g}, "
            f"{SWEEP_FACTORS[-1]:g}x the protocol's): {steps} steps may be too few for this "
            "head; raise --epochs or lower --batch-size"
        )
    return warnings
