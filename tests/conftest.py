"""Shared fixtures: tiny ViTs and tiny configs, CPU only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ssl_kd.config import Config, load_config
from ssl_kd.models.backbone import ViTBackbone, create_backbone
from tests.slurm_cluster import LocalSlurm, SlurmUnavailable, local_slurm

TINY_VIT = {"patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    """A one-node Slurm cluster on this machine (tests/slurm_cluster.py), for `slurm` tests.

    Skipped, with the reason, when slurm-wlm and munge cannot be installed or started.
    """
    try:
        with local_slurm(tmp_path_factory.mktemp("slurm")) as cluster:
            yield cluster
    except SlurmUnavailable as err:
        pytest.skip(f"no local Slurm cluster: {err}")


def tiny_backbone(img_size: int = 32, **overrides) -> ViTBackbone:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", img_size, **{**TINY_VIT, **overrides})


def tiny_overrides(output_dir: Path, **extra: object) -> list[str]:
    values: dict[str, object] = {
        "output_dir": str(output_dir),
        "model.name": "vit_tiny_patch16_224",
        "model.img_size": 32,
        "model.kwargs": "{patch_size: 4, embed_dim: 64, depth: 2, num_heads: 2}",
        "data.name": "digits",
        "data.transform": "batched",
        "data.global_crop_size": 32,
        "data.local_crop_size": 16,
        "data.num_local_views": 2,
        "dino.out_dim": 128,
        "dino.hidden_dim": 64,
        "dino.bottleneck_dim": 32,
        "masking.keep_ratio": 0.5,
        "optim.warmup_epochs": 1,
        "train.epochs": 2,
        "train.batch_size": 32,
        "train.log_every_steps": 2,
        "train.checkpoint_every_steps": 1000,
        "train.max_steps": 6,
        "eval.knn_at_end": False,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def tiny_config(output_dir: Path, **extra: object) -> Config:
    return load_config(None, tiny_overrides(output_dir, **extra))
