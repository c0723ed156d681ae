"""Labelled train/val splits for evaluation: the bundled digits or an ImageFolder root.

An ImageFolder root holds `train/` and `val/`, each with one sub-folder per class (the layout of
ImageNet's usual copy). The digits split is the one the training run held out (same seed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision import transforms as T

from ssl_kd.data import IMAGENET_MEAN, IMAGENET_STD, digits, eval_transform, load_image


class TensorImages(Dataset):
    """In-memory images [N, 3, H, W] in [0, 1] → (normalised [3, S, S], label)."""

    def __init__(
        self, images: Tensor, labels: Tensor, size: int, augment: Callable | None = None
    ) -> None:
        if images.shape[-1] != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        self.images, self.labels, self.augment = images, labels, augment
        self.normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        return self.normalize(image), int(self.labels[index])


@dataclass
class EvalSplits:
    """Datasets of (image, label); `augmented`: the train transform is random."""

    train: Dataset
    val: Dataset
    train_labels: Tensor
    val_labels: Tensor
    description: str
    augmented: bool

    @property
    def num_classes(self) -> int:
        return int(max(self.train_labels.max(), self.val_labels.max())) + 1


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
        raise FileNotFoundError(
            f"--data {root}: expected 'digits' or a folder with train/ and val/ ImageFolders "
            "(one sub-folder per class in each)"
        )
    train_transform = eval_transform(img_size)
    if augment:
        train_transform = T.Compose(
            [
                T.RandomResizedCrop(img_size),
                T.RandomHorizontalFlip(),
                *train_transform.transforms[2:],
            ]
        )
    train = datasets.ImageFolder(str(root / "train"), train_transform, loader=load_image)
    val = datasets.ImageFolder(str(root / "val"), eval_transform(img_size), loader=load_image)
    if train.classes != val.classes:
        raise ValueError(f"{root}: train/ and val/ have different class folders")
    return EvalSplits(
        train,
        val,
        torch.tensor(train.targets),
        torch.tensor(val.targets),
        f"ImageFolder {root} ({len(train.classes)} classes)",
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
