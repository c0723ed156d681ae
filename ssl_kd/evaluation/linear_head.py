"""The trained part of a linear probe and its training loop (evaluation/linear.py runs it).

- `dino` (Caron et al., arXiv:2104.14294, eval_linear): Linear (weights N(0, 0.01), bias 0);
  SGD momentum 0.9, lr = 1e-3 · batch / 256, cosine to 0, weight decay 0, 100 epochs.
- `mae` (He et al., arXiv:2111.06377 §A.2): BatchNorm1d(affine=False, eps=1e-6) → Linear; LARS,
  lr = 0.1 · batch / 256, 10 warm-up epochs then cosine, weight decay 0, 90 epochs.

Several heads (one per lr of a sweep) train on the same batches at once: the features of a
batch are computed once, whatever the number of heads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_kd.evaluation.lars import LARS
from ssl_kd.schedules import cosine_schedule

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
    lr: float | None = None  # base lr per 256 images; None: swept (evaluation/lr_sweep.py)
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


class HeadStack(nn.Module):
    """`count` protocol heads side by side, from the same initial weights: features [B, D] →
    logits [K, B, C] in one batched matmul, each head's Linear a parameter set of its own (its
    own lr). The MAE protocol's BatchNorm1d(affine=False) has no parameter and sees the same
    batch for every head, so it runs once; `heads()` gives each head a copy of it."""

    def __init__(self, protocol: str, dim: int, num_classes: int, count: int) -> None:
        super().__init__()
        first = linear_head(protocol, dim, num_classes)
        self.norm = first[0] if isinstance(first, nn.Sequential) else nn.Identity()
        linear = first[-1] if isinstance(first, nn.Sequential) else first
        self.linears = nn.ModuleList(copy.deepcopy(linear) for _ in range(count))

    def forward(self, features: Tensor) -> Tensor:
        linears = cast(list[nn.Linear], list(self.linears))
        weight = torch.stack([linear.weight for linear in linears])  # [K, C, D]
        bias = torch.stack([linear.bias for linear in linears])  # [K, C]
        normed = self.norm(features).expand(len(self.linears), -1, -1)  # [K, B, D]
        return torch.baddbmm(bias.unsqueeze(1), normed, weight.transpose(1, 2))

    def heads(self) -> list[nn.Module]:
        """Each head as `linear_head` builds it, with its trained weights (and norm state)."""
        if isinstance(self.norm, nn.Identity):
            return [copy.deepcopy(linear) for linear in self.linears]
        return [nn.Sequential(copy.deepcopy(self.norm), copy.deepcopy(linear))
                for linear in self.linears]  # fmt: skip


FeatureBatches = Callable[[int], Iterable[tuple[Tensor, Tensor]]]


def train_heads(
    cfg: LinearProbeConfig,
    base_lrs: Sequence[float],
    dim: int,
    num_classes: int,
    train_batches: FeatureBatches,
    steps_per_epoch: int,
    device: torch.device | str = "cpu",
    after_epoch: Callable[[int, list[nn.Module], list[float], list[float]], None] | None = None,
) -> list[nn.Module]:
    """Trains one protocol head per base lr (per 256 images) on the same batches.

    Every head starts from the same weights (seeded by cfg.seed), so a head trained here is
    that head trained alone (up to float rounding).

    Args:
        train_batches: epoch → (features [B, dim], labels [B]) batches of that epoch.
        after_epoch: called after each epoch with (epoch from 1, the heads, their mean train
            losses, their lrs at the epoch's last step).
    """
    total = cfg.epochs * steps_per_epoch
    warmup = min(warmup_epochs(cfg), cfg.epochs) * steps_per_epoch
    lrs = [base_lr * cfg.batch_size / 256 for base_lr in base_lrs]
    torch.manual_seed(cfg.seed)
    stack = HeadStack(cfg.protocol, dim, num_classes, len(lrs)).to(device)
    # A parameter group per head: the heads share no parameter, so one backward of the summed
    # losses gives each head the gradient of its own loss (LARS's trust ratio is per head too).
    groups = [{"params": list(linear.parameters()), "lr": lr}
              for linear, lr in zip(stack.linears, lrs, strict=True)]  # fmt: skip
    optimizer: torch.optim.Optimizer
    if cfg.protocol == DINO_PROTOCOL:
        optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        optimizer = LARS(groups, weight_decay=cfg.weight_decay)
    schedules = [cosine_schedule(lr, 0.0, total, warmup) for lr in lrs]
    step = 0
    for epoch in range(cfg.epochs):
        stack.train()
        loss_sums, seen = torch.zeros(len(lrs), device=device), 0
        for features, labels in train_batches(epoch):
            features, labels = features.to(device), labels.to(device)
            for group, schedule in zip(optimizer.param_groups, schedules, strict=True):
                group["lr"] = float(schedule[min(step, total - 1)])
            logits = stack(features)  # [K, B, C]
            targets = labels.unsqueeze(1).expand(-1, len(lrs))  # [B, K]
            losses = F.cross_entropy(logits.permute(1, 2, 0), targets, reduction="none").mean(0)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            loss_sums += losses.detach() * len(labels)
            seen, step = seen + len(labels), step + 1
        if after_epoch is not None:
            now = [group["lr"] for group in optimizer.param_groups]
            after_epoch(epoch + 1, stack.heads(), (loss_sums / max(seen, 1)).tolist(), now)
    heads = stack.heads()
    return heads


@torch.no_grad()
def head_scores(
    head: nn.Module, features: Tensor, labels: Tensor, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of `head` (eval mode) on features."""
    head.eval()
    logits = head(features.to(device)).cpu()
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels.unsqueeze(1)
    return {
        "top1": 100.0 * top[:, 0].float().mean().item(),
        "top5": 100.0 * top.any(dim=1).float().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
    }


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
    """Trains the protocol's head at base lr `base_lr(cfg)`; evaluates after every epoch.

    Args:
        val: → (features [M, dim], labels [M]) of the evaluation split.
        log: called after each epoch with (epoch, {"linear/val_top1": ..., ...}).

    Returns:
        (per-epoch {"epoch", "top1", "top5", "train_loss", "lr"}, the head on the CPU).
    """
    history: list[dict[str, float]] = []

    def evaluate(epoch: int, heads: list[nn.Module], losses: list[float], lrs: list[float]) -> None:
        val_features, val_labels = val()
        scores = head_scores(heads[0], val_features, val_labels, device)
        values = {"top1": scores["top1"], "top5": scores["top5"], "train_loss": losses[0],
                  "lr": lrs[0]}  # fmt: skip
        history.append({"epoch": epoch, **values})
        if log is not None:
            log(epoch, {f"linear/{'val_' * k.startswith('top')}{k}": v for k, v in values.items()})

    (head,) = train_heads(
        cfg, [base_lr(cfg)], dim, num_classes, train_batches, steps_per_epoch, device, evaluate
    )
    return history, head.cpu()


def base_lr(cfg: LinearProbeConfig) -> float:
    return cfg.lr if cfg.lr is not None else BASE_LR[cfg.protocol]


def warmup_epochs(cfg: LinearProbeConfig) -> int:
    return WARMUP_EPOCHS[cfg.protocol] if cfg.warmup_epochs is None else cfg.warmup_epochs
