"""Image datasets: ImageFolder or flat folders for real use, the bundled digits for demos.

Every dataset yields (image, label); a flat folder has no classes and labels every image 0.
`data.path` is an ImageFolder only when its top level holds class folders and no image;
anything else is flat: every image at any depth. Names starting with '.' are never data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T

from ssl_kd.data.images import load_image
from ssl_kd.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_kd.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DIGITS_IMAGES = 1797  # scikit-learn's load_digits
DIGITS_SIZE = 32


def is_hidden(name: str) -> bool:
    """`.ipynb_checkpoints`, `.DS_Store`, macOS's `._photo.jpg`: never data, at any depth."""
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    return not is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def find_images(root: str | Path) -> list[str]:
    """Every image file under `root`, at any depth, hidden files and folders skipped; sorted.

    Symlinked folders are followed, as torchvision's ImageFolder follows them.
    """
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [name for name in subfolders if not is_hidden(name)]  # not entered
        found += [os.path.join(folder, name) for name in files if is_image_name(name)]
    return sorted(found)


class FlatImageFolder(Dataset):
    """Every image file under a folder, at any depth, label 0: for unlabelled pretraining.
    `loader` reads a path (default: `load_image`) for `transform`."""

    def __init__(
        self, root: str | Path, transform: Callable | None = None, loader: Callable = load_image
    ) -> None:
        root = os.path.normpath(root)
        self.loader = loader
        self.paths = find_images(root)
        if not self.paths:
            raise UserError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root} (names "
                "starting with '.' are ignored)"
            )
        self.transform = transform
        top = sum(os.path.dirname(path) == root for path in self.paths)
        self.description = (
            f"flat folder, {len(self.paths)} images ({top} at the top, "
            f"{len(self.paths) - top} in sub-folders)"
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[object, int]:
        image = self.loader(self.paths[index])
        return (self.transform(image) if self.transform else image), 0


class LabelledImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder (one sub-folder per class) without hidden entries: no
    `.ipynb_checkpoints` class, no `._photo.jpg` image; images read by `loader` (default:
    `load_image`)."""

    def __init__(
        self, root: str | Path, transform: Callable | None = None, loader: Callable = load_image
    ) -> None:
        root = os.path.normpath(root)
        hidden_part = os.sep + "."  # a hidden file, or anything inside a hidden folder

        def is_valid_file(path: str) -> bool:
            return is_image_name(path) and hidden_part not in path[len(root) :]

        super().__init__(root, transform, loader=loader, is_valid_file=is_valid_file)
        self.description = f"ImageFolder, {len(self.classes)} classes, {len(self.samples)} images"

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = self.find_classes_of(directory)
        if not classes:
            raise FileNotFoundError(f"no class folder in {directory}")
        return classes, {name: index for index, name in enumerate(classes)}

    @staticmethod
    def find_classes_of(directory: str | Path) -> list[str]:
        """The class folders' names, sorted (their indices are the labels); hidden ones left out."""
        return sorted(
            entry.name
            for entry in os.scandir(directory)
            if entry.is_dir() and not is_hidden(entry.name)
        )


def has_class_folders(root: str | Path) -> bool:
    """Whether `root` has (non-hidden) sub-folders, read as one class each by ImageFolder."""
    return any(entry.is_dir() and not is_hidden(entry.name) for entry in os.scandir(root))


def is_image_folder(root: str | Path) -> bool:
    """The ImageFolder layout: class sub-folders and no image at the top level. A folder with
    images at its top is flat, whatever sub-folders it also has (a `backup/`, `thumbs/`)."""
    entries = [entry for entry in os.scandir(root) if not is_hidden(entry.name)]
    has_images = any(entry.is_file() and is_image_name(entry.name) for entry in entries)
    return not has_images and any(entry.is_dir() for entry in entries)


def image_dataset(
    root: str | Path, transform: Callable | None = None, loader: Callable = load_image
) -> LabelledImageFolder | FlatImageFolder:
    """An ImageFolder (labels from class folders) when `root` holds class folders and no image
    at its top level; else every image at any depth, unlabelled. Hidden entries are ignored.

    The dataset's `description` says which, with the counts.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data.path {root} is not a folder")
    if is_image_folder(root):
        try:
            return LabelledImageFolder(root, transform, loader)
        except FileNotFoundError as err:  # class folders without a single image
            raise UserError(
                f"no images found under {root}, read as an ImageFolder (class sub-folders and "
                f"no image at the top): {err}"
            ) from None
    return FlatImageFolder(root, transform, loader)


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

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div(16.0).unsqueeze(1)  # [N, 1, 8, 8]
    images = F.interpolate(images, size=DIGITS_SIZE, mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target).long()
    train_idx, test_idx = stratified_split(labels, seed, test_fraction)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def stratified_split(labels: Tensor, seed: int, test_fraction: float) -> tuple[Tensor, Tensor]:
    """(train indices, test indices) of a stratified split fixed by `seed`, the test part rounded
    up (scikit-learn's train_test_split): the one split rule of the bundled data sets."""
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=test_fraction,
        random_state=seed,
        stratify=labels.numpy(),
    )
    return torch.from_numpy(train_idx), torch.from_numpy(test_idx)


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
    """In-memory images [N, 3, H, W] in [0, 1] served as PIL images through `transform`, with
    their `labels` (default: label 0): runs per-image transforms (lightly's, timm's) on the
    bundled data."""

    def __init__(self, images: Tensor, transform: Callable, labels: Tensor | None = None) -> None:
        self.images = images
        self.transform = transform
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[object, int]:
        array = (self.images[index].permute(1, 2, 0) * 255).round().byte().numpy()
        label = 0 if self.labels is None else int(self.labels[index])
        return self.transform(Image.fromarray(array)), label
