"""The features a linear probe trains and is scored on: extracted once (the cache), or through
the frozen backbone at every use (random augmentation, or --no-cache to check or time it).

Train images are addressed by row: a row of the cache (the readable images, in dataset order),
or a dataset index without the cache. Unreadable images are left out as the splits say; their
labels go with them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ssl_kd.data.splits import EvalSplits
from ssl_kd.evaluation.features import FeatureSpec, backbone_features, extract
from ssl_kd.evaluation.linear_head import LinearProbeConfig
from ssl_kd.models.backbone import ViTBackbone
from ssl_kd.seeding import generator_for


class ProbeData:
    """Train batches and evaluation features of `splits` for one feature `spec`."""

    def __init__(
        self, backbone: ViTBackbone, splits: EvalSplits, spec: FeatureSpec,
        cfg: LinearProbeConfig, device: torch.device | str, progress: bool,
    ) -> None:  # fmt: skip
        self.backbone = backbone.eval().to(device)
        self.splits, self.spec, self.cfg, self.device = splits, spec, cfg, device
        self.progress = progress
        self.cached = cfg.cache and not splits.augmented
        self.cache: dict[str, tuple[Tensor, Tensor]] = {}
        self.labels: dict[str, Tensor] = {}  # split → labels of its readable images, once read
        if self.cached:  # the backbone's output never changes: extract once
            self.cache = {split: self._extract(split) for split in ("train", "val")}

    @property
    def train_size(self) -> int:
        """Train rows: readable images with the cache, every image of the dataset without."""
        if self.cached:
            return len(self.cache["train"][1])
        return len(self.splits.train)  # type: ignore[arg-type]

    def steps_per_epoch(self, rows: int) -> int:
        return -(-rows // self.cfg.batch_size)

    def train_batches(self, rows: Tensor, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(features [B, D], labels [B]) of the train `rows` in an order fixed by (seed, epoch)."""
        generator = generator_for(self.cfg.seed, "linear-probe-order", epoch)
        order = rows[torch.randperm(len(rows), generator=generator)]
        if self.cached:
            features, labels = self.cache["train"]
            for index in order.split(self.cfg.batch_size):
                yield features[index], labels[index]
            return
        batches = self.splits.batches(
            "train", self.cfg.batch_size, order.tolist(), self.cfg.num_workers
        )
        for images, index in batches.with_indices():
            features = backbone_features(self.backbone, images.to(self.device), self.spec)
            yield features, self.splits.train_labels[index]

    def features(self, split: str, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(features [M, D], labels [M]) of a split, or of some of its train `rows`."""
        if self.cached:
            features, labels = self.cache[split]
            return (features, labels) if rows is None else (features[rows], labels[rows])
        return self._extract(split, rows)

    def _extract(self, split: str, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        order = None if rows is None else rows.tolist()
        batches = self.splits.batches(split, self.cfg.batch_size, order, self.cfg.num_workers)
        name = f"{split} features" if self.progress else None
        features = extract(self.backbone, batches, self.spec, self.device, name)
        labels = self.splits.train_labels if split == "train" else self.splits.val_labels
        labels = labels[batches.kept]
        if rows is None:
            self.labels[split] = labels
        return features, labels
