"""Named random streams: distinct names never share a seed; the same name always does."""

import itertools

import torch

from ssl_kd.data import EpochPermutation
from ssl_kd.seeding import generator_for, seed_for


def test_streams_of_one_run_never_share_a_seed():
    names = [("order", epoch) for epoch in range(4)]
    names += [("crops", epoch, batch) for epoch in range(4) for batch in range(8)]
    names += [("sample", epoch, index) for epoch in range(4) for index in range(8)]
    names += [("step", step) for step in range(32)]
    seeds = [seed_for(0, *name) for name in names]
    assert len(set(seeds)) == len(seeds)
    assert len({seed_for(run, "crops", 0, 0) for run in range(100)}) == 100


def old_order_seed(seed: int, epoch: int) -> int:  # EpochPermutation before named streams
    return seed * 100_003 + epoch


def old_crops_seed(seed: int, epoch: int, batch: int) -> int:  # TensorMultiCropStream before
    return seed * 1_000_003 + (epoch * 1_000_003 + batch) * 64


def old_step_seed(seed: int, step: int) -> int:  # the trainer's global seed of a step (rank 0)
    return seed * 1_000_003 + step


def test_the_old_formulas_collisions_are_gone():
    assert old_crops_seed(5, 0, 0) == old_step_seed(5, 0)
    assert seed_for(5, "crops", 0, 0) != seed_for(5, "step", 0)
    assert old_order_seed(0, 100_003) == old_order_seed(1, 0)
    assert seed_for(0, "order", 100_003) != seed_for(1, "order", 0)
    assert seed_for(0, "crops", 0, 0) != seed_for(0, "order", 0)
    # the joined path is not ambiguous: ("crops", 1, 23) is not ("crops", 12, 3)
    assert seed_for(0, "crops", 1, 23) != seed_for(0, "crops", 12, 3)


def test_a_stream_draws_the_same_whenever_it_is_asked():
    first = torch.rand(5, generator=generator_for(3, "crops", 2, 7))
    torch.rand(100)  # the global generator is not involved
    again = torch.rand(5, generator=generator_for(3, "crops", 2, 7))
    assert torch.equal(first, again)
    assert 0 <= seed_for(3, "crops", 2, 7) < 2**63


def test_epoch_orders_differ_between_epochs_and_runs():
    orders = [
        tuple(EpochPermutation(64, 8, seed, epoch).indices)
        for seed, epoch in itertools.product(range(3), range(3))
    ]
    assert len(set(orders)) == len(orders)
