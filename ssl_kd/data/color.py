"""Batched colour operations on float images [N, 3, H, W] in [0, 1], one parameter per image.

`adjust_brightness`, `adjust_contrast`, `adjust_saturation`, `adjust_hue`, `grayscale` and
`solarize` compute what torchvision's functional ops of those names (transforms.v2.functional,
float tensors) compute image by image; `pil_gaussian_blur` is Pillow's `ImageFilter.GaussianBlur`,
the blur DINO and lightly apply to their PIL images (torchvision's `gaussian_blur` is another
kernel). tests/test_photometric.py checks each against its reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128 / 255  # DINO solarizes PIL images at 128: values >= 128 are inverted
BLUR_PASSES = 3  # Pillow approximates a Gaussian by three box blurs


def per_image(values: Tensor) -> Tensor:
    """[N] → [N, 1, 1, 1], to scale each image of a batch by its own value."""
    return values.view(-1, 1, 1, 1)


def grayscale(images: Tensor) -> Tensor:
    """[N, 3, H, W] → luma [N, 1, H, W]."""
    red, green, blue = images.unbind(dim=1)
    luma = red * GRAY_WEIGHTS[0] + green * GRAY_WEIGHTS[1] + blue * GRAY_WEIGHTS[2]
    return luma.unsqueeze(1)


def blend(images: Tensor, other: Tensor, factors: Tensor) -> Tensor:
    """factor · images + (1 − factor) · other, clamped to [0, 1]; `other` broadcasts."""
    factor = per_image(factors)
    return (images * factor + other * (1 - factor)).clamp_(0, 1)


def adjust_brightness(images: Tensor, factors: Tensor) -> Tensor:
    return (images * per_image(factors)).clamp_(0, 1)


def adjust_contrast(images: Tensor, factors: Tensor) -> Tensor:
    """Blends each image with the mean of its own luma."""
    return blend(images, grayscale(images).mean(dim=(1, 2, 3), keepdim=True), factors)


def adjust_saturation(images: Tensor, factors: Tensor) -> Tensor:
    """Blends each image with its luma (factor 0: grey, 1: unchanged)."""
    return blend(images, grayscale(images), factors)


def adjust_hue(images: Tensor, shifts: Tensor) -> Tensor:
    """Turns each image's hue by its shift (a fraction of the colour circle, in [−0.5, 0.5]).

    Value (the channel maximum) and chroma (maximum − minimum) are kept; channel n of the
    result is value − chroma · clamp(min(k, 4 − k), 0, 1) with k = (n + 6·hue) mod 6 and
    n = 5, 3, 1 for red, green, blue: the HSV → RGB conversion without branches.
    """
    red, green, blue = images.unbind(dim=1)  # [N, H, W] each
    value = torch.maximum(torch.maximum(red, green), blue)
    chroma = value - torch.minimum(torch.minimum(red, green), blue)
    # Hue in sextants [0, 6) (−1 allowed: the remainder below wraps it): the channel holding the
    # maximum decides the formula; a grey pixel (chroma 0) keeps its value whatever its hue.
    hue = torch.where(
        value == red,
        green - blue,
        torch.where(value == green, blue - red + 2 * chroma, red - green + 4 * chroma),
    )
    hue = hue / chroma.clamp(min=1e-12) + 6 * shifts.view(-1, 1, 1)
    offsets = torch.tensor([5.0, 3.0, 1.0], device=images.device).view(1, 3, 1, 1)
    sector = torch.remainder(offsets + hue.unsqueeze(1), 6)
    ramp = torch.minimum(sector, 4 - sector).clamp_(0, 1)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * ramp


def solarize(images: Tensor) -> Tensor:
    return torch.where(images >= SOLARIZE_THRESHOLD, 1 - images, images)


def pil_box_radius(sigmas: Tensor) -> Tensor:
    """The (fractional) radius of each of Pillow's three box blurs for a Gaussian of std sigma.

    Pillow's rule (Gwosdek et al., "Theoretical foundations of Gaussian convolution by extended
    box filtering", 2011): three boxes whose variances add up to sigma², the box widened by a
    fraction of a pixel at each end so that the sum is exact.
    """
    variance = sigmas.double() ** 2 / BLUR_PASSES
    whole = torch.floor((torch.sqrt(12 * variance + 1) - 1) / 2)
    fraction = (2 * whole + 1) * (whole * (whole + 1) - 3 * variance)
    fraction = fraction / (6 * (variance - (whole + 1) ** 2))
    return (whole + fraction).float()


def box_kernels(radii: Tensor, half_width: int) -> Tensor:
    """[N] radii → [N, 2·half_width + 1] taps: 1 / (2r + 1) within floor(r) of the centre, the
    fractional end (r − floor(r)) / (2r + 1) one further, 0 beyond."""
    offsets = torch.arange(-half_width, half_width + 1, device=radii.device).abs()
    whole = radii.floor().unsqueeze(1)
    weight = 1 / (2 * radii + 1).unsqueeze(1)
    inner = (offsets <= whole).float() * weight
    edge = (offsets == whole + 1).float() * (radii.unsqueeze(1) - whole) * weight
    return inner + edge


def pil_gaussian_blur(images: Tensor, sigmas: Tensor) -> Tensor:
    """Pillow's `GaussianBlur(radius=sigma)` (DINO's blur), each image with its own sigma.

    Three passes of a box blur along each axis, the image's edge pixels repeated beyond it (as
    Pillow does in every pass); Pillow rounds to 8 bits after each pass, this does not. A pass
    is a sum of shifted copies (at most 5 taps for sigma <= 2): on CPU faster than a grouped
    convolution.
    """
    radii = pil_box_radius(sigmas.to(images.device))
    half_width = int(radii.max().floor().item()) + 1
    taps = box_kernels(radii, half_width).T.reshape(-1, len(images), 1, 1, 1)  # [K, N, 1, 1, 1]
    for dim in (3, 2):  # along W, then along H
        size = images.shape[dim]
        pad = (half_width, half_width, 0, 0) if dim == 3 else (0, 0, half_width, half_width)
        for _ in range(BLUR_PASSES):
            padded = F.pad(images, pad, mode="replicate")
            images = padded.narrow(dim, 0, size) * taps[0]
            for offset in range(1, len(taps)):
                images.addcmul_(padded.narrow(dim, offset, size), taps[offset])
    return images
