"""The cluttered digits (ssl_kd/data/cluttered.py): fixed bytes, the digits' labels and split,
the digit inside the canvas, and most patches without any pixel of it."""

import pytest
import torch
from einops import rearrange

from ssl_kd.config.sections import BUNDLED_DATASETS, DATASETS
from ssl_kd.data import (
    BUNDLED,
    Views,
    cluttered_digits,
    cluttered_digits_layout,
    digits,
    eval_splits,
    knn_splits,
)
from ssl_kd.data.cluttered import CANVAS, _generated
from ssl_kd.engine.trainer import Trainer
from tests.helpers import run_python, tiny_config, train_stream


def test_the_same_bytes_in_every_process():
    """Generated from a fixed seed: the bytes are the same in this process and in a fresh one,
    whatever the run's seed (which only chooses the split)."""
    images = _generated(CANVAS)[0]
    code = (
        "import hashlib; from ssl_kd.data.cluttered import _generated; "
        "print(hashlib.sha256(_generated(64)[0].numpy().tobytes()).hexdigest())"
    )
    fresh = run_python(code)
    assert fresh.returncode == 0, fresh.stderr
    import hashlib

    assert fresh.stdout.strip() == hashlib.sha256(images.numpy().tobytes()).hexdigest()
    first, again = cluttered_digits(3), cluttered_digits(3)
    assert all(
        a.numpy().tobytes() == b.numpy().tobytes() for a, b in zip(first, again, strict=True)
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_labels_and_split_are_the_digits(seed):
    train_x, train_y, test_x, test_y = cluttered_digits(seed, 0.25)
    _, digit_train_y, _, digit_test_y = digits(seed, 0.25)
    assert torch.equal(train_y, digit_train_y) and torch.equal(test_y, digit_test_y)
    assert train_x.shape == (len(train_y), 3, CANVAS, CANVAS) and test_x.shape[1:] == (3, 64, 64)
    assert train_x.min() >= 0 and train_x.max() <= 1
    assert torch.equal(train_x[:, 0], train_x[:, 2])  # grey, as the digits


def test_the_digit_lies_inside_the_canvas_and_is_whole():
    layout, masks = cluttered_digits_layout()
    images = _generated(CANVAS)[0][:, 0]
    assert (layout.top >= 0).all() and (layout.left >= 0).all()
    assert (layout.top + layout.size <= CANVAS).all() and (
        layout.left + layout.size <= CANVAS
    ).all()
    assert (layout.size >= 16).all() and (layout.size <= 24).all()
    rows = torch.arange(CANVAS).view(1, -1, 1)
    columns = torch.arange(CANVAS).view(1, 1, -1)
    top, left, size = (value.view(-1, 1, 1) for value in (layout.top, layout.left, layout.size))
    inside = (rows >= top) & (rows < top + size) & (columns >= left) & (columns < left + size)
    assert not (masks & ~inside).any()  # every digit pixel inside its box
    assert masks.flatten(1).any(1).all()  # and every image has its digit
    # Clutter never covers the digit: the box holds the digit's pixels over noise only.
    assert (images[masks] > 0).all()


def test_most_patches_hold_no_pixel_of_the_digit():
    """The property that makes masking matter: at 8-px patches on the 64-px canvas, at least
    3/4 of the 64 patches of every image carry no pixel of its digit."""
    _, masks = cluttered_digits_layout()
    touched = rearrange(masks, "n (h p) (w q) -> n (h w) (p q)", p=8, q=8).any(-1)  # [N, 64]
    empty_share = 1 - touched.float().mean(1)
    assert empty_share.min() >= 0.75 and empty_share.mean() > 0.8


def test_every_bundled_name_is_a_data_set_choice():
    assert set(BUNDLED) == set(BUNDLED_DATASETS) and set(DATASETS) == {*BUNDLED, "imagefolder"}


def test_cluttered_digits_serve_training_and_evaluation(tmp_path):
    """`data.name: cluttered_digits` as `digits`: the batched stream, the lightly stream, the
    k-NN splits, and a DINO step."""
    overrides = {"data.name": "cluttered_digits", "train.batch_size": 8}
    batched = tiny_config(tmp_path / "batched", **overrides)
    views = next(train_stream(batched).epoch(0))
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
    lightly = tiny_config(
        tmp_path / "lightly", **overrides, **{"data.transform": "lightly", "data.num_workers": 0}
    )
    single = next(train_stream(lightly, Views.SINGLE_CROP).epoch(0))
    assert [tuple(v.shape) for v in single] == [(8, 3, 32, 32)]
    splits = knn_splits(batched.data, batched.eval, seed=0)
    assert splits is not None and splits.description.startswith("cluttered_digits (held-out")
    image, label = splits.val[0]
    assert image.shape == (3, 32, 32) and label == int(cluttered_digits(0)[3][0])
    assert eval_splits("cluttered_digits", 64).train[0][0].shape == (3, 64, 64)
    trainer = Trainer(batched)
    assert trainer.train_step(views)["loss"] > 0
