"""The data sets shipped in code, by the name `data.name` (and `ssl-kd eval --data`) gives them.

Each is a function (seed, test_fraction) → (train_images [N, 3, H, W] in [0, 1], train_labels
[N], test_images [M, 3, H, W], test_labels [M]), held in memory; the split is stratified and
fixed by the run's seed.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ssl_kd.data.cluttered import cluttered_digits
from ssl_kd.data.datasets import digits

Splits = tuple[Tensor, Tensor, Tensor, Tensor]

BUNDLED: dict[str, Callable[[int, float], Splits]] = {
    "digits": digits,  # scikit-learn's 8×8 digits at 32 px
    "cluttered_digits": cluttered_digits,  # the same digits placed small on a 64-px clutter
}
NUM_CLASSES = 10  # both are the ten digits


def is_bundled(name: object) -> bool:
    return isinstance(name, str) and name in BUNDLED


def bundled_splits(name: str, seed: int, test_fraction: float = 0.2) -> Splits:
    """The train and test tensors of the bundled data set `name` (see the module docstring)."""
    return BUNDLED[name](seed, test_fraction)
