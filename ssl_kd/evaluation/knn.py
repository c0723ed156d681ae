"""Weighted k-NN classification on frozen features (DINO's protocol, arXiv:2104.14294 §4.1).

Features are L2-normalised [CLS] tokens; each of the k nearest training samples (cosine
similarity) votes for its class with weight exp(sim / T), T = 0.07.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ssl_kd.data.splits import EvalSplits
from ssl_kd.evaluation.features import FeatureSpec, extract
from ssl_kd.models.backbone import ViTBackbone

DINO_KS = (10, 20, 100, 200)


def extract_features(
    backbone: ViTBackbone,
    batches: Iterable[Tensor],
    device: torch.device | str = "cpu",
    progress: str | None = None,
) -> Tensor:
    """[CLS] features of every image, in order: [N, D] float32, L2-normalised."""
    return extract(backbone, batches, FeatureSpec(normalize=True), device, progress)


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = (20,),
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[int, dict[str, float]]:
    """Top-1 / top-5 accuracy (%) for each k, from one neighbour search with the largest k.

    Args:
        train_features: [N, D] L2-normalised; train_labels: [N] int.
        test_features: [M, D] L2-normalised; test_labels: [M] int.
    """
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    max_k = min(max(ks), train_features.shape[0])
    correct = {k: torch.zeros(2) for k in ks}
    for start in range(0, test_features.shape[0], chunk_size):
        features = test_features[start : start + chunk_size]
        labels = test_labels[start : start + chunk_size]
        similarity, index = (features @ train_features.T).topk(max_k, dim=1)  # [m, max_k]
        neighbour_labels = train_labels[index]
        weights = (similarity / temperature).exp()
        for k in ks:
            k_eff = min(k, max_k)
            votes = torch.zeros(features.shape[0], num_classes)
            votes.scatter_add_(1, neighbour_labels[:, :k_eff], weights[:, :k_eff])
            top = votes.topk(min(5, num_classes), dim=1).indices
            hits = top == labels.unsqueeze(1)
            correct[k] += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).float()
    total = test_features.shape[0]
    return {
        k: {"top1": 100.0 * c[0].item() / total, "top5": 100.0 * c[1].item() / total}
        for k, c in correct.items()
    }


def evaluate_knn(
    backbone: ViTBackbone,
    splits: EvalSplits,
    ks: Sequence[int] = DINO_KS,
    temperature: float = 0.07,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> dict[int, dict[str, float]]:
    """Extracts train and val features once, then scores every k (DINO's k-NN protocol).

    Images `splits.unreadable` skips are left out with their labels (listed in its `files`).
    """
    features, labels = {}, {}
    for name in ("train", "val"):
        batches = splits.batches(name, batch_size, num_workers=num_workers)
        features[name] = extract_features(
            backbone, batches, device, f"{name} features" if progress else None
        )
        all_labels = splits.train_labels if name == "train" else splits.val_labels
        labels[name] = all_labels[batches.kept]
    return knn_classify(
        features["train"], labels["train"], features["val"], labels["val"], ks, temperature
    )
