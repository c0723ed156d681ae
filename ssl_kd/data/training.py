"""The training stream a run's `data` section describes: which data, which crops, checked.

`build_train_stream` picks the stream (`streams.TensorMultiCropStream` for the bundled data,
`streams.LoaderStream` for image folders) and the transform (`data.transform`: lightly, fast or
batched) for the views a method trains on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from timm.data import create_transform
from torch.utils.data import Dataset

from ssl_kd.data.bundled import NUM_CLASSES, bundled_splits, is_bundled
from ssl_kd.data.crops import MAE_CROP_SCALE, WorkerCrops, dino_view_groups, mae_view_groups
from ssl_kd.data.datasets import (
    LabelledImageFolder,
    TensorImagesAsPIL,
    digits_train_size,
    image_dataset,
    is_image_folder,
)
from ssl_kd.data.photometric import NO_COLOR, BatchedPhotometric, dino_colors
from ssl_kd.data.streams import LoaderStream, TensorMultiCropStream, Views
from ssl_kd.data.transforms import MultiCropSpec, lightly_multi_crop, lightly_single_crop
from ssl_kd.errors import ConfigError

if TYPE_CHECKING:  # the config imports this package's dataset facts: no import cycle at run time
    from ssl_kd.config import DataConfig


def check_batch(data: DataConfig, batch_size: int, world_size: int) -> None:
    """Raises a ConfigError when a process's share of the bundled data holds less than one
    batch.

    (The size of an image folder is only known once it is scanned: `build_train_stream` checks.)
    """
    if not is_bundled(data.name):
        return
    share = digits_train_size(data.test_fraction) // world_size
    if share < batch_size:
        raise ConfigError(
            f"train.batch_size={batch_size} (per process) is larger than the data's share per "
            f"process ({share} {data.name} images with WORLD_SIZE={world_size}): lower "
            "train.batch_size or use fewer processes"
        )


def build_train_stream(
    data: DataConfig, views: Views, batch_size: int, seed: int, rank: int = 0,
    world_size: int = 1, transform: Callable | None = None,
    device: torch.device | str = "cpu",
) -> TensorMultiCropStream | LoaderStream:  # fmt: skip
    """The training stream `data` describes, yielding `views` of `batch_size` images per rank.

    `transform`: the per-image (PIL) transform of labelled views with data.transform=lightly
    (the method's augmentation; default: timm's `create_transform` for training). `device`:
    where data.transform=fast colours an image folder's views (the training device).

    Raises:
        ConfigError: batched crops on an image folder, fast crops of labelled views, labelled
            views of a folder without class folders, or fewer images per rank than a batch.
    """
    spec = MultiCropSpec(
        data.global_crop_size, data.local_crop_size, data.num_local_views,
        tuple(data.global_crop_scale), tuple(data.local_crop_scale),  # type: ignore[arg-type]
        data.hflip_prob,
    )  # fmt: skip
    single_crop = views is not Views.MULTI_CROP
    labelled = views is Views.LABELLED
    if single_crop:
        spec.num_local_views = 0
    fast = data.transform == "fast"
    if fast and labelled:
        raise ConfigError(
            "data.transform=fast makes DINO's and MAE's views; supervised training and "
            "distillation take the method's own augmentation: use data.transform=lightly (image "
            "folders) or batched (bundled data)"
        )
    stream: TensorMultiCropStream | LoaderStream
    if data.transform == "batched" or (fast and is_bundled(data.name)):
        if not is_bundled(data.name):
            raise ConfigError(
                "data.transform=batched works on in-memory data (data.name=digits or "
                "cluttered_digits); use data.transform=lightly or fast for image folders"
            )
        colors = None  # batched: brightness and contrast jitter
        if fast and single_crop:  # MAE's crop, no colour
            spec.global_crop_scale, colors = MAE_CROP_SCALE, [NO_COLOR] * 2
        elif fast:
            colors = dino_colors(spec.num_local_views)
        images, labels, _, _ = bundled_splits(data.name, seed, data.test_fraction)
        stream = TensorMultiCropStream(
            images, spec, batch_size, seed, rank, world_size,
            num_views=1 if single_crop else None, labels=labels if labelled else None,
            repeats=data.repeated_augmentation, colors=colors,
        )  # fmt: skip
        size = len(images)
    elif fast:
        assert data.path is not None
        groups = (
            mae_view_groups(spec.global_crop_size) if single_crop else dino_view_groups(
                spec.global_crop_size, spec.local_crop_size, spec.num_local_views,
                spec.global_crop_scale, spec.local_crop_scale,
            )
        )  # fmt: skip
        folder = image_dataset(data.path, WorkerCrops(groups, spec.hflip_prob), keep_path)
        if rank == 0:
            print(f"data.path {data.path}: {folder.description}", flush=True)
        stream = LoaderStream(
            folder, batch_size, seed, data.num_workers, rank, world_size, data.on_error,
            data.max_bad_fraction, repeats=data.repeated_augmentation,
            photometric=BatchedPhotometric(device),
        )  # fmt: skip
        size = len(folder)
    else:
        if labelled:
            transform = transform or create_transform(data.global_crop_size, is_training=True)
        elif single_crop:
            transform = lightly_single_crop(data.global_crop_size)
        else:
            transform = lightly_multi_crop(spec)
        if is_bundled(data.name):
            images, labels, _, _ = bundled_splits(data.name, seed, data.test_fraction)
            dataset: Dataset = TensorImagesAsPIL(images, transform, labels if labelled else None)
        else:
            assert data.path is not None
            dataset = folder = image_dataset(data.path, transform)
            if labelled and not isinstance(folder, LabelledImageFolder):
                raise ConfigError(
                    f"data.path={data.path} is a flat folder ({folder.description}): supervised "
                    "training needs labels, one sub-folder per class (the ImageFolder layout)"
                )
            if rank == 0:  # once per run, not per rank or DataLoader worker
                print(f"data.path {data.path}: {folder.description}", flush=True)
        stream = LoaderStream(
            dataset, batch_size, seed, data.num_workers, rank, world_size, data.on_error,
            data.max_bad_fraction, labelled, data.repeated_augmentation,
        )  # fmt: skip
        size = len(dataset)  # type: ignore[arg-type]
    if stream.steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={batch_size} (per process) is larger than the dataset's share "
            f"per process ({size} images / {world_size} processes); lower "
            "train.batch_size or use fewer processes"
        )
    return stream


def keep_path(path: str) -> str:
    """The loader of `data.transform=fast`: `WorkerCrops` opens the file itself."""
    return path


def labelled_classes(data: DataConfig) -> int:
    """The number of classes of the training data: 10 for the bundled digits, the class
    sub-folders of an ImageFolder.

    Raises:
        ConfigError: data.path is not an ImageFolder (no class sub-folders, or images at its top).
    """
    if is_bundled(data.name):
        return NUM_CLASSES
    assert data.path is not None
    if not is_image_folder(data.path):
        raise ConfigError(
            f"data.path={data.path} holds no labelled images: supervised training needs one "
            "sub-folder per class and no image at the top (the ImageFolder layout)"
        )
    return len(LabelledImageFolder.find_classes_of(data.path))
