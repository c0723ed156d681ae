"""What a run scores on held-out data while it trains: k-NN of its backbone (DINO's protocol)
and top-1/top-5 of its classifier (supervised and distillation methods).

Rank 0 evaluates; the other ranks wait at a barrier (DDP keeps the weights equal).
"""

from __future__ import annotations

from typing import Any

import torch

from ssl_kd.config import Config
from ssl_kd.data import TensorImages, ValSplit, knn_splits, val_split
from ssl_kd.engine import distributed
from ssl_kd.evaluation.classify import evaluate_classifier
from ssl_kd.evaluation.knn import evaluate_knn
from ssl_kd.methods.base import Method


class Evaluator:
    """The run's evaluations: `knn` of the exported backbone, `classify` of the classifier.

    Scores are named `knn_top1`, `knn_top5`, `val_top1`, `val_top5` (summary.json) and logged as
    `eval/<name>`.
    """

    def __init__(self, cfg: Config, method: Method, device: torch.device, rank: int) -> None:
        self.cfg = cfg
        self.method = method
        self.device = device
        self.rank = rank
        self._val: ValSplit | None = None

    def due(self, epoch: int) -> tuple[bool, bool]:
        """(k-NN, classification) due at the end of `epoch` (1-based) by their intervals."""
        every = self.cfg.eval
        knn = bool(every.knn_every_epochs) and epoch % every.knn_every_epochs == 0
        classify = bool(every.classify_every_epochs) and epoch % every.classify_every_epochs == 0
        return knn, classify

    def run(self, knn: bool, classify: bool) -> dict[str, float]:
        """The scores asked for that this run can compute ({} on ranks other than 0)."""
        if not (knn or classify):
            return {}
        if self.rank != 0:
            distributed.barrier()
            return {}
        try:
            scores: dict[str, float] = {}
            if knn:
                scores.update(self.knn())
            if classify:
                scores.update(self.classify())
            return scores
        finally:
            distributed.barrier()

    def knn(self) -> dict[str, float]:
        cfg = self.cfg
        if not self.method.has_vit_backbone:
            return {}
        splits = knn_splits(cfg.data, cfg.eval, cfg.train.seed)
        if splits is None:
            return {}
        k = cfg.eval.knn_k
        scores = evaluate_knn(
            self.method.export_backbone(), splits, (k,), cfg.eval.knn_temperature,
            cfg.eval.batch_size, self.device,
            num_workers=0 if splits.in_memory else cfg.data.num_workers, progress=False,
        )[k]  # fmt: skip
        return {"knn_top1": scores["top1"], "knn_top5": scores["top5"]}

    def classify(self) -> dict[str, float]:
        cfg = self.cfg
        classifier = self.method.classifier()
        if classifier is None:
            return {}
        if self._val is None:  # scanned once per run
            self._val = val_split(cfg.data, cfg.eval, cfg.train.seed)
        if self._val is None:
            return {}
        in_memory = isinstance(self._val.dataset, TensorImages)
        scores: dict[str, Any] = evaluate_classifier(
            classifier, self._val, cfg.eval.batch_size, self.device,
            num_workers=0 if in_memory else cfg.data.num_workers,
        )  # fmt: skip
        return {"val_top1": scores["top1"], "val_top5": scores["top5"]}
