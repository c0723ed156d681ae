"""Export: timm loads the file strictly; export never replaces its input, a training
checkpoint or (without --force) any existing file, and a failed write leaves nothing."""

import os
import shutil
import subprocess
from contextlib import contextmanager

import pytest
import timm
import torch

from ssl_kd.cli import main
from ssl_kd.engine.build import build_backbone
from ssl_kd.engine.checkpoint import CheckpointStore, load_checkpoint
from ssl_kd.engine.trainer import train
from ssl_kd.models.export import export_backbone
from ssl_kd.models.weights import load_backbone_weights
from tests.helpers import TINY_VIT, run_cli, tiny_config, tiny_overrides


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_export_loads_strictly_in_timm_with_identical_features(tmp_path, suffix):
    train(tiny_config(tmp_path / "run", **{"train.max_steps": 1}))
    out = tmp_path / f"backbone{suffix}"
    assert main(["export", str(tmp_path / "run" / "checkpoint.pth"), "--out", str(out)]) == 0
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=32,
        pretrained_cfg_overlay={"file": str(out)}, **TINY_VIT,
    ).eval()  # fmt: skip
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pth")["method"]
    assert torch.equal(model.cls_token, saved["teacher.backbone.vit.cls_token"])  # DINO: teacher
    x = torch.randn(2, 3, 32, 32)
    ours = build_backbone(tiny_config(tmp_path / "run")).eval()
    load_backbone_weights(ours, tmp_path / "run" / "checkpoint.pth")
    assert torch.allclose(model(x), ours(x).cls, atol=1e-6)


def test_export_rejects_a_bad_target(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x.bin")]) == 2
    assert "use a .safetensors or .pth" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- export never overwrites, never leaves a partial file ---------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    train(tiny_config(path, **{"train.max_steps": 1}))
    return path


def assert_one_line_exit_2(result, expected, code=2):
    assert result.returncode == code, result.stderr
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
def tmpfs(path, options):
    """A tmpfs mounted on `path` with `options` (root only; skips the test elsewhere)."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextmanager
def read_only_folder(path):
    """A read-only file system on `path` (root), else a folder without write permission."""
    if os.geteuid() == 0:
        with tmpfs(path, "ro,size=1m"):
            yield path
        return
    path.mkdir(mode=0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


def test_export_to_a_folder_or_an_unwritable_place_is_one_line_and_leaves_nothing(run, tmp_path):
    checkpoint = run / "checkpoint.pth"
    folder = tmp_path / "exports"
    folder.mkdir()
    result = run_cli("export", checkpoint, "--out", folder, timeout=180)
    assert_one_line_exit_2(result, f"--out {folder} is a directory: name a file in it")
    assert list(folder.iterdir()) == []
    with read_only_folder(tmp_path / "read_only") as read_only:
        result = run_cli("export", checkpoint, "--out", read_only / "b.pth", timeout=180)
        assert_one_line_exit_2(result, f"--out {read_only / 'b.pth'}: cannot write it (")
        assert list(read_only.iterdir()) == []
    with tmpfs(tmp_path / "full", "size=64k") as full:  # smaller than the backbone
        result = run_cli("export", checkpoint, "--out", full / "b.pth", timeout=180)
        # a full disk is the machine's state, not a bad command: exit 1, as in training
        assert_one_line_exit_2(result, "No space left on device; the previous b.pth", code=1)
        assert list(full.iterdir()) == []  # the partial temporary file is removed
