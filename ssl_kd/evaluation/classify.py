"""Top-1 / top-5 accuracy of a classifier on a labelled split (DeiT's evaluation: resize to
size / 0.875, centre crop, the whole validation set once)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ssl_kd.data.splits import ValSplit


def topk_hits(logits: Tensor, labels: Tensor) -> Tensor:
    """[2]: how many of the rows have their label first, and among the top 5 (or all K < 5)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [B, 5]
    hits = top == labels.unsqueeze(1)
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])


@torch.no_grad()
def evaluate_classifier(
    classifier: nn.Module,
    split: ValSplit,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> dict[str, Any]:
    """Top-1 and top-5 accuracy (%) of `classifier` (images → an output with `logits` [B, K])
    on `split`, in eval mode (its mode is restored after).

    Images `split.unreadable` skips are left out with their labels; `images` says how many
    were scored.
    """
    was_training = classifier.training
    classifier.eval()
    hits = torch.zeros(2, dtype=torch.long)
    batches = split.batches(batch_size, num_workers)
    try:
        for images, indices in batches.with_indices():
            logits = classifier(images.to(device)).logits.float().cpu()
            hits += topk_hits(logits, split.labels[indices])
    finally:
        classifier.train(was_training)
    total = len(batches.kept)
    return {"top1": 100.0 * hits[0].item() / total, "top5": 100.0 * hits[1].item() / total,
            "images": total}  # fmt: skip
