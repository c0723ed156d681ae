"""Labelled train/val splits for evaluation: the bundled digits or a pair of ImageFolders.

`ssl-kd eval` and the trainer's k-NN read the same splits: `eval_splits` takes a root holding
`train/` and `val/` (one sub-folder per class in each, the layout of ImageNet's usual copy);
`knn_splits` takes a run's config, with the two folders named by eval.knn_train_path and
eval.knn_val_path. The digits split is the one the training run held out (same seed).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from ssl_kd.data.datasets import (
    LabelledImageFolder,
    TensorImages,
    digits,
    has_class_folders,
    is_image_folder,
)
from ssl_kd.data.transforms import eval_transform
from ssl_kd.errors import ConfigError, UserError

if TYPE_CHECKING:  # the config imports this package's dataset facts: no import cycle at run time
    from ssl_kd.config import DataConfig, EvalConfig


@dataclass
class EvalSplits:
    """Datasets of (image [3, S, S], label); `augmented`: the train transform is random."""

    train: Dataset
    val: Dataset
    train_labels: Tensor
    val_labels: Tensor
    description: str
    augmented: bool

    @property
    def num_classes(self) -> int:
        return int(max(self.train_labels.max(), self.val_labels.max())) + 1

    @property
    def in_memory(self) -> bool:
        """Tensors already in memory: DataLoader workers would only add overhead."""
        return isinstance(self.train, TensorImages)


def eval_splits(
    data: str, img_size: int, *, seed: int = 0, test_fraction: float = 0.2, augment: bool = False
) -> EvalSplits:
    """`digits` or an ImageFolder root with train/ and val/.

    Args:
        augment: random resized crops (and flips, except on digits) for the train split, DINO's
            linear-probe augmentation; the val split is always resized and centre-cropped.
    """
    if data == "digits":
        train_x, train_y, val_x, val_y = digits(seed, test_fraction)
        crop = T.RandomResizedCrop(img_size, scale=(0.5, 1.0), antialias=True) if augment else None
        return EvalSplits(
            TensorImages(train_x, train_y, img_size, crop),
            TensorImages(val_x, val_y, img_size),
            train_y,
            val_y,
            f"digits (held-out {test_fraction:.0%}, seed {seed})",
            augment,
        )
    root = Path(data)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise UserError(
            f"--data {root}: expected 'digits' or a folder with train/ and val/ ImageFolders "
            "(one sub-folder per class in each)"
        )
    return _image_folders(root / "train", root / "val", img_size, augment, f"ImageFolder {root}")


def knn_splits(data: DataConfig, eval_cfg: EvalConfig, seed: int) -> EvalSplits | None:
    """The labelled splits a training run scores k-NN on, at data.global_crop_size.

    Returns:
        the digits split the run held out (`eval_splits("digits", ...)`); else the ImageFolders
        eval.knn_train_path / eval.knn_val_path when both are set; else None (no labels).

    Raises:
        ConfigError: a k-NN folder is missing, has no class sub-folders, or holds images at
            its top level (they would have no label).
    """
    size = data.global_crop_size
    if data.name == "digits":
        return eval_splits("digits", size, seed=seed, test_fraction=data.test_fraction)
    if not (eval_cfg.knn_train_path and eval_cfg.knn_val_path):
        return None
    folders = {
        "eval.knn_train_path": Path(eval_cfg.knn_train_path),
        "eval.knn_val_path": Path(eval_cfg.knn_val_path),
    }
    for key, folder in folders.items():
        if not folder.is_dir():
            raise ConfigError(f"{key}={folder} is not a folder")
        if not is_image_folder(folder):
            problem = (
                "holds images at its top level"
                if has_class_folders(folder)
                else "has no class sub-folders"
            )
            raise ConfigError(
                f"{key}={folder} {problem}: k-NN needs labelled images, one sub-folder per "
                "class and none at the top (the ImageFolder layout), in both "
                "eval.knn_train_path and eval.knn_val_path"
            )
    train, val = folders.values()
    return _image_folders(train, val, size, False, f"ImageFolders {train} and {val}")


def _image_folders(
    train_root: Path, val_root: Path, img_size: int, augment: bool, name: str
) -> EvalSplits:
    train_transform = eval_transform(img_size)
    if augment:
        train_transform = T.Compose(
            [
                T.RandomResizedCrop(img_size),
                T.RandomHorizontalFlip(),
                *train_transform.transforms[2:],
            ]
        )
    try:
        train = LabelledImageFolder(train_root, train_transform)
        val = LabelledImageFolder(val_root, eval_transform(img_size))
    except FileNotFoundError as err:  # no class folder, or a class folder without images
        raise UserError(f"{name}: {err}") from None
    if train.classes != val.classes:  # labels are class indices: they must mean the same
        raise ConfigError(f"{name}: the train and val folders have different class folders")
    return EvalSplits(
        train,
        val,
        torch.tensor(train.targets),
        torch.tensor(val.targets),
        f"{name} ({len(train.classes)} classes)",
        augment,
    )


class ImageBatches:
    """Image batches [B, C, H, W] of a dataset in a given order, labels dropped; has a length
    (the number of batches) for progress bars."""

    def __init__(
        self, dataset: Dataset, batch_size: int, order: Sequence[int] | None, num_workers: int
    ) -> None:
        indices = list(range(len(dataset))) if order is None else list(order)  # type: ignore[arg-type]
        batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        self.loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tensor]:
        for images, _labels in self.loader:
            yield images


def image_batches(
    dataset: Dataset, batch_size: int, order: Sequence[int] | None = None, num_workers: int = 0
) -> ImageBatches:
    """Image batches [B, C, H, W] in `order` (default: dataset order), labels dropped."""
    return ImageBatches(dataset, batch_size, order, num_workers)
