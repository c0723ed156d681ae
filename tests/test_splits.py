"""Evaluation splits: `ssl-kd eval` and the trainer's k-NN read the same images and labels."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ssl_kd.data import (
    DataError,
    digits,
    eval_splits,
    image_batches,
    knn_splits,
    normalize_images,
)
from ssl_kd.engine.trainer import Trainer
from ssl_kd.errors import ConfigError
from ssl_kd.evaluation.knn import extract_features, knn_classify
from tests.helpers import tiny_config, write_digit_folder


def all_images(dataset) -> torch.Tensor:
    return torch.cat(list(image_batches(dataset, 500)))


@pytest.mark.parametrize(("seed", "fraction", "size"), [(0, 0.2, 32), (3, 0.3, 48)])
def test_trainer_knn_split_is_the_eval_split_of_digits(tmp_path, seed, fraction, size):
    overrides = {"train.seed": seed, "data.test_fraction": fraction,
                 "data.global_crop_size": size, "model.img_size": size}  # fmt: skip
    cfg = tiny_config(tmp_path, **overrides)
    trainer_split = knn_splits(cfg.data, cfg.eval, cfg.train.seed)
    eval_split = eval_splits("digits", size, seed=seed, test_fraction=fraction)
    assert trainer_split is not None and trainer_split.in_memory
    assert torch.equal(trainer_split.train_labels, eval_split.train_labels)
    assert torch.equal(trainer_split.val_labels, eval_split.val_labels)
    for part in ("train", "val"):
        images = all_images(getattr(trainer_split, part))
        assert images.shape[1:] == (3, size, size)
        assert torch.equal(images, all_images(getattr(eval_split, part)))
    # ... and the images the trainer's k-NN used before the split code was shared: bilinear
    # resize + ImageNet normalisation of the same held-out digits.
    _, _, val_x, val_y = digits(seed, fraction)
    if size != val_x.shape[-1]:
        val_x = F.interpolate(val_x, size=size, mode="bilinear", align_corners=False)
    assert torch.equal(all_images(trainer_split.val), normalize_images(val_x))
    assert torch.equal(trainer_split.val_labels, val_y)


def test_trainer_knn_scores_the_held_out_digits(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, **{"eval.knn_k": 5}))
    result = trainer.evaluator.run(knn=True, classify=False)
    assert result
    backbone = trainer.method.export_backbone()
    train_x, train_y, val_x, val_y = digits(0)
    train = extract_features(backbone, normalize_images(train_x).split(256))
    val = extract_features(backbone, normalize_images(val_x).split(256))
    expected = knn_classify(train, train_y, val, val_y, (5,), 0.07)[5]
    assert result["knn_top1"] == pytest.approx(expected["top1"])
    assert result["knn_top5"] == pytest.approx(expected["top5"])


def folder_config(tmp_path, train, val):
    return tiny_config(
        tmp_path / "run",
        **{"data.name": "imagefolder", "data.path": str(train), "data.transform": "lightly",
           "data.num_workers": 0, "train.batch_size": 4, "eval.knn_train_path": str(train),
           "eval.knn_val_path": str(val)},
    )  # fmt: skip


def test_knn_folders_give_their_class_labels(tmp_path):
    write_digit_folder(tmp_path / "train", per_class=4)
    write_digit_folder(tmp_path / "val", per_class=2)
    cfg = folder_config(tmp_path, tmp_path / "train", tmp_path / "val")
    splits = knn_splits(cfg.data, cfg.eval, cfg.train.seed)
    assert splits is not None and not splits.in_memory
    assert splits.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert splits.val_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert all_images(splits.val).shape == (6, 3, 32, 32)
    result = Trainer(cfg).evaluator.run(knn=True, classify=False)
    assert result and 0 <= result["knn_top1"] <= 100
    cfg.eval.knn_val_path = None
    assert knn_splits(cfg.data, cfg.eval, cfg.train.seed) is None  # no labels: no k-NN


@pytest.mark.parametrize("key", ["knn_train_path", "knn_val_path"])
def test_a_flat_knn_folder_is_a_config_error_naming_the_key(tmp_path, key):
    write_digit_folder(tmp_path / "labelled")
    flat = tmp_path / "flat"
    flat.mkdir()
    for index in range(3):
        Image.new("RGB", (20, 20), (index, 0, 0)).save(flat / f"{index}.png")
    folders = {"knn_train_path": tmp_path / "labelled", "knn_val_path": tmp_path / "labelled"}
    folders[key] = flat
    cfg = folder_config(tmp_path, folders["knn_train_path"], folders["knn_val_path"])
    with pytest.raises(ConfigError, match=rf"eval.{key}=.*flat has no class sub-folders"):
        knn_splits(cfg.data, cfg.eval, cfg.train.seed)
    write_digit_folder(tmp_path / "mixed")
    Image.new("RGB", (20, 20)).save(tmp_path / "mixed" / "unlabelled.png")
    setattr(cfg.eval, key, str(tmp_path / "mixed"))
    with pytest.raises(ConfigError, match=rf"eval.{key}=.*mixed holds images at its top level"):
        knn_splits(cfg.data, cfg.eval, cfg.train.seed)
    setattr(cfg.eval, key, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=rf"eval.{key}=.*missing is not a folder"):
        knn_splits(cfg.data, cfg.eval, cfg.train.seed)


def test_trainer_knn_skips_an_unreadable_image_as_data_on_error_says(tmp_path, capsys):
    write_digit_folder(tmp_path / "train", per_class=4)
    write_digit_folder(tmp_path / "val", per_class=4)
    bad = tmp_path / "val" / "class_1" / "cut.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n")  # 1 of 13: under data.max_bad_fraction=0.1
    cfg = folder_config(tmp_path, tmp_path / "train", tmp_path / "val")
    trainer = Trainer(cfg)
    assert trainer.evaluator.run(knn=True, classify=False)
    assert f"data.on_error=skip): cannot read image {bad}" in capsys.readouterr().err
    cfg.data.on_error = "error"
    with pytest.raises(DataError, match=f"{bad}.*val split; data.on_error=skip leaves it out"):
        trainer.evaluator.run(knn=True, classify=False)
