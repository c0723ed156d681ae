"""Datasets and multi-crop: ImageFolder or flat folders for real use, the bundled digits for demos.

Two multi-crop paths produce the same thing, a list of views `[global_0, global_1, local_0, ...]`
each `[B, C, H, W]`:
- `lightly`: lightly's `DINOTransform` per image (PIL, in DataLoader workers), for real images;
- `batched`: `BatchedMultiCrop` on a batch tensor at once (random resized crop via one
  `grid_sample`, flips, brightness/contrast jitter), for small in-memory data where per-image PIL
  work would dominate the step.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from torchvision import datasets
from torchvision import transforms as T

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_SIZE = 32


class DataError(ValueError):
    """An unreadable training image; the message names the file."""

    exit_code = 1  # the run failed (not its command line): `ssl-kd` exits 1, not 2

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
        raise DataError(
            f"cannot read image {path}: {err}. Remove or replace the file and restart; "
            "the last checkpoint is kept.",
            path,
        ) from None


class FlatImageFolder(Dataset):
    """Every image file under a folder (recursively), label 0: for unlabelled pretraining."""

    def __init__(self, root: str | Path, transform=None) -> None:  # type: ignore[no-untyped-def]
        self.paths = sorted(
            str(p) for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not self.paths:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        image = load_image(self.paths[index])
        return (self.transform(image) if self.transform else image), 0


def image_dataset(root: str | Path, transform=None) -> Dataset:  # type: ignore[no-untyped-def]
    """ImageFolder if `root` has class sub-folders with images, else a flat image folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path {root} is not a folder")
    has_classes = any(p.is_dir() for p in root.iterdir())
    if has_classes:
        try:
            return datasets.ImageFolder(str(root), transform=transform, loader=load_image)
        except FileNotFoundError as err:  # class folders without a single image
            raise ValueError(f"no images found under {root}: {err}") from None
    return FlatImageFolder(root, transform)


class SeededSamples(Dataset):
    """Wraps a dataset of (image, label): each sample's augmentation is seeded by (seed, epoch,
    index), and an unreadable image is replaced by the next readable one.

    Seeding per sample makes a batch depend only on its indices, not on the DataLoader worker
    that built it or on what ran before, so a run resumed mid-epoch draws the same crops.

    `__getitem__` returns (sample, label, bad) where `bad` names the unreadable files that were
    replaced ("\\n"-joined, "" if none): the main process logs and counts them (workers cannot).
    """

    MAX_CONSECUTIVE_BAD = 16

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[object, int, str]:
        bad: list[str] = []
        size = len(self)
        for hop in range(self.MAX_CONSECUTIVE_BAD):
            candidate = (index + hop) % size
            seed = (self.seed * 100_003 + self.epoch) * 10_000_019 + candidate
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                sample, label = self.dataset[candidate]
            except DataError as err:
                bad.append(f"{err.path}\t{err}")
                continue
            return sample, label, "\n".join(bad)
        first = bad[0].partition("\t")[0]
        raise DataError(
            f"{self.MAX_CONSECUTIVE_BAD} consecutive unreadable images from index {index} "
            f"({first}, ...): is data.path the right folder?",
            first,
        )


