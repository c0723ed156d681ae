"""Training batches per epoch, resumable at any batch.

A stream yields lists of views `[global_0, global_1, local_0, ...]`, each [B, C, H, W]. Which
images form a batch, and how each is cropped, depends only on (seed, epoch, batch index) through
the named random streams of `ssl_kd.seeding` ("order", "sample", "crops"), so a resumed run sees
the same batches as an uninterrupted one.
"""

from __future__ import annotations

import enum
import math
import random
import signal
import sys
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ssl_kd.data.images import DataError
from ssl_kd.data.photometric import BatchedPhotometric, ColorAugmentation
from ssl_kd.data.transforms import BatchedMultiCrop, MultiCropSpec
from ssl_kd.errors import key_list
from ssl_kd.seeding import generator_for, seed_for


class Views(enum.Enum):
    """What a method trains on: views [B, C, H, W] of each image, or images with labels."""

    MULTI_CROP = "multi_crop"  # DINO: 2 global + data.num_local_views local crops
    SINGLE_CROP = "single_crop"  # MAE: one random resized crop of the global size
    # Supervised training and distillation: [images [B, C, H, W], labels [B] (int64)], one
    # augmented view of each image (the method's transform on image folders, a random resized
    # crop with flips and jitter on the bundled data).
    LABELLED = "labelled"


