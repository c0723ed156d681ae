"""Checks on a loaded config that its types alone cannot make: choices, ranges, crop sizes
against the patch size, the batch against the data per process, files that must exist."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from ssl_kd.config import (
    DATASETS,
    DIGITS_IMAGES,
    METHODS,
    OPTIMIZERS,
    PROJECTIONS,
    STRATEGIES,
    TRANSFORMS,
    Config,
    ConfigError,
)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


def validate(cfg: Config) -> None:
    """Checks the values a type alone cannot: choices, ranges, combinations."""
    _choice("method", cfg.method, METHODS)
    _choice("masking.strategy", str(cfg.masking.strategy), STRATEGIES)
    _choice("data.name", cfg.data.name, DATASETS)
    _choice("data.transform", cfg.data.transform, TRANSFORMS)
    _choice("optim.name", cfg.optim.name, OPTIMIZERS)
    _choice("train.device", cfg.train.device, ("auto", "cpu", "cuda"))
    _choice("dmae.projection", cfg.dmae.projection, PROJECTIONS)
    _choice("data.on_error", cfg.data.on_error, ("skip", "error"))
    _choice("train.on_nonfinite", cfg.train.on_nonfinite, ("stop", "skip"))
    ratios = {
        "masking.keep_ratio": cfg.masking.keep_ratio,
        "masking.keep_ratio_start": cfg.masking.keep_ratio_start,
        "dmae.teacher_keep_ratio": cfg.dmae.teacher_keep_ratio,
    }
    for key, ratio in ratios.items():
        if ratio is not None and not 0.0 < ratio <= 1.0:  # NaN fails this too
            raise ConfigError(
                f"{key}={ratio} is impossible: it is the fraction of patches the teacher sees "
                "and must lie in (0, 1]; use 1.0 for an unmasked teacher"
            )
    positive = {
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.log_every_steps": cfg.train.log_every_steps,
        "train.checkpoint_every_steps": cfg.train.checkpoint_every_steps,
        "model.img_size": cfg.model.img_size,
        "data.global_crop_size": cfg.data.global_crop_size,
        "data.local_crop_size": cfg.data.local_crop_size,
        "dino.out_dim": cfg.dino.out_dim,
        "optim.lr": cfg.optim.lr,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if cfg.eval.pictures_every_steps < 0:
        raise ConfigError(
            f"eval.pictures_every_steps={cfg.eval.pictures_every_steps} must be >= 0 (0: never)"
        )
    if cfg.data.num_local_views < 0:
        raise ConfigError(f"data.num_local_views={cfg.data.num_local_views} must be >= 0")
    for key, scale in (
        ("data.global_crop_scale", cfg.data.global_crop_scale),
        ("data.local_crop_scale", cfg.data.local_crop_scale),
    ):
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ConfigError(f"{key}={list(scale)} must satisfy 0 < min <= max <= 1")
    if cfg.data.name == "imagefolder" and not cfg.data.path:
        raise ConfigError(
            "data.path is not set: point it at an ImageFolder root (or a flat image folder), "
            "or use data.name=digits for the bundled demo data"
        )
    if not 0.0 < cfg.data.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction={cfg.data.test_fraction} must lie in (0, 1)")
    if cfg.method in ("mae", "dmae") and cfg.masking.strategy.startswith("attention"):
        raise ConfigError(
            f"masking.strategy={cfg.masking.strategy} needs a student attention map, which "
            f"{cfg.method}'s encoder mask is drawn before; use random (or block). The DMAE "
            "teacher's own top-k is dmae.teacher_keep_ratio"
        )
    if cfg.method in ("mae", "dmae") and cfg.masking.keep_ratio == 1.0:
        raise ConfigError(
            f"masking.keep_ratio=1.0 leaves nothing for {cfg.method} to reconstruct; "
            "use 0.25 (MAE, DMAE) or 0.05"
        )
    if cfg.method == "dmae":
        if not cfg.dmae.teacher_checkpoint:
            raise ConfigError(
                "dmae.teacher_checkpoint is not set: DMAE distils from a frozen pretrained MAE "
                "teacher; point it at a local checkpoint (MAE release, timm state dict or an "
                "ssl_kd run's checkpoint.pth)"
            )
        pairs = cfg.dmae.aligned_blocks
        if not pairs or any(len(pair) != 2 or min(pair) < 0 for pair in pairs):
            raise ConfigError(
                f"dmae.aligned_blocks={pairs} must be a non-empty list of [student_block, "
                "teacher_block] pairs of 0-based block indices, e.g. [[8, 17]]"
            )
    if cfg.train.max_steps is not None and cfg.train.max_steps <= 0:
        raise ConfigError(f"train.max_steps={cfg.train.max_steps} must be > 0 (or null)")
    for key, count in (
        ("train.keep_checkpoints", cfg.train.keep_checkpoints),
        ("train.max_skipped_steps", cfg.train.max_skipped_steps),
    ):
        if count < 0:
            raise ConfigError(f"{key}={count} must be >= 0")
    _validate_crops(cfg)
    _validate_batch(cfg)
    _validate_files(cfg)


def patch_size_of(cfg: Config) -> int | None:
    """The student's patch size: model.kwargs.patch_size, else the `patchN` in model.name."""
    if "patch_size" in cfg.model.kwargs:
        return int(cfg.model.kwargs["patch_size"])
    match = re.search(r"patch(\d+)", cfg.model.name)
    return int(match.group(1)) if match else None


