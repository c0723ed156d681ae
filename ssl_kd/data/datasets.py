"""Image datasets: ImageFolder or flat folders for real use, the bundled digits for demos.

Every dataset yields (image, label); a flat folder has no classes and labels every image 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T

from ssl_kd.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_kd.errors import RunFailed, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DIGITS_IMAGES = 1797  # scikit-learn's load_digits
DIGITS_SIZE = 32


class DataError(RunFailed, ValueError):
    """An unreadable training image; the message names the file, `path` holds it.

    A `RunFailed`: exit status 1, the run failed, not its command line. Also a ValueError, as
    before, because `ssl-kd`'s error handler catches ValueError (and not yet UserError).
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


def load_image(path: str) -> Image.Image:
    """Opens an image as RGB; a corrupt file raises a DataError that names it."""
    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}", path) from None


class FlatImageFolder(Dataset):
    """Every image file under a folder (recursively), label 0: for unlabelled pretraining."""

    def __init__(self, root: str | Path, transform: Callable | None = None) -> None:
        self.paths = sorted(
            str(p) for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not self.paths:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[object, int]:
        image = load_image(self.paths[index])
        return (self.transform(image) if self.transform else image), 0


def has_class_folders(root: str | Path) -> bool:
    """Whether `root` has sub-folders, read as one class each (the ImageFolder layout)."""
    return any(p.is_dir() for p in Path(root).iterdir())


def image_dataset(root: str | Path, transform: Callable | None = None) -> Dataset:
    """ImageFolder if `root` has class sub-folders with images, else a flat image folder."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data.path {root} is not a folder")
    if has_class_folders(root):
        try:
            return datasets.ImageFolder(str(root), transform=transform, loader=load_image)
        except FileNotFoundError as err:  # class folders without a single image
            raise UserError(f"no images found under {root}: {err}") from None
    return FlatImageFolder(root, transform)


def digits_train_size(test_fraction: float) -> int:
    """Training images of the bundled digits split (1797 images, test part rounded up, as
    scikit-learn's train_test_split rounds it)."""
    return DIGITS_IMAGES - math.ceil(DIGITS_IMAGES * test_fraction)


def digits(seed: int, test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled 8×8 digits, upsampled to 32×32 RGB in [0, 1].

    Returns:
        train_images [N, 3, 32, 32], train_labels [N], test_images [M, 3, 32, 32],
        test_labels [M]; the split is stratified and fixed by `seed`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div(16.0).unsqueeze(1)  # [N, 1, 8, 8]
    images = F.interpolate(images, size=DIGITS_SIZE, mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target).long()
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=test_fraction,
        random_state=seed,
        stratify=labels.numpy(),
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


class TensorImages(Dataset):
    """In-memory labelled images [N, 3, H, W] in [0, 1] → (normalised [3, S, S], label).

    Images of another size are resized once, bilinearly, to S = `size`; `augment` (e.g. a
    random resized crop) runs per item before normalisation.
    """

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


class TensorImagesAsPIL(Dataset):
    """In-memory images [N, 3, H, W] in [0, 1] served as PIL images through `transform`, label
    0: runs lightly's per-image transforms on the digits."""

    def __init__(self, images: Tensor, transform: Callable) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[object, int]:
        array = (self.images[index].permute(1, 2, 0) * 255).round().byte().numpy()
        return self.transform(Image.fromarray(array)), 0