class EpochPermutation(Sampler[int]):
    """Indices of one epoch, shuffled by the stream ("order", epoch), from a given batch on.

    With `num_replicas > 1` each rank takes every num_replicas-th index of the same permutation,
    as DistributedSampler does; the last incomplete batch is dropped.

    `repeats > 1` is DeiT's repeated augmentation (its RASampler): each index of the permutation
    is repeated that many times in a row before the ranks take their share, so the copies of an
    image land on different ranks (and get different crops); each rank still takes size /
    num_replicas indices, so an epoch holds size / repeats distinct images.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, epoch: int, start_batch: int = 0,
        rank: int = 0, num_replicas: int = 1, repeats: int = 1,
    ) -> None:  # fmt: skip
        permutation = torch.randperm(size, generator=generator_for(seed, "order", epoch))
        per_rank = size // num_replicas
        if repeats > 1:
            permutation = permutation.repeat_interleave(repeats)
        mine = permutation[rank : per_rank * num_replicas : num_replicas]
        usable = (len(mine) // batch_size) * batch_size
        self.indices = mine[start_batch * batch_size : usable].tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def batches_per_epoch(size: int, batch_size: int, num_replicas: int = 1) -> int:
    """Full batches each rank gets from `size` samples (the last incomplete one dropped)."""
    return (size // num_replicas) // batch_size


class SeededSamples(Dataset):
    """Wraps a dataset of (image, label): each sample's augmentation is seeded by the stream
    ("sample", epoch, index), and an unreadable image is replaced by the next readable one.

    Seeding per sample makes a batch depend only on its indices, not on the DataLoader worker
    that built it or on what ran before, so a run resumed mid-epoch draws the same crops.

    `__getitem__` returns (sample, label, bad) where `bad` names the unreadable files that were
    replaced ("\\n"-joined, "" if none): the main process logs and counts them (workers cannot).
    The search for a readable replacement gives up after `max_bad + 1` unreadable files in a
    row (they alone are more than the data set may hold) or once every file was tried: the
    sample is then None, and `LoaderStream` stops the run with a message rather than a
    worker's traceback.
    """

    def __init__(self, dataset: Dataset, seed: int, max_bad: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0
        self.max_bad = max_bad
        # index → "path\tmessage" of files this process found unreadable: not read again
        self.known_bad: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[object, int, str]:
        bad: list[str] = []
        size = len(self)
        for hop in range(min(size, self.max_bad + 1)):
            candidate = (index + hop) % size
            if candidate in self.known_bad:
                bad.append(self.known_bad[candidate])
                continue
            # lightly's transforms draw from all three global generators
            seed = seed_for(self.seed, "sample", self.epoch, candidate)
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                sample, label = self.dataset[candidate]
            except DataError as err:
                self.known_bad[candidate] = f"{err.path}\t{err}"
                bad.append(self.known_bad[candidate])
                continue
            return sample, label, "\n".join(bad)
        return None, -1, "\n".join(bad)


def collate_samples(items: list[tuple[object, int, str]]) -> tuple[object, object, list[str]]:
    """torch's default collation of (sample, label, bad) triples; when a sample found no
    readable image, (None, None, the bad lists), for the main process to stop the run."""
    if any(sample is None for sample, _, _ in items):
        return None, None, [bad for _, _, bad in items]
    return default_collate(items)


class TensorMultiCropStream:
    """In-memory images [N, 3, H, W], multi-cropped a whole batch at a time; with `labels` [N]
    each batch is [its first view, its labels] (`Views.LABELLED`). `colors`: each view's colour
    augmentation (`BatchedMultiCrop`'s default when None)."""

    def __init__(
        self, images: Tensor, spec: MultiCropSpec, batch_size: int, seed: int, rank: int = 0,
        world_size: int = 1, num_views: int | None = None, labels: Tensor | None = None,
        repeats: int = 1, colors: list[ColorAugmentation] | None = None,
    ) -> None:  # fmt: skip
        self.images = images
        self.labels = labels
        self.repeats = repeats  # DeiT's repeated augmentation (`EpochPermutation`)
        self.num_images = len(images)  # with steps_per_epoch, what fixes the data order
        self.num_views = num_views  # keep only the first views (MAE: 1)
        self.crop = BatchedMultiCrop(spec, colors)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = batches_per_epoch(len(images), batch_size, world_size)
        self.bad_files: set[str] = set()  # in-memory images are never unreadable

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[list[Tensor]]:
        """The views of each batch of `epoch` from `start_batch` on."""
        order = EpochPermutation(
            len(self.images), self.batch_size, self.seed, epoch, start_batch, self.rank,
            self.world_size, self.repeats,
        )  # fmt: skip
        indices = torch.tensor(order.indices, dtype=torch.long).split(self.batch_size)
        for offset, batch_indices in enumerate(indices):
            # Crops depend on (epoch, batch) only; each rank keeps its rows of the global
            # batch's draws, so a sample's crops do not depend on the world size.
            generator = generator_for(self.seed, "crops", epoch, start_batch + offset)
            views = self.crop(self.images[batch_indices], generator, (self.rank, self.world_size))
            if self.labels is not None:
                yield [views[0], self.labels[batch_indices]]
            else:
                yield views[: self.num_views] if self.num_views else views


class LoaderStream:
    """A map-style dataset whose items are lists of views, through a DataLoader.

    Unreadable images are replaced by the next readable one (`SeededSamples`); with
    `on_error="skip"` each is logged once and kept in `bad_files`, any number of them until
    they are more than `max_bad_fraction` of the data set; with "error" the first one stops
    the run. Either stop is a `DataError` naming the files. `labelled`: each batch is [images,
    labels] (the dataset's transform gives one tensor per image), else the list of views.
    `photometric`: the dataset gives (uint8 views, their `PhotometricParams`), which it turns
    into the views of each batch, on its device (`data.transform=fast`).
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, num_workers: int, rank: int = 0,
        world_size: int = 1, on_error: str = "skip", max_bad_fraction: float = 0.1,
        labelled: bool = False, repeats: int = 1, photometric: BatchedPhotometric | None = None,
    ) -> None:  # fmt: skip
        self.dataset = dataset
        self.labelled = labelled
        self.photometric = photometric
        self.repeats = repeats  # DeiT's repeated augmentation (`EpochPermutation`)
        self.size: int = len(dataset)  # type: ignore[arg-type]
        self.max_bad_fraction = max_bad_fraction
        self.max_bad = math.floor(max_bad_fraction * self.size)  # more stops the run
        self.samples = SeededSamples(dataset, seed, self.max_bad)
        self.on_error = on_error
        self.bad_files: set[str] = set()
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.num_images: int = len(dataset)  # type: ignore[arg-type]
        self.steps_per_epoch = batches_per_epoch(self.num_images, batch_size, world_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[list[Tensor]]:
        """The views of each batch of `epoch` from `start_batch` on."""
        sampler = EpochPermutation(
            len(self.dataset), self.batch_size, self.seed, epoch, start_batch, self.rank,  # type: ignore[arg-type]
            self.world_size, self.repeats,
        )  # fmt: skip
        self.samples.epoch = epoch  # workers get a copy of the dataset when the loader starts
        loader = DataLoader(
            self.samples, batch_size=self.batch_size, sampler=sampler,
            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(), drop_last=True,
            persistent_workers=False, collate_fn=collate_samples,
            worker_init_fn=_leave_sigterm_to_the_trainer,
        )  # fmt: skip
        for views, labels, bad in loader:
            self._note_bad(bad)
            if views is None:  # only reached when data.max_bad_fraction=1 lets every file fail
                raise DataError(
                    f"no readable image in the data set: all {self.size} files tried are "
                    f"unreadable ({key_list(sorted(self.bad_files), 3)})",
                    min(self.bad_files, default=""),
                )
            if self.photometric is not None:
                views = self.photometric(*views)
            yield [views, labels] if self.labelled else views

    def _note_bad(self, entries: list[str]) -> None:
        for entry in entries:
            for line in filter(None, entry.split("\n")):
                path, _, message = line.partition("\t")
                if self.on_error == "error":
                    raise DataError(
                        f"{message} (data.on_error=error; data.on_error=skip trains on without "
                        "it). Remove or replace the file and run the same command again: it "
                        "resumes from the last checkpoint",
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
        self._check_bad_fraction()

    def _check_bad_fraction(self) -> None:
        count = len(self.bad_files)
        if count <= self.max_bad:
            return
        listed = key_list(sorted(self.bad_files), 3)
        raise DataError(
            f"{count} of the {self.size} images are unreadable ({count / self.size:.1%}), more "
            f"than data.max_bad_fraction={self.max_bad_fraction}: {listed}. Is data.path the "
            "right folder, or a copy cut short? To train on without them, rerun with "
            "data.max_bad_fraction raised: the run resumes from its last checkpoint, kept",
            min(self.bad_files),
        )


def _leave_sigterm_to_the_trainer(worker_id: int) -> None:
    """Slurm signals every process of a job step, workers included: a worker killed by SIGTERM
    would fail the trainer's next batch before its final save (engine/stop.py). Workers ignore
    it and end when the loader shuts them down, or within seconds of the trainer's exit."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
