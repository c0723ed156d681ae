"""Image batches of an evaluation split, in a given order, with unreadable images left out.

Evaluation reads every image once per pass and must keep each feature beside its label, so an
unreadable image is not replaced by the next one (as in training, streams.py) but left out of
the pass: `ImageBatches.kept` says which dataset indices the batches hold. The policy is
`UnreadableImages`: skip and list each file (the default, as in training), or stop at the first.
DataLoader workers hand the failure back as data, so the main process raises it in one line:
never a worker's traceback.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate
from tqdm import tqdm

from ssl_kd.data.images import DataError
from ssl_kd.errors import key_list

ON_ERROR = ("skip", "error")


@dataclass
class UnreadableImages:
    """What evaluation does with an image it cannot read, and the files it met.

    Attributes:
        on_error: "skip" leaves the image out of its split (listed in `files`, named on stderr
            once); "error" stops at it (a `DataError` naming the file, exit 1 from `ssl-kd`).
        max_fraction: skipping stops once more than this fraction of a split is unreadable:
            the wrong folder, or a copy cut short, rather than a few bad files.
        skip_setting, fraction_setting: how the user sets both, for messages (`--on-error
            skip`, `--max-bad-fraction` for `ssl-kd eval`; the data.* keys in training).
        files: split name → {path: why it is unreadable}, in the order met.
    """

    on_error: str = "skip"
    max_fraction: float = 0.1
    skip_setting: str = "--on-error skip"
    fraction_setting: str = "--max-bad-fraction"
    files: dict[str, dict[str, str]] = field(default_factory=dict)

    def note(self, split: str, size: int, failures: list[tuple[str, str]]) -> None:
        """Records (path, message) failures met in `split` (`size` images).

        Raises:
            DataError: on_error is "error", or more than max_fraction of the split is unreadable.
        """
        seen = self.files.setdefault(split, {})
        for path, message in failures:
            if self.on_error == "error":
                raise DataError(
                    f"{message} ({split} split; {self.skip_setting} leaves it out and lists it)",
                    path,
                )
            if path in seen:
                continue
            seen[path] = message
            tqdm.write(  # printed above a progress bar, not through it
                f"skipping unreadable image ({len(seen)} so far in the {split} split, "
                f"{self.skip_setting}): {message}",
                file=sys.stderr,
            )
        if len(seen) > math.floor(self.max_fraction * size):
            raise DataError(
                f"{len(seen)} of the {size} images of the {split} split are unreadable "
                f"({len(seen) / size:.1%}), more than {self.fraction_setting} "
                f"{self.max_fraction}: {key_list(list(seen), 3)}. Is it the right folder, or a "
                f"copy cut short? Raise {self.fraction_setting} to evaluate without them",
                next(iter(seen)),
            )

    def count(self, split: str) -> int:
        return len(self.files.get(split, {}))


class _ReadOrReport(Dataset):
    """(image, index, None) of the wrapped dataset, or (None, index, (path, message)) when the
    image cannot be read: the failure travels back from a worker as data."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[object, int, tuple[str, str] | None]:
        try:
            image, _label = self.dataset[index]
        except DataError as err:
            return None, index, (err.path, str(err))
        return image, index, None


def _collate(
    items: list[tuple[object, int, tuple[str, str] | None]],
) -> tuple[Tensor | None, Tensor, list[tuple[str, str]]]:
    """(images of the readable items or None, their indices [B'], the failures)."""
    readable = [(image, index) for image, index, _ in items if image is not None]
    images = default_collate([image for image, _ in readable]) if readable else None
    indices = torch.tensor([index for _, index in readable], dtype=torch.long)
    return images, indices, [failure for _, _, failure in items if failure is not None]


class ImageBatches:
    """Image batches [B, C, H, W] of a dataset in a given order, labels dropped, unreadable
    images left out as `unreadable` says (default: stop at the first); has a length (the number
    of batches) for progress bars. After a pass, `kept` holds the dataset indices of the images
    it yielded, in order: the rows of the labels that go with them."""

    def __init__(
        self, dataset: Dataset, batch_size: int, order: Sequence[int] | None, num_workers: int,
        unreadable: UnreadableImages | None = None, split: str = "data",
    ) -> None:  # fmt: skip
        self.size: int = len(dataset)  # type: ignore[arg-type]
        indices = list(range(self.size)) if order is None else list(order)
        self.requested = len(indices)
        batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        self.loader = DataLoader(
            _ReadOrReport(dataset), batch_sampler=batches, num_workers=num_workers,
            collate_fn=_collate,
        )  # fmt: skip
        self.unreadable = unreadable or UnreadableImages(on_error="error")
        self.split = split
        self.kept: list[int] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tensor]:
        for images, _indices in self.with_indices():
            yield images

    def with_indices(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(images [B', C, H, W], their dataset indices [B']) of each batch, B' ≤ B."""
        self.kept = []
        for images, indices, failures in self.loader:
            self.unreadable.note(self.split, self.size, failures)
            if images is None:  # every image of this batch was unreadable
                continue
            self.kept += indices.tolist()
            yield images, indices
        if not self.kept and self.requested:
            raise DataError(f"no readable image in the {self.split} split", "")


def image_batches(
    dataset: Dataset, batch_size: int, order: Sequence[int] | None = None, num_workers: int = 0
) -> ImageBatches:
    """Image batches [B, C, H, W] in `order` (default: dataset order), labels dropped; an
    unreadable image stops the pass (a `DataError` naming it)."""
    return ImageBatches(dataset, batch_size, order, num_workers)