def digits(seed: int, test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled 8×8 digits, upsampled to 32×32 RGB in [0, 1].

    Returns:
        train_images [N, 3, 32, 32], train_labels [N], test_images, test_labels; the split is
        stratified and fixed by `seed`.
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


@dataclass
class MultiCropSpec:
    global_crop_size: int
    local_crop_size: int
    num_local_views: int
    global_crop_scale: tuple[float, float]
    local_crop_scale: tuple[float, float]
    hflip_prob: float = 0.5


class BatchedMultiCrop:
    """DINO multi-crop on a whole batch tensor at once.

    Per sample and view: random resized crop (area fraction in `scale`, aspect ratio in
    [3/4, 4/3], as torchvision's RandomResizedCrop), horizontal flip, brightness and contrast
    jitter (p = 0.8), then normalisation. One `affine_grid` + `grid_sample` per view group.

    With `shard=(rank, world_size)` the random draws are made for the global batch of
    `world_size × B` samples and this rank keeps rows rank, rank + world_size, ...: the rows
    `EpochPermutation` gives it. A sample is then augmented the same way whether the batch is
    split over ranks or not.
    """

    def __init__(
        self,
        spec: MultiCropSpec,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        jitter_prob: float = 0.8,
        aspect: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.spec = spec
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.jitter_prob = jitter_prob
        self.aspect = aspect

    def __call__(
        self, images: Tensor, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
    ) -> list[Tensor]:
        """images: [B, 3, H, W] in [0, 1] → [2 global views, num_local_views local views]."""
        spec = self.spec
        views = [
            self._crop(images, spec.global_crop_size, spec.global_crop_scale, generator, shard)
            for _ in range(2)
        ]
        views += [
            self._crop(images, spec.local_crop_size, spec.local_crop_scale, generator, shard)
            for _ in range(spec.num_local_views)
        ]
        return views

    def _crop(
        self,
        images: Tensor,
        size: int,
        scale: tuple[float, float],
        generator: torch.Generator,
        shard: tuple[int, int],
    ) -> Tensor:
        batch = images.shape[0]
        rank, world_size = shard

        def rand() -> Tensor:  # [B]: this rank's rows of a draw for the global batch
            return torch.rand(batch * world_size, generator=generator)[rank::world_size]

        def uniform(low: float, high: float) -> Tensor:
            return rand() * (high - low) + low

        area = uniform(*scale)
        log_ratio = uniform(math.log(self.aspect[0]), math.log(self.aspect[1]))
        width = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)  # fraction of the side
        height = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
        centre_x = (rand() * 2 - 1) * (1 - width)
        centre_y = (rand() * 2 - 1) * (1 - height)
        flip = torch.where(rand() < self.spec.hflip_prob, -1.0, 1.0)
        theta = torch.zeros(batch, 2, 3)
        theta[:, 0, 0] = width * flip
        theta[:, 0, 2] = centre_x
        theta[:, 1, 1] = height
        theta[:, 1, 2] = centre_y
        grid = F.affine_grid(theta, [batch, 3, size, size], align_corners=False)
        views = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", align_corners=False)

        jitter = rand() < self.jitter_prob
        brightness = torch.where(jitter, uniform(0.6, 1.4), torch.ones(batch)).view(-1, 1, 1, 1)
        contrast = torch.where(jitter, uniform(0.6, 1.4), torch.ones(batch)).view(-1, 1, 1, 1)
        views = views * brightness
        mean = views.mean(dim=(1, 2, 3), keepdim=True)
        views = ((views - mean) * contrast + mean).clamp(0, 1)
        return (views - self.mean) / self.std


def normalize_images(images: Tensor) -> Tensor:
    """[B, 3, H, W] in [0, 1] → ImageNet-normalised (the eval transform of tensor data)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def to_unit_range(images: Tensor) -> Tensor:
    """ImageNet-normalised [B, 3, H, W] → [0, 1] for display (the inverse of normalize_images)."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def eval_transform(img_size: int) -> T.Compose:
    """Resize (shorter side to size / 0.875) + centre crop + normalise, the k-NN/linear protocol."""
    return T.Compose(
        [
            T.Resize(round(img_size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class EpochPermutation(Sampler[int]):
    """Indices of one epoch, shuffled by (seed, epoch), starting at a given batch (for resume).

    With `num_replicas > 1` each rank takes every num_replicas-th index of the same permutation,
    as DistributedSampler does.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        epoch: int,
        start_batch: int = 0,
        rank: int = 0,
        num_replicas: int = 1,
    ) -> None:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        permutation = torch.randperm(size, generator=generator)
        per_rank = size // num_replicas
        mine = permutation[rank : per_rank * num_replicas : num_replicas]
        usable = (len(mine) // batch_size) * batch_size  # drop_last
        self.indices = mine[start_batch * batch_size : usable].tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def batches_per_epoch(size: int, batch_size: int, num_replicas: int = 1) -> int:
    return (size // num_replicas) // batch_size


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for everything random in one training step; a resumed run draws the same."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# --- temporary, until the data package lands ---
import enum  # noqa: E402


class Views(enum.Enum):
    MULTI_CROP = "multi_crop"
    SINGLE_CROP = "single_crop"


DIGITS_IMAGES = 1797


def check_batch(data, batch_size: int, world_size: int) -> None:  # type: ignore[no-untyped-def]
    from ssl_kd.errors import ConfigError

    if data.name == "digits":
        share = (DIGITS_IMAGES - math.ceil(DIGITS_IMAGES * data.test_fraction)) // world_size
        if share < batch_size:
            raise ConfigError(
                f"train.batch_size={batch_size} (per process) is larger than the data's share per "
                f"process ({share} digits images with WORLD_SIZE={world_size}): lower "
                "train.batch_size or use fewer processes"
            )
