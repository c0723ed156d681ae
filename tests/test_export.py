"""Export: a folder timm rebuilds with no arguments (config.json + model.safetensors, 0644),
or one file timm loads strictly; export never drops a tensor silently, never replaces its input,
a training checkpoint or a folder holding more than an export, replaces an earlier export only
with --force, and a failed write leaves the earlier export whole and nothing else."""

import json
import os
import shutil
import stat
from contextlib import contextmanager

import pytest
import timm
import torch

from ssl_kd.cli import main
from ssl_kd.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_kd.engine.checkpoint import CheckpointStore, load_checkpoint
from ssl_kd.engine.trainer import train
from ssl_kd.evaluation.loading import load_backbone
from ssl_kd.models.export import export_backbone
from tests.helpers import (
    TINY_VIT,
    fill,
    mounted_tmpfs,
    run_cli,
    tiny_backbone,
    tiny_config,
    tiny_overrides,
)

TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", str(TINY_VIT)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    train(tiny_config(path, **{"train.max_steps": 1}))
    return path


@contextmanager
def umask(mask):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("ssl-kd: error: ") and err.count("\n") == 1, err
    return err


def test_export_folder_rebuilds_in_timm_with_no_arguments(run, tmp_path):
    out = tmp_path / "export"
    with umask(0o022):
        assert main(["export", str(run / "checkpoint.pth"), "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    modes = [mode(out), mode(out / "config.json"), mode(out / "model.safetensors")]
    assert modes == [0o755, 0o644, 0o644]  # safetensors alone would write 0o600
    config = json.loads((out / "config.json").read_text())
    assert (config["architecture"], config["num_classes"]) == ("vit_tiny_patch16_224", 0)
    assert {key: config["model_args"][key] for key in TINY_VIT} == TINY_VIT
    assert config["model_args"]["img_size"] == [32, 32]
    preprocessing = config["pretrained_cfg"]
    assert preprocessing["input_size"] == [3, 32, 32]  # the run's global crop size
    assert (preprocessing["mean"], preprocessing["std"]) == (
        list(IMAGENET_MEAN),
        list(IMAGENET_STD),
    )
    assert (preprocessing["interpolation"], preprocessing["crop_pct"]) == ("bicubic", 0.875)
    assert "tag" not in preprocessing  # the registry's name for its own weights, not these
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    teacher, _ = load_backbone(run / "checkpoint.pth")  # DINO exports its teacher
    images = torch.randn(2, 3, 32, 32)  # the export's size: at another, timm resamples the
    assert torch.equal(model(images), teacher(images).cls)  # table its way, a DINO run DINO's


def test_export_of_the_student_and_of_an_export(run, tmp_path):
    saved = load_checkpoint(run / "checkpoint.pth")["method"]
    student = tmp_path / "student"
    assert main(["export", str(run / "checkpoint.pth"), "--out", str(student), "--student"]) == 0
    model = timm.create_model(f"local-dir:{student}", pretrained=True)
    assert torch.equal(model.pos_embed, saved["student.backbone.vit.pos_embed"])
    assert not torch.equal(model.pos_embed, saved["teacher.backbone.vit.pos_embed"])
    again = tmp_path / "again"  # an export folder is an input like any other
    assert main(["export", str(student), "--out", str(again)]) == 0
    assert (again / "model.safetensors").read_bytes() == (
        student / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_single_file_export_loads_strictly_in_timm_with_identical_features(run, tmp_path, suffix):
    out = tmp_path / f"backbone{suffix}"
    with umask(0o022):
        assert main(["export", str(run / "checkpoint.pth"), "--out", str(out)]) == 0
    assert out.is_file() and mode(out) == 0o644
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=32,
        pretrained_cfg_overlay={"file": str(out)}, **TINY_VIT,
    ).eval()  # fmt: skip
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(images), load_backbone(run / "checkpoint.pth")[0](images).cls)


def test_export_never_drops_a_tensor_silently(tmp_path, capsys):
    source = tiny_backbone()
    state = {key: value.clone() for key, value in source.vit.state_dict().items()}
    extra = tmp_path / "extra.pth"
    torch.save(state | {"extra.weight": torch.zeros(3)}, extra)
    out = tmp_path / "export"
    assert main(["export", str(extra), "--out", str(out), *TINY]) == 2
    err = one_line_error(capsys)
    assert "unexpected keys ['extra.weight']" in err and "--strict" not in err  # no way round
    del state["norm.bias"]
    torch.save(state, tmp_path / "short.pth")
    assert main(["export", str(tmp_path / "short.pth"), "--out", str(out), *TINY]) == 2
    assert "missing keys ['norm.bias']" in one_line_error(capsys)
    assert main(["export", str(extra), "--out", str(out)]) == 2  # no model named anywhere
    assert "does not say which model it holds: pass --model NAME" in one_line_error(capsys)
    assert sorted(os.listdir(tmp_path)) == ["extra.pth", "short.pth"]  # nothing written
    # keys dropped on purpose (MAE's decoder and mask token) are listed
    state["norm.bias"] = source.vit.norm.bias.detach().clone()
    mae = tmp_path / "mae.pth"
    torch.save({"model": state | {"mask_token": torch.zeros(1, 1, 64),
                                  "decoder_embed.weight": torch.zeros(32, 64)}}, mae)  # fmt: skip
    assert main(["export", str(mae), "--out", str(out), *TINY]) == 0
    assert "dropped on purpose (2): decoder_embed.weight, mask_token" in capsys.readouterr().out
    images = torch.randn(2, 3, 32, 32)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert torch.equal(model(images), source.eval()(images).cls)


def test_export_rejects_a_bad_target(run, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in one_line_error(capsys)
    (tmp_path / "notes").write_text("a file where the export folder would go")
    assert main(["export", str(run / "checkpoint.pth"), "--out", str(tmp_path / "notes")]) == 2
    assert f"--out {tmp_path / 'notes'} is a file: name a new folder" in one_line_error(capsys)
    assert (tmp_path / "notes").read_text() == "a file where the export folder would go"
    (tmp_path / "folder.pth").mkdir()
    assert main(["export", str(run / "checkpoint.pth"), "--out", str(tmp_path / "folder.pth")]) == 2
    assert "is a folder: name a new file" in one_line_error(capsys)


# --- export never overwrites, never leaves a partial file ---------------------------------
def assert_one_line_exit_2(result, expected):
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("ssl-kd: error: ") and result.stderr.count("\n") == 1
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_export_never_replaces_its_input_or_a_training_checkpoint_even_with_force(run, tmp_path):
    checkpoint = run / "checkpoint.pth"
    saved = checkpoint.read_bytes()
    for force in ([], ["--force"]):
        result = run_cli("export", checkpoint, "--out", checkpoint, *force, timeout=180)
        assert_one_line_exit_2(result, f"--out {checkpoint} is the file being exported")
    other = tmp_path / "other_run" / "checkpoint.pth"  # another run's training state
    other.parent.mkdir()
    other.write_bytes(saved)
    result = run_cli("export", checkpoint, "--out", other, "--force", timeout=180)
    assert_one_line_exit_2(result, "is an ssl_kd training checkpoint: export never replaces one")
    assert checkpoint.read_bytes() == saved and other.read_bytes() == saved
    assert load_checkpoint(checkpoint)["step"] == 1  # the run can still resume


def test_a_checkpoint_replaced_by_an_export_says_how_to_resume(run, tmp_path):
    """What an export onto checkpoint.pth left before it was refused: the message says how to
    go on, and --strict false finds the numbered copy beside it."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    export_backbone(run / "checkpoint.pth", tmp_path / "backbone.pth")
    os.replace(tmp_path / "backbone.pth", copy / "checkpoint.pth")
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    result = run_cli("train", config, *tiny_overrides(copy), timeout=180)
    assert_one_line_exit_2(result, "checkpoint.pth is not an ssl_kd training checkpoint")
    assert "--strict false to resume from the newest checkpoint-<step>.pth" in result.stderr
    state, path = CheckpointStore(copy, keep=2).load_latest(strict=False)
    assert path.name == "checkpoint-000001.pth" and state["step"] == 1


def test_export_replaces_an_existing_file_only_with_force(run, tmp_path):
    out = tmp_path / "backbone.safetensors"
    out.write_bytes(b"an earlier export the user wants to keep")
    result = run_cli("export", run / "checkpoint.pth", "--out", out, timeout=180)
    assert_one_line_exit_2(result, f"--out {out} exists: pass --force to replace it")
    assert out.read_bytes() == b"an earlier export the user wants to keep"
    result = run_cli("export", run / "checkpoint.pth", "--out", out, "--force", timeout=180)
    assert result.returncode == 0, result.stderr
    export_backbone(run / "checkpoint.pth", tmp_path / "fresh.safetensors")
    assert out.read_bytes() == (tmp_path / "fresh.safetensors").read_bytes()
    assert not list(tmp_path.glob(".*"))  # no temporary file left


@contextmanager
def read_only_folder(path):
    """A read-only file system on `path` (root), else a folder without write permission."""
    if os.geteuid() == 0:
        with mounted_tmpfs(path, "ro,size=1m"):
            yield path
        return
    path.mkdir(mode=0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


def test_an_earlier_export_folder_is_replaced_only_with_force(run, tmp_path, capsys):
    checkpoint = run / "checkpoint.pth"
    out = tmp_path / "export"
    export_backbone(checkpoint, out)
    teacher = (out / "model.safetensors").read_bytes()
    assert main(["export", str(checkpoint), "--out", str(out), "--student"]) == 2
    assert f"--out {out} holds an earlier export: pass --force" in one_line_error(capsys)
    assert (out / "model.safetensors").read_bytes() == teacher
    assert main(["export", str(checkpoint), "--out", str(out), "--student", "--force"]) == 0
    export_backbone(checkpoint, tmp_path / "fresh", part="student")
    student = (tmp_path / "fresh" / "model.safetensors").read_bytes()
    assert (out / "model.safetensors").read_bytes() == student != teacher
    assert sorted(os.listdir(tmp_path)) == ["export", "fresh"]  # no temporary or old folder left


def test_export_never_replaces_a_folder_holding_more_than_an_export(run, tmp_path, capsys):
    before = sorted(os.listdir(run))
    for force in ([], ["--force"]):  # the run's own folder: its checkpoints, config, logs
        assert main(["export", str(run / "checkpoint.pth"), "--out", str(run), *force]) == 2
        err = one_line_error(capsys)
        assert f"--out {run} is a folder holding more than an export (" in err
        assert "checkpoint.pth" in err and "not even with --force" in err
    assert sorted(os.listdir(run)) == before
    out = tmp_path / "export"
    export_backbone(run / "checkpoint.pth", out)
    assert main(["export", str(out), "--out", str(out), "--force"]) == 2
    assert f"--out {out} is the folder being exported" in one_line_error(capsys)


def test_export_to_an_unwritable_place_is_one_line_and_leaves_nothing(run, tmp_path, capsys):
    checkpoint = run / "checkpoint.pth"
    with read_only_folder(tmp_path / "read_only") as read_only:
        for out in (read_only / "b.pth", read_only / "export"):
            assert main(["export", str(checkpoint), "--out", str(out)]) == 2
            assert f"--out {out}: cannot write it (" in one_line_error(capsys)
        assert list(read_only.iterdir()) == []
    with mounted_tmpfs(tmp_path / "full", "size=64k") as full:  # smaller than the backbone
        for out in (full / "b.pth", full / "export"):
            assert main(["export", str(checkpoint), "--out", str(out)]) == 2
            assert "cannot write it (No space left on device)" in one_line_error(capsys)
        assert list(full.iterdir()) == []  # the partial temporary file or folder is removed


def test_a_failed_export_leaves_the_earlier_export_folder_whole(run, tmp_path, capsys):
    with mounted_tmpfs(tmp_path / "full", "size=1m") as full:
        out = full / "export"
        export_backbone(run / "checkpoint.pth", out)
        before = {name: (out / name).read_bytes() for name in os.listdir(out)}
        fill(full)  # the new folder is written beside the old one: it cannot fit now
        args = ["export", str(run / "checkpoint.pth"), "--out", str(out), "--student", "--force"]
        assert main(args) == 2
        assert "cannot write it (No space left on device)" in one_line_error(capsys)
        assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
        assert sorted(os.listdir(full)) == ["export", "filler"]
