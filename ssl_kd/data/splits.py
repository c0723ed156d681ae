"""Labelled train/val splits for evaluation: bundled data (digits, cluttered digits) or a pair of
ImageFolders.

`ssl-kd eval` and the trainer's k-NN read the same splits: `eval_splits` takes a root holding
`train/` and `val/` (one sub-folder per class in each, the layout of ImageNet's usual copy);
`knn_splits` takes a run's config, with the two folders named by eval.knn_train_path and
eval.knn_val_path. A bundled split is the one the training run held out (same seed).
`val_split` is the labelled split a training run scores its classifier on (top-1/top-5): the
held-out bundled split, or the ImageFolder eval.val_path with data.path's classes.
`open_eval_folders` scans and checks a root's folders on their own, so that `ssl-kd eval` can
refuse bad data before it loads a checkpoint. Unreadable images are left out of a split as
`EvalSplits.unreadable` says (data/batches.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T

from ssl_kd.data.batches import ImageBatches, UnreadableImages
from ssl_kd.data.bundled import bundled_splits, is_bundled
from ssl_kd.data.datasets import (
    LabelledImageFolder,
    TensorImages,
    has_class_folders,
    is_image_folder,
)
from ssl_kd.data.transforms import eval_transform
from ssl_kd.errors import ConfigError, UserError, key_list

if TYPE_CHECKING:  # the config imports this package's dataset facts: no import cycle at run time
    from ssl_kd.config import DataConfig, EvalConfig


@dataclass
class EvalSplits:
    """Datasets of (image [3, S, S], label); `augmented`: the train transform is random;
    `unreadable`: what a pass does with an image it cannot read, and the files it met."""

    train: Dataset
    val: Dataset
    train_labels: Tensor
    val_labels: Tensor
    description: str
    augmented: bool
    unreadable: UnreadableImages = field(default_factory=UnreadableImages)

    @property
    def num_classes(self) -> int:
        return int(max(self.train_labels.max(), self.val_labels.max())) + 1

    @property
    def in_memory(self) -> bool:
        """Tensors already in memory: DataLoader workers would only add overhead."""
        return isinstance(self.train, TensorImages)

    def batches(
        self, split: str, batch_size: int, order: Sequence[int] | None = None,
        num_workers: int = 0,
    ) -> ImageBatches:  # fmt: skip
        """Image batches of the "train" or "val" split; unreadable images as `unreadable`
        says (after a pass, `kept` names the images used)."""
        dataset = self.train if split == "train" else self.val
        return ImageBatches(dataset, batch_size, order, num_workers, self.unreadable, split)


@dataclass
class LabelledFolders:
    """A train and a val ImageFolder, scanned and checked (same classes); transforms unset."""

    train: LabelledImageFolder
    val: LabelledImageFolder
    description: str


def eval_splits(
    data: str | LabelledFolders, img_size: int, *, seed: int = 0, test_fraction: float = 0.2,
    augment: bool = False, unreadable: UnreadableImages | None = None,
) -> EvalSplits:  # fmt: skip
    """A bundled data set's name (`digits`, `cluttered_digits`), an ImageFolder root with
    train/ and val/, or such folders already opened.

    Args:
        augment: random resized crops (and flips, except on digits) for the train split, DINO's
            linear-probe augmentation; the val split is always resized and centre-cropped.
        unreadable: the policy for unreadable images (default: skip, up to 10% of a split).
    """
    policy = unreadable or UnreadableImages()
    if is_bundled(data):
        assert isinstance(data, str)
        train_x, train_y, val_x, val_y = bundled_splits(data, seed, test_fraction)
        crop = T.RandomResizedCrop(img_size, scale=(0.5, 1.0), antialias=True) if augment else None
        return EvalSplits(
            TensorImages(train_x, train_y, img_size, crop),
            TensorImages(val_x, val_y, img_size),
            train_y,
            val_y,
            f"{data} (held-out {test_fraction:.0%}, seed {seed})",
            augment,
            policy,
        )
    folders = open_eval_folders(data) if isinstance(data, str) else data
    return _transformed(folders, img_size, augment, policy)


def open_eval_folders(root: str | Path) -> LabelledFolders:
    """Scans ROOT/train and ROOT/val (ImageFolders) and checks that they hold the same classes;
    no image is decoded.

    Raises:
        UserError: a folder is missing, has no class folder or an empty one, or the class
            folders differ (those only in train/ and those only in val/ named).
    """
    root = Path(root)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise UserError(
            f"--data {root}: expected 'digits', 'cluttered_digits' or a folder with train/ and "
            "val/ ImageFolders "
            "(one sub-folder per class in each)"
        )
    return _open_folders(root / "train", root / "val", f"ImageFolder {root}")


def knn_splits(data: DataConfig, eval_cfg: EvalConfig, seed: int) -> EvalSplits | None:
    """The labelled splits a training run scores k-NN on, at data.global_crop_size.

    Returns:
        the bundled split the run held out (`eval_splits(data.name, ...)`); else the ImageFolders
        eval.knn_train_path / eval.knn_val_path when both are set; else None (no labels).
        Unreadable images are skipped or stop the run as data.on_error says.

    Raises:
        ConfigError: a k-NN folder is missing, has no class sub-folders, or holds images at
            its top level (they would have no label).
        UserError: the two folders' classes differ (named).
    """
    size = data.global_crop_size
    if is_bundled(data.name):
        return eval_splits(data.name, size, seed=seed, test_fraction=data.test_fraction)
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
    policy = UnreadableImages(
        data.on_error, data.max_bad_fraction, "data.on_error=skip", "data.max_bad_fraction"
    )
    opened = _open_folders(train, val, f"ImageFolders {train} and {val}")
    return _transformed(opened, size, False, policy)


def _open_folders(train_root: Path, val_root: Path, name: str) -> LabelledFolders:
    try:
        train = LabelledImageFolder(train_root)
        val = LabelledImageFolder(val_root)
    except FileNotFoundError as err:  # no class folder, or a class folder without images
        raise UserError(f"{name}: {err}") from None
    if train.classes != val.classes:  # labels are class indices: they must mean the same
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UserError(
            f"{name}: the train and val folders must hold the same class folders (labels are "
            f"class indices): only in {train_root}: {key_list(only_train)}; only in "
            f"{val_root}: {key_list(only_val)}"
        )
    return LabelledFolders(train, val, f"{name} ({len(train.classes)} classes)")


def _transformed(
    folders: LabelledFolders, img_size: int, augment: bool, unreadable: UnreadableImages
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
    folders.train.transform = train_transform
    folders.val.transform = eval_transform(img_size)
    return EvalSplits(
        folders.train,
        folders.val,
        torch.tensor(folders.train.targets),
        torch.tensor(folders.val.targets),
        folders.description,
        augment,
        unreadable,
    )


@dataclass
class ValSplit:
    """One labelled split: (image [3, S, S], label) items, their labels [N], and the policy for
    unreadable images."""

    dataset: Dataset
    labels: Tensor
    description: str
    unreadable: UnreadableImages = field(default_factory=UnreadableImages)

    def batches(self, batch_size: int, num_workers: int = 0) -> ImageBatches:
        return ImageBatches(self.dataset, batch_size, None, num_workers, self.unreadable, "val")


def val_split(data: DataConfig, eval_cfg: EvalConfig, seed: int) -> ValSplit | None:
    """The split a training run scores its classifier on, at data.global_crop_size: the bundled
    split the run held out, the ImageFolder eval.val_path (whose class folders must be those of
    data.path: labels are class indices), or None (no eval.val_path).

    Raises:
        ConfigError: eval.val_path is not a labelled ImageFolder.
        UserError: its classes differ from data.path's (named).
    """
    size = data.global_crop_size
    if is_bundled(data.name):
        splits = eval_splits(data.name, size, seed=seed, test_fraction=data.test_fraction)
        return ValSplit(splits.val, splits.val_labels, splits.description)
    if not eval_cfg.val_path:
        return None
    folder = Path(eval_cfg.val_path)
    if not folder.is_dir() or not is_image_folder(folder):
        raise ConfigError(
            f"eval.val_path={folder} is not a labelled ImageFolder (one sub-folder per class, "
            "no image at the top)"
        )
    assert data.path is not None
    trained, held_out = (LabelledImageFolder.find_classes_of(p) for p in (data.path, folder))
    if trained != held_out:
        raise UserError(
            f"eval.val_path={folder} must hold the class folders of data.path={data.path} "
            f"(labels are class indices): only in data.path: "
            f"{key_list(sorted(set(trained) - set(held_out)))}; only in eval.val_path: "
            f"{key_list(sorted(set(held_out) - set(trained)))}"
        )
    try:
        val = LabelledImageFolder(folder, eval_transform(size))
    except FileNotFoundError as err:  # a class folder without images
        raise UserError(f"eval.val_path={folder}: {err}") from None
    policy = UnreadableImages(
        data.on_error, data.max_bad_fraction, "data.on_error=skip", "data.max_bad_fraction"
    )
    return ValSplit(val, torch.tensor(val.targets), f"ImageFolder {folder}", policy)
