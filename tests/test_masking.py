import itertools

import pytest
import torch

from ssl_kd.masking import (
    interpolate_scores,
    keep_ratio_schedule,
    num_kept,
    select,
    to_sequence_index,
)


def test_num_kept_rounds_half_up_and_matches_maskedkd():
    assert num_kept(196, 0.5) == 98  # MaskedKD: k = 98 of 196 at 50%
    assert num_kept(196, 0.87) == 171  # 170.52
    assert num_kept(196, 0.25) == 49  # MAE: 25% of 196
    assert num_kept(196, 1.0) == 196
    assert num_kept(10, 0.01) == 1  # never zero patches


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01, float("nan")])
def test_num_kept_rejects_impossible_ratios(ratio):
    with pytest.raises(ValueError, match="keep_ratio"):
        num_kept(196, ratio)


def test_topk_is_brute_force_topk():
    scores = torch.randn(5, 49, generator=torch.Generator().manual_seed(0))
    keep_idx = select(scores, 20, "attention_topk")
    for row, kept in zip(scores, keep_idx, strict=True):
        brute = sorted(range(49), key=lambda i: -row[i].item())[:20]
        assert kept.tolist() == sorted(brute)


def test_bottomk_is_brute_force_bottomk():
    scores = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    keep_idx = select(scores, 5, "attention_bottomk")
    for row, kept in zip(scores, keep_idx, strict=True):
        assert kept.tolist() == sorted(row.argsort()[:5].tolist())


@pytest.mark.parametrize(
    ("strategy", "keep"),
    itertools.product(["attention_topk", "random", "attention_bottomk", "block"], [1, 7, 36]),
)
def test_selection_invariants(strategy, keep):
    scores = torch.rand(8, 36, generator=torch.Generator().manual_seed(2))

    def run(seed):
        return select(
            scores, keep, strategy, grid=(6, 6), generator=torch.Generator().manual_seed(seed)
        )

    keep_idx = run(0)
    assert keep_idx.shape == (8, keep) and keep_idx.dtype == torch.int64
    assert ((keep_idx >= 0) & (keep_idx < 36)).all()
    assert (keep_idx.diff(dim=1) > 0).all()  # sorted and unique
    assert torch.equal(keep_idx, run(0))  # deterministic under a seed


def test_random_masking_depends_on_the_seed_and_is_uniform():
    a = select(
        None,
        9,
        "random",
        num_patches=36,
        batch_size=256,
        generator=torch.Generator().manual_seed(0),
    )
    b = select(
        None,
        9,
        "random",
        num_patches=36,
        batch_size=256,
        generator=torch.Generator().manual_seed(1),
    )
    assert not torch.equal(a, b)
    counts = torch.bincount(a.flatten(), minlength=36).float()
    expected = 256 * 9 / 36
    assert (counts - expected).abs().max() < 0.5 * expected


def test_block_is_one_compact_region():
    for keep, (height, width) in ((9, (3, 3)), (10, (3, 4)), (64, (8, 8))):
        keep_idx = select(None, keep, "block", num_patches=64, batch_size=16, grid=(8, 8),
                          generator=torch.Generator().manual_seed(3))  # fmt: skip
        rows, cols = keep_idx // 8, keep_idx % 8
        assert ((rows.max(1).values - rows.min(1).values) == height - 1).all()
        assert ((cols.max(1).values - cols.min(1).values) == width - 1).all()


def test_select_rejects_bad_requests():
    with pytest.raises(ValueError, match="cannot keep"):
        select(torch.rand(2, 4), 5, "attention_topk")
    with pytest.raises(ValueError, match="needs attention scores"):
        select(None, 2, "attention_topk", num_patches=4, batch_size=2)
    with pytest.raises(ValueError, match="grid"):
        select(None, 2, "block", num_patches=4, batch_size=2)
    with pytest.raises(ValueError, match="unknown masking strategy"):
        select(torch.rand(2, 4), 2, "topk")


def test_interpolate_scores_between_grids():
    scores = torch.arange(16.0).reshape(1, 16)
    assert torch.equal(interpolate_scores(scores, (4, 4), (4, 4)), scores)
    up = interpolate_scores(scores, (4, 4), (8, 8))
    assert up.shape == (1, 64)
    # bilinear upsampling of a linear ramp keeps its ordering along rows and columns
    grid = up.reshape(8, 8)
    assert (grid.diff(dim=0) >= 0).all() and (grid.diff(dim=1) >= 0).all()
    constant = interpolate_scores(torch.full((2, 196), 3.0), (14, 14), (16, 16))
    assert torch.allclose(constant, torch.full((2, 256), 3.0))


def test_sequence_index_puts_prefix_first():
    keep_idx = torch.tensor([[0, 5, 7]])
    assert to_sequence_index(keep_idx).tolist() == [[0, 1, 6, 8]]
    assert to_sequence_index(keep_idx, 2).tolist() == [[0, 1, 2, 7, 9]]


def test_keep_ratio_schedule():
    schedule = keep_ratio_schedule(0.5, 1.0, 5, 10)
    assert schedule[0] == 1.0 and schedule[4] == 0.5 and (schedule[5:] == 0.5).all()
    assert (keep_ratio_schedule(0.66, None, 5, 7) == 0.66).all()
