"""Named random streams: every random draw of a run comes from `seed_for(seed, name, ...)`.

A stream is named by the run seed and a path such as `("crops", epoch, batch)`; the seed is a
hash of that path, so two different streams never share a seed (the old arithmetic formulas
could: the trainer's step-0 seed equalled the crop seed of epoch 0, batch 0), and a resumed run
draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

import hashlib

import torch


def seed_for(seed: int, *path: str | int) -> int:
    """A 63-bit seed for the stream `path` of run seed `seed` (blake2b of the joined path)."""
    text = "/".join(str(part) for part in (seed, *path))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator_for(seed: int, *path: str | int) -> torch.Generator:
    """A CPU generator seeded for the stream `path` (see `seed_for`)."""
    return torch.Generator().manual_seed(seed_for(seed, *path))
