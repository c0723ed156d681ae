"""Checkpoint files: numbered copies, pruning, and bad files (truncated, another model's,
extra or missing keys) named clearly, or loaded with a report under --strict false."""

import pytest
import torch

from ssl_kd.cli import main
from ssl_kd.engine.checkpoint import CheckpointStore, load_checkpoint
from ssl_kd.engine.trainer import Trainer, train
from tests.helpers import tiny_config, tiny_overrides


def truncate(path, keep=0.5):
    """Cuts the file in place (the same file, as `truncate` or a tool writing over it would)."""
    with open(path, "r+b") as handle:
        handle.truncate(int(handle.seek(0, 2) * keep))


def test_keeps_the_last_k_numbered_checkpoints(tmp_path):
    (tmp_path / ".checkpoint.pth.tmp-999").write_bytes(b"half a save")  # a killed save's
    train(tiny_config(tmp_path, **{"train.max_steps": 5, "train.checkpoint_every_steps": 1,
                                   "train.keep_checkpoints": 3}))  # fmt: skip
    numbered = sorted(p.name for p in tmp_path.glob("checkpoint-*.pth"))
    assert numbered == ["checkpoint-000003.pth", "checkpoint-000004.pth", "checkpoint-000005.pth"]
    for name, step in zip(numbered, (3, 4, 5), strict=True):
        assert load_checkpoint(tmp_path / name)["step"] == step
    assert (tmp_path / "checkpoint.pth").read_bytes() == (tmp_path / numbered[-1]).read_bytes()
    assert not list(tmp_path.glob(".checkpoint*"))  # the stale temporary file is gone


def test_keep_zero_writes_only_checkpoint_pth(tmp_path):
    train(tiny_config(tmp_path, **{"train.max_steps": 2, "train.keep_checkpoints": 0}))
    assert sorted(p.name for p in tmp_path.glob("checkpoint*")) == ["checkpoint.pth"]


def test_numbered_copy_survives_the_next_save(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    store.save({"step": 1}, 1)
    store.save({"step": 2}, 2)  # replaces checkpoint.pth; the copy keeps step 1
    assert torch.load(tmp_path / "checkpoint-000001.pth")["step"] == 1
    assert torch.load(tmp_path / "checkpoint.pth")["step"] == 2
    newest = (tmp_path / "checkpoint-000002.pth").stat()
    assert newest.st_nlink == 1 and newest.st_ino != (tmp_path / "checkpoint.pth").stat().st_ino


def train_args(tmp_path, run, *extra):
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    return ["train", str(config), *tiny_overrides(run, **{"train.max_steps": 4}), *extra]


def test_truncated_checkpoint_is_named_and_strict_false_resumes_from_a_numbered_one(
    tmp_path, capsys
):
    """checkpoint.pth (step 3) cut in place: the numbered copy of the same step is a file of
    its own (a hard link would be cut too), so --strict false resumes from it, losing nothing."""
    run = tmp_path / "run"
    train(tiny_config(run, **{"train.max_steps": 3, "train.checkpoint_every_steps": 2}))
    truncate(run / "checkpoint.pth")  # checkpoint-000002.pth and checkpoint-000003.pth intact
    assert main(train_args(tmp_path, run)) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoint.pth'} is not a readable checkpoint" in err
    assert "--strict false" in err and err.count("\n") == 1

    assert main([*train_args(tmp_path, run), "--strict", "false"]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "checkpoint.pth is not a readable checkpoint" in (
        captured.err
    )
    assert f"resumed from {run / 'checkpoint-000003.pth'} at step 3" in captured.out
    assert load_checkpoint(run / "checkpoint.pth")["step"] == 4


def test_no_readable_checkpoint_at_all_is_an_error_even_without_strict(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, **{"train.max_steps": 1, "train.keep_checkpoints": 0}))
    truncate(run / "checkpoint.pth")
    assert main([*train_args(tmp_path, run), "--strict", "false"]) == 2
    assert "no readable checkpoint in" in capsys.readouterr().err


def test_checkpoint_with_missing_and_extra_keys(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, **{"train.max_steps": 2}))
    state = load_checkpoint(run / "checkpoint.pth")
    del state["method"]["student.backbone.vit.cls_token"]
    state["method"]["student.extra.weight"] = torch.zeros(3)
    torch.save(state, run / "checkpoint.pth")

    with pytest.raises(ValueError) as err:
        Trainer(tiny_config(run, **{"train.max_steps": 4})).resume()
    message = str(err.value)
    assert str(run / "checkpoint.pth") in message
    assert "missing keys: student.backbone.vit.cls_token" in message
    assert "unexpected keys: student.extra.weight" in message

    trainer = Trainer(tiny_config(run, **{"train.max_steps": 4}), strict=False)
    assert trainer.resume() and trainer.step == 2
    err = capsys.readouterr().err
    assert "--strict false" in err and "student.backbone.vit.cls_token" in err
    loaded = trainer.method.state_dict()["teacher.backbone.vit.cls_token"]
    assert torch.equal(loaded, state["method"]["teacher.backbone.vit.cls_token"])


def test_checkpoint_of_another_model_in_eval(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, **{"train.max_steps": 1}))
    other = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
             "{patch_size: 4, embed_dim: 32, depth: 3, num_heads: 2}"]  # fmt: skip
    args = ["eval", "knn", str(run / "checkpoint.pth"), *other, "--ks", "5", "--img-size", "32",
            "--output-dir", str(tmp_path / "eval")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(run / "checkpoint.pth") in err and err.count("\n") == 1
    assert "missing keys ['blocks.2." in err and "shape mismatches ['" in err

    assert main([*args, "--strict", "false"]) == 0
    out = capsys.readouterr().out
    assert "--strict false: missing" in out and "blocks.2.attn.qkv.weight" in out


def test_truncated_file_in_eval_and_export_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, **{"train.max_steps": 1}))
    truncate(run / "checkpoint.pth", keep=0.3)
    assert main(["eval", "knn", str(run / "checkpoint.pth")]) == 2
    assert f"{run / 'checkpoint.pth'} is not a readable PyTorch checkpoint" in (
        capsys.readouterr().err
    )
    assert main(["export", str(run / "checkpoint.pth"), "--out", str(tmp_path / "b.pth")]) == 2
    assert "may be truncated" in capsys.readouterr().err
    assert not (tmp_path / "b.pth").exists()
