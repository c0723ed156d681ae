"""Cluttered digits: scikit-learn's digits at a random place and scale on a larger canvas, over
fragments of other digits and noise.

On the plain digits every patch carries part of the digit; here most patches carry none, so
which patches a masked teacher sees decides what it can tell the student (MaskedKD,
arXiv:2302.10494). Generated in code from a fixed seed, the same on every machine, once per
process (cached); the train/test split follows the digits' rule (`stratified_split`, the run's
seed), and labels are the digits' labels in the digits' order.

How much clutter: enough that most patches hold no pixel of the digit, little enough that a tiny
ViT learns the task from scratch in minutes on a CPU (`make demo-kd`). With 3-6 fragments and
noise up to 0.25 a width-96, depth-6 ViT stayed at chance (loss 2.30) for 440 steps of 64
images; with 1-3 fragments and noise up to 0.1 it reached 64% top-1 in 880 steps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_kd.data.datasets import stratified_split

CANVAS = 64  # px
GENERATION_SEED = 20240215  # fixed: the data set never depends on a run's seed
DIGIT_SIZE = (0.25, 0.375)  # the placed digit's side as a fraction of the canvas: 16..24 px
FRAGMENTS = (1, 3)  # fragments of other digits per image, inclusive
FRAGMENT_CELLS = 4  # a fragment is a 4 × 4 window of another 8 × 8 digit (a quarter of it)
NOISE = 0.1  # uniform background noise in [0, NOISE]


@dataclass(frozen=True)
class Layout:
    """Where each image's digit lies: [N] top, left and side in pixels (a square box)."""

    top: Tensor
    left: Tensor
    size: Tensor


@functools.cache
def _generated(canvas: int) -> tuple[Tensor, Tensor, Layout, Tensor]:
    """(images [N, 1, C, C] in [0, 1], labels [N], layout, digit masks [N, C, C] bool): every
    image of the data set in scikit-learn's order, generated once per process."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    sources = torch.from_numpy(bunch.images).float().div(16.0)  # [N, 8, 8]
    labels = torch.from_numpy(bunch.target).long()
    count, cells = sources.shape[0], sources.shape[1]
    generator = torch.Generator().manual_seed(GENERATION_SEED)

    def randint(low: int, high: int) -> int:  # inclusive bounds
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    def scaled(piece: Tensor, size: int) -> Tensor:  # [h, w] → [size·h/8, size·w/8]
        out = (round(size * piece.shape[0] / cells), round(size * piece.shape[1] / cells))
        resized = F.interpolate(piece[None, None], size=out, mode="bilinear", align_corners=False)
        return resized[0, 0].clamp(0, 1)

    images = torch.empty(count, canvas, canvas)
    masks = torch.zeros(count, canvas, canvas, dtype=torch.bool)
    tops, lefts, sizes = (torch.empty(count, dtype=torch.long) for _ in range(3))
    low, high = (round(fraction * canvas) for fraction in DIGIT_SIZE)
    for index in range(count):
        image = torch.rand(canvas, canvas, generator=generator) * NOISE
        size = randint(low, high)
        top, left = randint(0, canvas - size), randint(0, canvas - size)
        # Fragments first, never touching the digit's box: the digit itself stays whole.
        for _ in range(randint(*FRAGMENTS)):
            other = randint(0, count - 1)
            row, column = randint(0, cells - FRAGMENT_CELLS), randint(0, cells - FRAGMENT_CELLS)
            window = sources[other, row : row + FRAGMENT_CELLS, column : column + FRAGMENT_CELLS]
            fragment = scaled(window, size)
            side = fragment.shape[0]
            for _attempt in range(10):
                y, x = randint(0, canvas - side), randint(0, canvas - side)
                apart = y + side <= top or top + size <= y or x + side <= left or left + size <= x
                if apart:
                    region = image[y : y + side, x : x + side]
                    torch.maximum(region, fragment, out=region)
                    break
        digit = scaled(sources[index], size)
        region = image[top : top + size, left : left + size]
        torch.maximum(region, digit, out=region)
        masks[index, top : top + size, left : left + size] = digit > 0
        images[index] = image
        tops[index], lefts[index], sizes[index] = top, left, size
    return images.unsqueeze(1), labels, Layout(tops, lefts, sizes), masks


def cluttered_digits(
    seed: int, test_fraction: float = 0.2, canvas: int = CANVAS
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The cluttered digits, split as the digits are.

    Returns:
        train_images [N, 3, C, C], train_labels [N], test_images [M, 3, C, C], test_labels
        [M], images in [0, 1] (grey: the 3 channels are one expanded, not copied); the split is
        stratified and fixed by `seed`, the same indices as `digits(seed, test_fraction)`.
    """
    images, labels, _, _ = _generated(canvas)
    train_idx, test_idx = stratified_split(labels, seed, test_fraction)
    train, test = (images[idx].expand(-1, 3, -1, -1) for idx in (train_idx, test_idx))
    return train, labels[train_idx], test, labels[test_idx]


def cluttered_digits_layout(canvas: int = CANVAS) -> tuple[Layout, Tensor]:
    """(each image's digit box, the digit's pixels [N, C, C] bool), in scikit-learn's order."""
    _, _, layout, masks = _generated(canvas)
    return layout, masks
