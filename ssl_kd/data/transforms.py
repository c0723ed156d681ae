"""Image transforms: training crops (multi-crop or one crop) and the evaluation transform.

Two multi-crop paths produce the same thing, a list of views `[global_0, global_1, local_0, ...]`
each `[B, C, H, W]`:
- `lightly`: lightly's `DINOTransform` per image (PIL, in DataLoader workers), for real images;
- `batched`: `BatchedMultiCrop` on a batch tensor at once (random resized crop via one
  `grid_sample`, flips, brightness/contrast jitter), for small in-memory data where per-image PIL
  work would dominate the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightly.transforms import DINOTransform, MAETransform
from torch import Tensor
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
