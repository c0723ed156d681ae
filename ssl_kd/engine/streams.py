"""Training batches per epoch, resumable at any batch.

A stream yields lists of views `[global_0, global_1, local_0, ...]`, each [B, C, H, W]. Which
images form a batch depends only on (seed, epoch, batch index), so a resumed run sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from lightly.transforms import DINOTransform, MAETransform
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ssl_kd.config import Config
from ssl_kd.data import (
    BatchedMultiCrop,
    DataError,
    EpochPermutation,
    MultiCropSpec,
    SeededSamples,
    batches_per_epoch,
    digits,
    image_dataset,
    step_generator,
)


class TensorMultiCropStream:
    """In-memory images [N, 3, H, W], multi-cropped a whole batch at a time."""

    def __init__(
        self, images: Tensor, spec: MultiCropSpec, batch_size: int, seed: int, rank: int = 0,
        world_size: int = 1, num_views: int | None = None,
    ) -> None:  # fmt: skip
        self.images = images
        self.num_views = num_views  # keep only the first views (MAE: 1)
        self.crop = BatchedMultiCrop(spec)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = batches_per_epoch(len(images), batch_size, world_size)
        self.bad_files: set[str] = set()  # in-memory images are never unreadable

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[list[Tensor]]:
        order = EpochPermutation(
            len(self.images), self.batch_size, self.seed, epoch, start_batch, self.rank,
            self.world_size,
        )  # fmt: skip
        indices = torch.tensor(order.indices, dtype=torch.long).split(self.batch_size)
        for offset, batch_indices in enumerate(indices):
            batch_index = start_batch + offset
            # Augmentation randomness depends on (epoch, batch) only; each rank keeps its rows
            # of the global batch's draws, so a sample's crops do not depend on the world size.
            generator = step_generator(self.seed, (epoch * 1_000_003 + batch_index) * 64)
            views = self.crop(self.images[batch_indices], generator, (self.rank, self.world_size))
            yield views[: self.num_views] if self.num_views else views


class _TensorImages(Dataset):
    """Tensor images in [0, 1] served as PIL images (to run lightly's transforms on them)."""

    def __init__(self, images: Tensor, transform) -> None:  # type: ignore[no-untyped-def]
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        array = (self.images[index].permute(1, 2, 0) * 255).round().byte().numpy()
        return self.transform(Image.fromarray(array)), 0


class LoaderStream:
    """A map-style dataset whose items are lists of views, through a DataLoader.

    Unreadable images are replaced by the next readable one (`SeededSamples`); with
    `on_error="skip"` each is logged once and kept in `bad_files`, with "error" the first one
    stops the run with a `DataError` naming it.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, num_workers: int, rank: int = 0,
        world_size: int = 1, on_error: str = "skip",
    ) -> None:  # fmt: skip
        self.dataset = dataset
        self.samples = SeededSamples(dataset, seed)
        self.on_error = on_error
        self.bad_files: set[str] = set()
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = batches_per_epoch(len(dataset), batch_size, world_size)  # type: ignore[arg-type]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[list[Tensor]]:
        sampler = EpochPermutation(
            len(self.dataset), self.batch_size, self.seed, epoch, start_batch, self.rank,  # type: ignore[arg-type]
            self.world_size,
        )  # fmt: skip
        self.samples.epoch = epoch  # workers get a copy of the dataset when the loader starts
        loader = DataLoader(
            self.samples,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
            persistent_workers=False,
        )
        for views, _labels, bad in loader:
            self._note_bad(bad)
            yield views

    def _note_bad(self, entries: list[str]) -> None:
        for entry in entries:
            for line in filter(None, entry.split("\n")):
                path, _, message = line.partition("\t")
                if self.on_error == "error":
                    raise DataError(
                        f"{message} (data.on_error=error; data.on_error=skip trains on without it)",
                        path,
                    )
                if path not in self.bad_files:
                    self.bad_files.add(path)
                    print(
                        f"skipping unreadable image ({len(self.bad_files)} so far, "
                        f"data.on_error=skip): {message}",
                        file=sys.stderr,
                        flush=True,
                    )


def build_train_stream(
    cfg: Config, rank: int = 0, world_size: int = 1
) -> TensorMultiCropStream | LoaderStream:
    """The training stream the config describes."""
    data = cfg.data
    spec = MultiCropSpec(
        data.global_crop_size,
        data.local_crop_size,
        data.num_local_views,
        tuple(data.global_crop_scale),  # type: ignore[arg-type]
        tuple(data.local_crop_scale),  # type: ignore[arg-type]
        data.hflip_prob,
    )
    batch_size, seed = cfg.train.batch_size, cfg.train.seed
    single_view = cfg.method in ("mae", "dmae")  # MAE: one random resized crop, no multi-crop
    if single_view:
        spec.num_local_views = 0
    if data.transform == "batched":
        if data.name != "digits":
            raise ValueError(
                "data.transform=batched works on in-memory data (data.name=digits); "
                "use data.transform=lightly for image folders"
            )
        images = digits(seed, data.test_fraction)[0]
        stream: TensorMultiCropStream | LoaderStream = TensorMultiCropStream(
            images, spec, batch_size, seed, rank, world_size, num_views=1 if single_view else None
        )
    else:
        transform = (
            MAETransform(data.global_crop_size)
            if single_view
            else DINOTransform(
                global_crop_size=data.global_crop_size,
                global_crop_scale=tuple(data.global_crop_scale),
                local_crop_size=data.local_crop_size,
                local_crop_scale=tuple(data.local_crop_scale),
                n_local_views=data.num_local_views,
                hf_prob=data.hflip_prob,
            )
        )
        if data.name == "digits":
            dataset: Dataset = _TensorImages(digits(seed, data.test_fraction)[0], transform)
        else:
            assert data.path is not None
            dataset = image_dataset(data.path, transform)
        stream = LoaderStream(
            dataset, batch_size, seed, data.num_workers, rank, world_size, data.on_error
        )
    if stream.steps_per_epoch == 0:
        raise ValueError(
            f"train.batch_size={batch_size} (per process) is larger than the dataset's share "
            f"per process ({_dataset_size(stream)} images / {world_size} processes); lower "
            "train.batch_size or use fewer processes"
        )
    return stream


def _dataset_size(stream: TensorMultiCropStream | LoaderStream) -> int:
    if isinstance(stream, TensorMultiCropStream):
        return len(stream.images)
    return len(stream.dataset)  # type: ignore[arg-type]
