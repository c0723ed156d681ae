"""Builds the parts a config names: backbone, method, evaluation data."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ssl_kd.config import Config
from ssl_kd.data import digits, eval_transform, image_dataset, normalize_images
from ssl_kd.methods.base import Method
from ssl_kd.methods.dino import DINO
from ssl_kd.methods.dmae import DMAE
from ssl_kd.models.backbone import ViTBackbone, create_backbone, load_backbone_weights


def build_backbone(cfg: Config, drop_path_rate: float | None = None) -> ViTBackbone:
    model = cfg.model
    return create_backbone(
        model.name,
        model.img_size,
        drop_path_rate=model.drop_path_rate if drop_path_rate is None else drop_path_rate,
        checkpoint=model.checkpoint,
        **dict(model.kwargs),
    )


def build_teacher(cfg: Config) -> ViTBackbone:
    """DMAE's frozen teacher, loaded from a local file (never downloaded)."""
    dmae = cfg.dmae
    teacher = create_backbone(dmae.teacher_name, cfg.model.img_size, **dict(dmae.teacher_kwargs))
    assert dmae.teacher_checkpoint is not None
    ignored = load_backbone_weights(teacher, dmae.teacher_checkpoint)
    if ignored:
        shown = ", ".join(ignored[:6]) + (
            f" and {len(ignored) - 6} more" if len(ignored) > 6 else ""
        )
        print(f"teacher {dmae.teacher_checkpoint}: ignored {len(ignored)} keys ({shown})")
    return teacher


def build_method(cfg: Config) -> Method:
    method: Method
    if cfg.method == "dino":
        method = DINO(
            build_backbone(cfg), cfg.dino, cfg.masking, cfg.data.global_crop_size, cfg.train.epochs
        )
    elif cfg.method in ("mae", "dmae"):
        teacher = build_teacher(cfg) if cfg.method == "dmae" else None
        method = DMAE(
            build_backbone(cfg), teacher, cfg.dmae, cfg.masking, cfg.data.global_crop_size
        )
    else:
        raise ValueError(f"unknown method {cfg.method!r}")
    if cfg.eval.pictures_every_steps:
        method.picture_every_steps = cfg.eval.pictures_every_steps
    return method


Batches = Callable[[], Iterable[Tensor]]


def build_knn_data(cfg: Config) -> tuple[Batches, Tensor, Batches, Tensor] | None:
    """Labelled (train, held-out) image batches for k-NN, or None if the data has no labels."""
    batch_size = cfg.eval.batch_size
    if cfg.data.name == "digits":
        train_x, train_y, test_x, test_y = digits(cfg.train.seed, cfg.data.test_fraction)
        size = cfg.data.global_crop_size

        def tensor_batches(images: Tensor) -> Batches:
            def batches() -> Iterable[Tensor]:
                for chunk in images.split(batch_size):
                    if chunk.shape[-1] != size:
                        chunk = torch.nn.functional.interpolate(
                            chunk, size=size, mode="bilinear", align_corners=False
                        )
                    yield normalize_images(chunk)

            return batches

        return tensor_batches(train_x), train_y, tensor_batches(test_x), test_y
    if cfg.eval.knn_train_path and cfg.eval.knn_val_path:
        transform = eval_transform(cfg.data.global_crop_size)
        train_set = image_dataset(cfg.eval.knn_train_path, transform)
        val_set = image_dataset(cfg.eval.knn_val_path, transform)

        def loader_batches(dataset) -> Batches:  # type: ignore[no-untyped-def]
            def batches() -> Iterable[Tensor]:
                loader = DataLoader(dataset, batch_size, num_workers=cfg.data.num_workers)
                for images, _ in loader:
                    yield images

            return batches

        def labels(dataset) -> Tensor:  # type: ignore[no-untyped-def]
            return torch.tensor([label for _, label in getattr(dataset, "samples", [])])

        return (
            loader_batches(train_set),
            labels(train_set),
            loader_batches(val_set),
            labels(val_set),
        )
    return None
