"""Image transforms: training crops (multi-crop or one crop) and the evaluation transform.

Three multi-crop paths produce the same thing, a list of views `[global_0, global_1, local_0,
...]` each `[B, C, H, W]` (`data.transform`):
- `lightly`: lightly's `DINOTransform` per image (PIL, in DataLoader workers), for real images;
- `fast`: DINO's augmentation split in two: workers decode and crop (`crops.WorkerCrops`, uint8),
  the training process colours whole batches on its device (`photometric.BatchedPhotometric`);
  on in-memory data, `BatchedMultiCrop` with DINO's colours;
- `batched`: `BatchedMultiCrop` on a batch tensor at once (random resized crops via one
  `grid_sample`, flips, brightness/contrast jitter), for small in-memory data where per-image PIL
  work would dominate the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightly.transforms import DINOTransform, MAETransform
from torch import Tensor
from torchvision import transforms as T

from ssl_kd.data.crops import ASPECT_RATIO, sample_crop_boxes
from ssl_kd.data.photometric import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LIGHT_JITTER,
    ColorAugmentation,
    apply_photometric,
    sample_photometric,
)


@dataclass
class MultiCropSpec:
    """Sizes (px) and area fractions of DINO's crops (arXiv:2104.14294, §3 and appendix)."""

    global_crop_size: int
    local_crop_size: int
    num_local_views: int
    global_crop_scale: tuple[float, float]
    local_crop_scale: tuple[float, float]
    hflip_prob: float = 0.5


def lightly_multi_crop(spec: MultiCropSpec) -> DINOTransform:
    """lightly's DINO multi-crop: PIL image → [2 global views, num_local_views local views]."""
    return DINOTransform(
        global_crop_size=spec.global_crop_size,
        global_crop_scale=spec.global_crop_scale,
        local_crop_size=spec.local_crop_size,
        local_crop_scale=spec.local_crop_scale,
        n_local_views=spec.num_local_views,
        hf_prob=spec.hflip_prob,
    )


def lightly_single_crop(size: int) -> MAETransform:
    """lightly's MAE transform: PIL image → [one random resized crop of `size` px]."""
    return MAETransform(size)


class BatchedMultiCrop:
    """DINO multi-crop on a whole batch tensor at once.

    Per sample and view: a random resized crop drawn as torchvision's RandomResizedCrop draws it
    (`crops.sample_crop_boxes`: area fraction in `scale`, aspect ratio in `aspect`, oversize
    boxes drawn again, then its fallback), horizontal flip, the view's colour augmentation
    (`colors`, one per view; default: brightness and contrast jitter with p = 0.8 on every view;
    `photometric.dino_colors`: DINO's), then normalisation. One `affine_grid` + `grid_sample`
    per view (bilinear, no antialiasing: the bundled images are smaller than most crops).

    With `shard=(rank, world_size)` the random draws are made for the global batch of
    `world_size × B` samples and this rank keeps rows rank, rank + world_size, ...: the rows
    `EpochPermutation` gives it. A sample is then augmented the same way whether the batch is
    split over ranks or not.
    """

    def __init__(
        self,
        spec: MultiCropSpec,
        colors: Sequence[ColorAugmentation] | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        aspect: tuple[float, float] = ASPECT_RATIO,
    ) -> None:
        self.spec = spec
        num_views = 2 + spec.num_local_views
        self.colors = list(colors) if colors is not None else [LIGHT_JITTER] * num_views
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.aspect = aspect

    def __call__(
        self, images: Tensor, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
    ) -> list[Tensor]:
        """images: [B, 3, H, W] in [0, 1] → [2 global views, num_local_views local views]."""
        spec = self.spec
        sizes = [spec.global_crop_size] * 2 + [spec.local_crop_size] * spec.num_local_views
        scales = [spec.global_crop_scale] * 2 + [spec.local_crop_scale] * spec.num_local_views
        return [
            self._view(images, size, scale, color, generator, shard)
            for size, scale, color in zip(sizes, scales, self.colors, strict=False)
        ]

    def _view(
        self, images: Tensor, size: int, scale: tuple[float, float], color: ColorAugmentation,
        generator: torch.Generator, shard: tuple[int, int],
    ) -> Tensor:  # fmt: skip
        batch, _, height, width = images.shape
        rank, world_size = shard
        mine = slice(rank, None, world_size)  # this rank's rows of draws for the global batch
        count = batch * world_size
        boxes = sample_crop_boxes(height, width, count, scale, self.aspect, generator)[mine]
        flip = torch.rand(count, generator=generator)[mine] < self.spec.hflip_prob
        params = sample_photometric(color, count, generator).rows(mine)
        top, left, crop_h, crop_w = boxes.double().unbind(dim=1)
        # The box in grid_sample's coordinates: the image spans [-1, 1] edge to edge.
        theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = torch.where(flip, -crop_w / width, crop_w / width)
        theta[:, 0, 2] = (2 * left + crop_w) / width - 1
        theta[:, 1, 1] = crop_h / height
        theta[:, 1, 2] = (2 * top + crop_h) / height - 1
        grid = F.affine_grid(theta, [batch, 3, size, size], align_corners=False)
        views = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", align_corners=False)
        views = apply_photometric(views.clamp_(0, 1), params)
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


EVAL_CROP_FRACTION = 0.875  # the centre crop's side / the resized shorter side


def eval_transform(img_size: int) -> T.Compose:
    """Resize (shorter side to size / 0.875) + centre crop + normalise, the k-NN/linear protocol."""
    return T.Compose(
        [
            T.Resize(
                round(img_size / EVAL_CROP_FRACTION), interpolation=T.InterpolationMode.BICUBIC
            ),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_preprocessing(img_size: int) -> dict[str, Any]:
    """`eval_transform` in the words of a timm `pretrained_cfg` (what an export's config.json
    tells timm and Hugging Face tools: input size, mean, std, interpolation, centre crop)."""
    return {
        "input_size": (3, img_size, img_size),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bicubic",
        "crop_pct": EVAL_CROP_FRACTION,
        "crop_mode": "center",
    }
