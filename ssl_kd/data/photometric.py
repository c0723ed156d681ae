"""DINO's photometric augmentation, drawn per view and applied to whole batches of views.

DINO (arXiv:2104.14294, appendix; its `DataAugmentationDINO`, as lightly's `DINOTransform`
implements it) colours every crop by: colour jitter (brightness 0.4, contrast 0.4, saturation
0.2, hue 0.1, in a random order) with p = 0.8; grayscale with p = 0.2; Gaussian blur with sigma
~ U(0.1, 2) with p = 1.0 on the first global view, 0.1 on the second and 0.5 on local views;
solarization with p = 0.2 on the second global view only; then ImageNet normalisation.

The parameters are drawn where the crop is made (a DataLoader worker, or `BatchedMultiCrop`)
and travel with the uint8 view as a `PhotometricParams`; `BatchedPhotometric` applies them to
the whole batch in the training process, on the batch's device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ssl_kd.data import color

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ColorAugmentation:
    """One view's photometric augmentation (DINO's by default, without blur or solarization).

    Jitter strengths as torchvision's ColorJitter reads them: factors ~ U(1 − s, 1 + s) for
    brightness, contrast and saturation (clipped at 0), a hue shift ~ U(−s, s).
    """

    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0


DINO_GLOBAL_1 = ColorAugmentation(blur_prob=1.0)
DINO_GLOBAL_2 = ColorAugmentation(blur_prob=0.1, solarize_prob=0.2)
DINO_LOCAL = ColorAugmentation(blur_prob=0.5)
# data.transform=batched (the bundled demo data): brightness and contrast jitter only
LIGHT_JITTER = ColorAugmentation(saturation=0.0, hue=0.0, gray_prob=0.0)
NO_COLOR = ColorAugmentation(jitter_prob=0.0, gray_prob=0.0)  # MAE: normalisation only


def dino_colors(num_local_views: int) -> list[ColorAugmentation]:
    """DINO's augmentation of each view: [global 1, global 2, local × num_local_views]."""
    return [DINO_GLOBAL_1, DINO_GLOBAL_2] + [DINO_LOCAL] * num_local_views


JITTER_OPS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    color.adjust_brightness, color.adjust_contrast, color.adjust_saturation, color.adjust_hue,
)  # fmt: skip
IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)  # a jitter op with this factor leaves the image as is
CPU_PIECE_BYTES = 2**21  # views coloured together on CPU: about a core's L2 cache


class PhotometricParams(NamedTuple):
    """The drawn photometric parameters of N views (a DataLoader collates them to [B, V, ...])."""

    jitter: Tensor  # [N] bool: colour jitter applied
    factors: Tensor  # [N, 4]: brightness, contrast, saturation factors and the hue shift
    order: Tensor  # [N, 4] int64: the order of the four jitter ops (a permutation of 0..3)
    grayscale: Tensor  # [N] bool
    blur: Tensor  # [N] bool
    sigma: Tensor  # [N]: the blur's standard deviation, in pixels of the view
    solarize: Tensor  # [N] bool

    def rows(self, index: Tensor | slice) -> PhotometricParams:
        return PhotometricParams(*(field[index] for field in self))

    @staticmethod
    def cat(parts: list[PhotometricParams]) -> PhotometricParams:
        return PhotometricParams(*(torch.cat(fields) for fields in zip(*parts, strict=True)))

    def views(self, start: int, stop: int) -> PhotometricParams:
        """Collated [B, V, ...] → views start..stop-1 in a row, [(stop − start)·B, ...]: the
        order of `torch.cat` over those views' batches."""
        return PhotometricParams(
            *(field[:, start:stop].transpose(0, 1).flatten(0, 1) for field in self)
        )


