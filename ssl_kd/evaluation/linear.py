"""Linear probe on a frozen backbone, with the DINO or the MAE protocol (named in the output).

- `dino` (Caron et al., arXiv:2104.14294, eval_linear): [CLS] of the last n blocks (n = 4 for
  ViT-S), optionally + the average patch token (ViT-B: n = 1 + avgpool) → Linear (weights
  N(0, 0.01), bias 0); SGD momentum 0.9, lr = 1e-3 · batch / 256, cosine to 0, weight decay 0.
- `mae` (He et al., arXiv:2111.06377 §A.2): [CLS] after the final norm → BatchNorm1d(affine=False,
  eps=1e-6) → Linear; LARS, lr = 0.1 · batch / 256, 10 warm-up epochs then cosine, weight decay 0.

Without random augmentation the backbone's output never changes, so the features are extracted
once and the head trains on the cache; with augmentation every batch goes through the backbone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_kd.data.splits import EvalSplits, image_batches
from ssl_kd.evaluation.features import FeatureSpec, backbone_features, extract
from ssl_kd.evaluation.lars import LARS
from ssl_kd.models.backbone import ViTBackbone
from ssl_kd.schedules import cosine_schedule
from ssl_kd.seeding import generator_for

# The two linear-probe protocols, named after the papers that define them.
DINO_PROTOCOL, MAE_PROTOCOL = "dino", "mae"
PROTOCOLS = (DINO_PROTOCOL, MAE_PROTOCOL)
REPORTS = ("last", "best")
BASE_LR = {DINO_PROTOCOL: 1e-3, MAE_PROTOCOL: 0.1}  # per 256 images
WARMUP_EPOCHS = {DINO_PROTOCOL: 0, MAE_PROTOCOL: 10}


@dataclass
class LinearProbeConfig:
    protocol: str = DINO_PROTOCOL
    epochs: int = 100
    batch_size: int = 256
    lr: float | None = None  # base lr per 256 images; None: the protocol's
    weight_decay: float = 0.0
    warmup_epochs: int | None = None  # None: the protocol's
    n_last_blocks: int = 4  # dino only (capped at the depth); mae uses the last block
    avgpool: bool = False  # dino only
    augment: bool = False  # random resized crops (+ flips) of the train images
    cache: bool = True  # extract features once when there is no augmentation
    report: str = "last"  # which epoch's accuracy is reported: last, or best on val
    seed: int = 0
    num_workers: int = 0


def linear_head(protocol: str, dim: int, num_classes: int) -> nn.Module:
    """The trained part: Linear (dino) or BatchNorm1d(affine=False) + Linear (mae)."""
    linear = nn.Linear(dim, num_classes)
    nn.init.zeros_(linear.bias)
    if protocol == DINO_PROTOCOL:
        nn.init.normal_(linear.weight, std=0.01)
        return linear
    nn.init.trunc_normal_(linear.weight, std=0.01)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


FeatureBatches = Callable[[int], Iterable[tuple[Tensor, Tensor]]]


def train_head(
    cfg: LinearProbeConfig,
    dim: int,
    num_classes: int,
    train_batches: FeatureBatches,
    steps_per_epoch: int,
    val: Callable[[], tuple[Tensor, Tensor]],
    device: torch.device | str = "cpu",
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[list[dict[str, float]], nn.Module]:
    """Trains the protocol's head on features; evaluates after every epoch.

    Args:
        train_batches: epoch → (features [B, dim], labels [B]) batches of that epoch.
        val: → (features [M, dim], labels [M]) of the evaluation split.
        log: called after each epoch with (epoch, {"linear/val_top1": ..., ...}).

    Returns:
        (per-epoch {"epoch", "top1", "top5", "train_loss", "lr"}, the head on the CPU).
    """
    torch.manual_seed(cfg.seed)
    head = linear_head(cfg.protocol, dim, num_classes).to(device)
    lr = (cfg.lr if cfg.lr is not None else BASE_LR[cfg.protocol]) * cfg.batch_size / 256
    if cfg.protocol == DINO_PROTOCOL:
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            head.parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay
        )
    else:
        optimizer = LARS(head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    schedule = cosine_schedule(
        lr, 0.0, cfg.epochs * steps_per_epoch, min(warmup_epochs(cfg), cfg.epochs) * steps_per_epoch
    )
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(cfg.epochs):
        head.train()
        loss_sum, seen = 0.0, 0
        for features, labels in train_batches(epoch):
            for group in optimizer.param_groups:
                group["lr"] = float(schedule[min(step, len(schedule) - 1)])
            loss = F.cross_entropy(head(features.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, seen, step = (
                loss_sum + loss.item() * len(labels),
                seen + len(labels),
                step + 1,
            )
        head.eval()
        val_features, val_labels = val()
        with torch.no_grad():
            logits = head(val_features.to(device)).cpu()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == val_labels.unsqueeze(1)
        scores = {
            "top1": 100.0 * top[:, 0].float().mean().item(),
            "top5": 100.0 * top.any(dim=1).float().mean().item(),
            "train_loss": loss_sum / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append({"epoch": epoch + 1, **scores})
        if log is not None:
            log(
                epoch + 1,
                {f"linear/{'val_' * k.startswith('top')}{k}": v for k, v in scores.items()},
            )
    return history, head.cpu()


def warmup_epochs(cfg: LinearProbeConfig) -> int:
    return WARMUP_EPOCHS[cfg.protocol] if cfg.warmup_epochs is None else cfg.warmup_epochs


def linear_probe(
    backbone: ViTBackbone,
    splits: EvalSplits,
    cfg: LinearProbeConfig,
    device: torch.device | str = "cpu",
    log: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], nn.Module]:
    """Linear probe of a frozen backbone on labelled splits.

    Returns:
        (the `linear_eval.json` content, the trained head on the CPU).
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
    cached = cfg.cache and not splits.augmented
    backbone.eval().to(device)
    train_labels, workers = splits.train_labels, cfg.num_workers

    def features_of(dataset: Any, order: list[int] | None = None, name: str = "") -> Tensor:
        batches = image_batches(dataset, cfg.batch_size, order, workers)
        return extract(backbone, batches, spec, device, f"{name} features" if progress else None)

    if cached:  # the backbone's output never changes: extract once
        train_cache = features_of(splits.train, name="train")
        val_cache = features_of(splits.val, name="val")

    def train_batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        generator = generator_for(cfg.seed, "linear-probe-order", epoch)
        order = torch.randperm(len(train_labels), generator=generator)
        if cached:
            for index in order.split(cfg.batch_size):
                yield train_cache[index], train_labels[index]
            return
        images = image_batches(splits.train, cfg.batch_size, order.tolist(), workers)
        for index, batch in zip(order.split(cfg.batch_size), images, strict=True):
            yield backbone_features(backbone, batch.to(device), spec), train_labels[index]

    def val() -> tuple[Tensor, Tensor]:
        return (val_cache if cached else features_of(splits.val)), splits.val_labels

    steps_per_epoch = -(-len(train_labels) // cfg.batch_size)
    dim = spec.dim(backbone.embed_dim)
    history, head = train_head(
        cfg, dim, splits.num_classes, train_batches, steps_per_epoch, val, device, log
    )
    reported = history[-1] if cfg.report == "last" else max(history, key=lambda h: h["top1"])
    choice = (
        "last epoch (default): no epoch is selected on the evaluation split"
        if cfg.report == "last"
        else "best val top-1 over all epochs: selected on the evaluation split itself, so "
        "optimistic (as the official DINO eval_linear reports)"
    )
    lr = (cfg.lr if cfg.lr is not None else BASE_LR[cfg.protocol]) * cfg.batch_size / 256
    tokens = f"[CLS] of the last {n_blocks} block(s) after the final norm" + (
        " + average patch token" if spec.avgpool else ""
    )
    recipe = "Linear; SGD momentum 0.9" if dino else "BatchNorm1d(affine=False) + Linear; LARS"
    result = {
        "protocol": cfg.protocol,
        "protocol_details": (
            f"frozen backbone; {tokens}; {recipe}, lr {lr:g} (base "
            f"{lr * 256 / cfg.batch_size:g} x batch / 256), {warmup_epochs(cfg)} warm-up epochs, "
            f"cosine to 0, weight decay {cfg.weight_decay:g}"
        ),
        "top1": reported["top1"],
        "top5": reported["top5"],
        "reported_epoch": int(reported["epoch"]),
        "epoch_choice": choice,
        "feature_dim": dim,
        "cached_features": cached,
        "augmentation": splits.augmented,
        "data": splits.description,
        "train_size": len(train_labels),
        "val_size": len(splits.val_labels),
        "config": asdict(cfg),
        "wall_s": time.perf_counter() - start,
        "per_epoch": history,
    }
    return result, head