def _validate_crops(cfg: Config) -> None:
    data = cfg.data
    patch = patch_size_of(cfg)
    crops = {"data.global_crop_size": data.global_crop_size}
    multi_crop = cfg.method == "dino" and data.num_local_views > 0
    if multi_crop:
        crops["data.local_crop_size"] = data.local_crop_size
    for key, size in crops.items():
        if patch and size % patch:
            raise ConfigError(
                f"{key}={size} is not divisible by the patch size {patch} of {cfg.model.name}: "
                f"use a multiple of {patch} (e.g. {max(patch, size // patch * patch)})"
            )
    if multi_crop and data.local_crop_size > data.global_crop_size:
        raise ConfigError(
            f"data.local_crop_size={data.local_crop_size} is larger than data.global_crop_size="
            f"{data.global_crop_size}: local crops are the small views (DINO: 96 vs 224)"
        )


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun and submitit set it; 1 when unset."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world_size = int(text)
    except ValueError:
        world_size = 0
    if world_size < 1:
        raise ConfigError(f"environment variable WORLD_SIZE={text!r} must be a positive integer")
    return world_size


def digits_train_size(test_fraction: float) -> int:
    """Training images of the bundled digits split (1797 images, test part rounded up)."""
    return DIGITS_IMAGES - math.ceil(DIGITS_IMAGES * test_fraction)


def _validate_batch(cfg: Config) -> None:
    world_size = world_size_from_env()
    batch = cfg.train.batch_size
    if cfg.data.name == "digits":
        share = digits_train_size(cfg.data.test_fraction) // world_size
        if share < batch:
            raise ConfigError(
                f"train.batch_size={batch} (per process) is larger than the data's share per "
                f"process ({share} digits images with WORLD_SIZE={world_size}): lower "
                "train.batch_size or use fewer processes"
            )
    needs_batch_statistics = cfg.method == "dino" and (
        cfg.dino.batch_norm or cfg.dino.koleo_weight > 0
    )
    if needs_batch_statistics and batch < 2:
        raise ConfigError(
            f"train.batch_size={batch} per process is too small for dino.batch_norm / "
            "dino.koleo_weight, which need at least 2 images per process"
        )


def _validate_files(cfg: Config) -> None:
    """Local files a run reads, checked before any model is built."""
    files = {
        "model.checkpoint": cfg.model.checkpoint,
        "dmae.teacher_checkpoint": cfg.dmae.teacher_checkpoint if cfg.method == "dmae" else None,
    }
    for key, path in files.items():
        if path and not Path(path).is_file():
            raise ConfigError(f"{key}={path} does not exist (nothing is ever downloaded)")
    if cfg.data.name == "imagefolder" and cfg.data.path and not Path(cfg.data.path).is_dir():
        raise ConfigError(f"data.path={cfg.data.path} is not a folder")