def sample_photometric(
    augmentation: ColorAugmentation, count: int, generator: torch.Generator | None = None
) -> PhotometricParams:
    """Draws the photometric parameters of `count` views (the global generator when None)."""

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator)

    def uniform(low: float, high: float) -> Tensor:
        return rand(count) * (high - low) + low

    aug = augmentation
    factors = torch.stack(
        [
            uniform(max(0.0, 1 - aug.brightness), 1 + aug.brightness),
            uniform(max(0.0, 1 - aug.contrast), 1 + aug.contrast),
            uniform(max(0.0, 1 - aug.saturation), 1 + aug.saturation),
            uniform(-aug.hue, aug.hue),
        ],
        dim=1,
    )
    return PhotometricParams(
        jitter=rand(count) < aug.jitter_prob,
        factors=factors,
        order=rand(count, 4).argsort(dim=1),  # a uniformly random permutation per view
        grayscale=rand(count) < aug.gray_prob,
        blur=rand(count) < aug.blur_prob,
        sigma=uniform(*aug.blur_sigma),
        solarize=rand(count) < aug.solarize_prob,
    )


def apply_photometric(images: Tensor, params: PhotometricParams) -> Tensor:
    """images [N, 3, H, W] in [0, 1] (any device), params of N views (CPU) → [N, 3, H, W].

    Each op runs on the views that draw it only; which views those are is read from the CPU
    parameters, so a CUDA batch is never synchronised with the host. On CPU the views go
    through all ops a few at a time, in pieces that stay in a core's cache (measured on 224-px
    views: the blur 4.7 → 1.0 ms a view against whole-batch ops).
    """
    if images.device.type != "cpu":
        return apply_in_order(images, params)
    per_piece = max(1, CPU_PIECE_BYTES // images[0].nbytes)
    for start in range(0, len(images), per_piece):
        rows = slice(start, start + per_piece)
        images[rows] = apply_in_order(images[rows], params.rows(rows))
    return images


def apply_in_order(images: Tensor, params: PhotometricParams) -> Tensor:
    """`apply_photometric` on one piece: jitter, grayscale, blur, solarize, DINO's order."""
    for position in range(4):  # each view's jitter ops in its own order, as ColorJitter does
        for op_index, op in enumerate(JITTER_OPS):
            factor = params.factors[:, op_index]
            chosen = (
                params.jitter
                & (params.order[:, position] == op_index)
                & (factor != IDENTITY_FACTORS[op_index])
            )
            images = on_rows(images, chosen, op, factor)
    images = on_rows(images, params.grayscale, gray_rgb)
    images = on_rows(images, params.blur, color.pil_gaussian_blur, params.sigma)
    return on_rows(images, params.solarize, color.solarize)


def gray_rgb(images: Tensor) -> Tensor:
    """[N, 3, H, W] → its luma in all three channels (torchvision's 3-channel grayscale)."""
    return color.grayscale(images).repeat(1, 3, 1, 1)


def on_rows(images: Tensor, chosen: Tensor, op: Callable[..., Tensor], *values: Tensor) -> Tensor:
    """`op(images[rows], *(v[rows] for v in values))` written back to the chosen rows (`chosen`:
    [N] bool on CPU; `values`: [N] on CPU)."""
    rows = chosen.nonzero().flatten()
    if len(rows) == 0:
        return images
    picked = [value[rows].to(images.device) for value in values]
    if len(rows) == len(images):
        return op(images, *picked)
    index = rows.to(images.device)
    return images.index_copy_(0, index, op(images.index_select(0, index), *picked))


class BatchedPhotometric:
    """The training process's half of `data.transform=fast`: the workers' uint8 views and their
    drawn parameters → normalised float views, computed on `device`.

    Views of one size are coloured in one batch (DINO: the 2 global views, then the locals).
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def __call__(self, views: list[Tensor], params: PhotometricParams) -> list[Tensor]:
        """views: V × [B, 3, S, S] uint8; params: fields [B, V, ...] → V × [B, 3, S, S] float."""
        batch = views[0].shape[0]
        out: list[Tensor] = []
        start = 0
        while start < len(views):
            stop = start + 1
            while stop < len(views) and views[stop].shape == views[start].shape:
                stop += 1
            group = [view.to(self.device, non_blocking=True) for view in views[start:stop]]
            images = torch.cat(group).float().div_(255)  # [(stop − start)·B, 3, S, S]
            images = apply_photometric(images, params.views(start, stop))
            out += list(images.sub_(self.mean).div_(self.std).split(batch))
            start = stop
        return out
