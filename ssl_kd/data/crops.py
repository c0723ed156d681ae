"""Random resized crops as torchvision's RandomResizedCrop draws them, and the DataLoader
workers' half of `data.transform=fast`: decode, crop, flip, nothing else.

`sample_crop_boxes` is RandomResizedCrop's rule for many crops at once: an area fraction ~
U(scale) and a log aspect ratio ~ U(log 3/4, log 4/3); a box that does not fit the image is
drawn again, up to 10 attempts, then the fallback (the whole image, or its centre at the
nearest allowed ratio). `BatchedMultiCrop` (in-memory batches) and `WorkerCrops` (image files)
both use it.

`WorkerCrops` leaves every photometric op to the training process (`BatchedPhotometric`): it
returns uint8 views and the photometric parameters it drew for them, so that all of a sample's
randomness still comes from its worker's per-sample seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ssl_kd.data.images import decode_image, is_draftable, open_image
from ssl_kd.data.photometric import (
    DINO_GLOBAL_1,
    DINO_GLOBAL_2,
    DINO_LOCAL,
    NO_COLOR,
    ColorAugmentation,
    PhotometricParams,
    sample_photometric,
)

ASPECT_RATIO = (3 / 4, 4 / 3)  # width / height
ATTEMPTS = 10  # RandomResizedCrop's draws before its fallback
DRAFT_FACTORS = (8, 4, 2)  # the reductions libjpeg's scaled IDCT offers
MAE_CROP_SCALE = (0.2, 1.0)  # MAE's RandomResizedCrop (lightly's MAETransform: min_scale 0.2)


def sample_crop_boxes(
    height: int, width: int, count: int, scale: tuple[float, float],
    ratio: tuple[float, float] = ASPECT_RATIO, generator: torch.Generator | None = None,
) -> Tensor:  # fmt: skip
    """`count` crop boxes of a height × width image → [count, 4] int64 (top, left, height,
    width), each drawn as RandomResizedCrop.get_params draws one."""

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low

    target_area = height * width * uniform(*scale, count, ATTEMPTS)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1]), count, ATTEMPTS))
    widths = torch.sqrt(target_area * aspect).round()  # half to even, as Python's round
    heights = torch.sqrt(target_area / aspect).round()
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    first = fits.byte().argmax(dim=1, keepdim=True)  # the first attempt that fits
    crop_w = widths.gather(1, first).squeeze(1)
    crop_h = heights.gather(1, first).squeeze(1)
    top = torch.rand(count, generator=generator, dtype=torch.float64) * (height - crop_h + 1)
    left = torch.rand(count, generator=generator, dtype=torch.float64) * (width - crop_w + 1)
    boxes = torch.stack([top.floor(), left.floor(), crop_h, crop_w], dim=1).long()
    fallback = ~fits.any(dim=1)
    if fallback.any():
        boxes[fallback] = torch.tensor(fallback_box(height, width, ratio))
    return boxes


def fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, ...]:
    """RandomResizedCrop's box after 10 misses: the centre of the image at the nearest ratio."""
    if width / height < min(ratio):
        crop_w, crop_h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        crop_w, crop_h = round(height * max(ratio)), height
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def draft_factor(boxes: list[Tensor], sizes: list[int]) -> int:
    """The largest JPEG reduction (8, 4, 2, else 1) that cannot change what a crop sees.

    A crop box of side b resized to S px with b ≥ f·S keeps, after Pillow's antialiased
    resize (its filter widens with the downscale), no detail finer than b / S ≥ f source pixels.
    Decoding at 1/f by the scaled inverse DCT removes only detail finer than f source pixels:
    what the resize would remove anyway. The box is the same region of the photo (its
    coordinates divided by f), and its pixels differ from the full decode's by the difference
    of two low-pass filters (tests/test_fast_pipeline.py bounds it). A crop downscaled less
    than f would lose detail it shows: one decode serves all views of an image, so the factor
    is the one its least downscaled view (the smaller side of its box over its size) allows.
    """
    shrink = min(float(box[:, 2:].min()) / size for box, size in zip(boxes, sizes, strict=True))
    return next((factor for factor in DRAFT_FACTORS if shrink >= factor), 1)


@dataclass(frozen=True)
class ViewGroup:
    """`count` views of `size` px, crops of an area fraction in `scale`, coloured by `color`."""

    size: int
    scale: tuple[float, float]
    count: int
    color: ColorAugmentation


def dino_view_groups(
    global_size: int, local_size: int, num_local: int, global_scale: tuple[float, float],
    local_scale: tuple[float, float],
) -> list[ViewGroup]:  # fmt: skip
    """DINO's views: two global crops (blurred always / rarely and solarized), then locals."""
    return [
        ViewGroup(global_size, global_scale, 1, DINO_GLOBAL_1),
        ViewGroup(global_size, global_scale, 1, DINO_GLOBAL_2),
        ViewGroup(local_size, local_scale, num_local, DINO_LOCAL),
    ][: 3 if num_local else 2]


def mae_view_groups(size: int) -> list[ViewGroup]:
    """MAE's one view: a crop of 20–100% of the image, flipped, normalised, nothing else."""
    return [ViewGroup(size, MAE_CROP_SCALE, 1, NO_COLOR)]


class WorkerCrops:
    """An image file → (uint8 views [3, S, S] per view, their `PhotometricParams`).

    Crops are resized bicubically (DINO's and MAE's interpolation) by Pillow, from the JPEG
    decoded at a reduced size where `draft_factor` allows it (`draft=False`: never). Random
    draws come from torch's global generator, which `SeededSamples` seeds per sample.
    """

    def __init__(self, groups: list[ViewGroup], hflip_prob: float, draft: bool = True) -> None:
        self.groups = groups
        self.hflip_prob = hflip_prob
        self.draft = draft
        self.sizes = [group.size for group in groups for _ in range(group.count)]

    def __call__(self, path: str) -> tuple[list[Tensor], PhotometricParams]:
        with open_image(path) as source:
            if is_draftable(source):  # boxes on the stored grid, before decoding it
                boxes = self.sample_boxes(*source.size)
                factor = draft_factor(boxes, [g.size for g in self.groups]) if self.draft else 1
                image, reduce = decode_image(source, path, factor)
            else:  # the decoded image may be turned (EXIF): boxes on its upright size
                image, reduce = decode_image(source, path)
                boxes = self.sample_boxes(*image.size)
        flips = (torch.rand(len(self.sizes)) < self.hflip_prob).tolist()
        views = [
            self.cut(image, box, size, reduce, flip)
            for box, size, flip in zip(torch.cat(boxes).tolist(), self.sizes, flips, strict=True)
        ]
        params = [sample_photometric(group.color, group.count) for group in self.groups]
        return views, PhotometricParams.cat(params)

    def sample_boxes(self, width: int, height: int) -> list[Tensor]:
        return [sample_crop_boxes(height, width, g.count, g.scale) for g in self.groups]

    @staticmethod
    def cut(image: Image.Image, box: list[int], size: int, reduce: int, flip: bool) -> Tensor:
        """One view: box (top, left, height, width) in full-size pixels → uint8 [3, size, size]."""
        top, left, height, width = box
        if reduce == 1:  # exactly torchvision's resized_crop of a PIL image
            view = image.crop((left, top, left + width, top + height))
            view = view.resize((size, size), Image.Resampling.BICUBIC)
        else:  # the same region of the reduced image, at sub-pixel precision
            region = (left / reduce, top / reduce, (left + width) / reduce, (top + height) / reduce)
            view = image.resize((size, size), Image.Resampling.BICUBIC, box=region)
        if flip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(view)).permute(2, 0, 1)
