"""Evaluation data edges: unreadable images are left out with their labels (or stop the pass in
one line, never a DataLoader worker's traceback), bad folders are refused before any checkpoint
is read, and a class mismatch names the classes."""

import json
import shutil

import pytest
import torch

import ssl_kd.evaluation.loading
from ssl_kd.cli import main
from ssl_kd.data import DataError, UnreadableImages, eval_splits
from tests.helpers import TINY_VIT, run_cli, tiny_backbone, write_digit_folder

TRUNCATED_PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"  # a copy cut short


def data_with_unreadable_images(root):
    """train/ (12 digits + 1 truncated PNG in class_1) and val/ (6 + 1 in class_2); returns the
    unreadable paths and a copy of the same folders without them."""
    write_digit_folder(root / "train")
    write_digit_folder(root / "val", per_class=2)
    clean = root.parent / f"{root.name}_clean"
    shutil.copytree(root, clean)
    bad = [root / "train" / "class_1" / "1b.png", root / "val" / "class_2" / "0b.png"]
    for path in bad:
        path.write_bytes(TRUNCATED_PNG)
    return [str(path) for path in bad], clean


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "timm_state.pth"
    torch.save(tiny_backbone().vit.state_dict(), path)
    return path


def eval_args(kind, weights, data, out, *extra):
    return ["eval", kind, str(weights), "--model", "vit_tiny_patch16_224", "--model-kwargs",
            str(TINY_VIT), "--data", str(data), "--img-size", "32", "--output-dir", str(out),
            *extra]  # fmt: skip


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_images_are_left_out_with_their_labels(tmp_path, num_workers, capsys):
    bad, _ = data_with_unreadable_images(tmp_path / "data")
    splits = eval_splits(str(tmp_path / "data"), 32)
    batches = splits.batches("train", 5, num_workers=num_workers)
    images = torch.cat(list(batches))
    broken = splits.train.samples.index((bad[0], 1))  # type: ignore[attr-defined]
    assert batches.kept == [i for i in range(13) if i != broken] and len(images) == 12
    assert list(splits.unreadable.files["train"]) == [bad[0]]
    assert "skipping unreadable image (1 so far in the train split" in capsys.readouterr().err
    list(splits.batches("train", 5, num_workers=num_workers))  # a second pass: not named again
    assert "skipping" not in capsys.readouterr().err

    splits.unreadable = UnreadableImages(on_error="error")
    with pytest.raises(DataError, match=f"cannot read image {bad[0]}.*train split"):
        list(splits.batches("train", 5, num_workers=num_workers))
    splits.unreadable = UnreadableImages(max_fraction=0.05)  # 1 of 13 is more than 5%
    with pytest.raises(DataError, match="1 of the 13 images of the train split are unreadable"):
        list(splits.batches("train", 5))


def test_eval_skips_unreadable_images_names_them_and_scores_the_rest(tmp_path, weights, capsys):
    """k-NN with two unreadable images (DataLoader workers on) scores exactly what the same
    folders without them score, and says what it left out."""
    bad, clean = data_with_unreadable_images(tmp_path / "data")
    # 1 of val's 7 images is 14%: over the 10% that stops by default (a copy cut short)
    args = ["--ks", "1", "3", "--num-workers", "2", "--max-bad-fraction", "0.2"]
    assert main(eval_args("knn", weights, clean, tmp_path / "clean", *args)) == 0
    capsys.readouterr()
    assert main(eval_args("knn", weights, tmp_path / "data", tmp_path / "out", *args)) == 0
    out, err = capsys.readouterr()
    assert "train: 12 of 13 images used, 1 unreadable skipped" in out
    assert "val: 6 of 7 images used, 1 unreadable skipped" in out
    assert all(err.count(f"cannot read image {path}") == 1 for path in bad), err
    assert "Traceback" not in err
    result = json.loads((tmp_path / "out" / "knn_eval.json").read_text())
    expected = json.loads((tmp_path / "clean" / "knn_eval.json").read_text())
    assert result["scores"] == expected["scores"]
    assert result["unreadable_images"] == {"train": [bad[0]], "val": [bad[1]]}
    assert (result["train_size"], result["val_size"]) == (12, 6)

    # the linear probe through the backbone at every step (augmented): labels follow the images
    linear = ["--epochs", "1", "--lr", "0.1", "--augment", *args[3:]]
    assert main(eval_args("linear", weights, tmp_path / "data", tmp_path / "out", *linear)) == 0
    probe = json.loads((tmp_path / "out" / "linear_dino" / "linear_eval.json").read_text())
    assert (probe["train_size"], probe["val_size"]) == (12, 6)
    assert probe["unreadable_images"] == {"train": [bad[0]], "val": [bad[1]]}


def test_on_error_error_is_one_line_naming_the_file_exit_1(tmp_path, weights):
    bad, _ = data_with_unreadable_images(tmp_path / "data")
    args = eval_args("knn", weights, tmp_path / "data", tmp_path / "out", "--on-error", "error",
                     "--num-workers", "2")  # fmt: skip
    done = run_cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ssl-kd: error: cannot read image ") and bad[0] in last
    assert "train split; --on-error skip leaves it out" in last
    assert "Traceback" not in done.stderr and "DataLoader worker" not in done.stderr
    assert not (tmp_path / "out" / "knn_eval.json").exists()


def test_bad_data_is_refused_before_the_checkpoint_is_read(tmp_path, weights, monkeypatch, capsys):
    """Class folders that differ are named (only in train/, only in val/); like a folder without
    train/ and val/, the error comes before the checkpoint is read."""

    def not_now(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the data was checked")

    monkeypatch.setattr(ssl_kd.evaluation.loading, "load_backbone", not_now)
    write_digit_folder(tmp_path / "data" / "train")
    write_digit_folder(tmp_path / "data" / "val", per_class=2)
    shutil.rmtree(tmp_path / "data" / "val" / "class_0")
    (tmp_path / "data" / "val" / "class_2").rename(tmp_path / "data" / "val" / "class_9")
    for kind in ("knn", "linear"):
        assert main(eval_args(kind, weights, tmp_path / "data", tmp_path / "out")) == 2
        err = capsys.readouterr().err
        assert (
            "the train and val folders must hold the same class folders (labels are class "
            f"indices): only in {tmp_path / 'data' / 'train'}: class_0, class_2; only in "
            f"{tmp_path / 'data' / 'val'}: class_9"
        ) in err
        assert err.count("\n") == 1
    assert main(eval_args("knn", weights, tmp_path / "data" / "train", tmp_path / "out")) == 2
    assert (
        "expected 'digits', 'cluttered_digits' or a folder with train/ and val/"
        in capsys.readouterr().err
    )
