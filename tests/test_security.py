"""No code from a checkpoint: every `.pth` is read weights-only (ssl_kd/safe_load.py), and a
file that would run code when unpickled is refused in one line by real `ssl-kd` processes
(eval, export, train resuming, train initialising from it), with nothing executed."""

import argparse
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_kd.engine.checkpoint import load_checkpoint, rng_state, set_rng_state
from ssl_kd.engine.trainer import train
from ssl_kd.errors import UserError
from ssl_kd.models.weights import read_backbone_weights
from ssl_kd.safe_load import load_weights_only
from tests.helpers import (
    REPO,
    TINY_VIT,
    run_cli,
    tiny_backbone,
    tiny_config,
    tiny_overrides,
    write_malicious_checkpoint,
)

TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", str(TINY_VIT)]


def assert_refused_in_one_line(result, path):
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("ssl-kd: error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert f"{path} was not loaded: it needs posix.system" in result.stderr
    assert "could run code" in result.stderr


@pytest.fixture
def malicious(tmp_path):
    """(file, marker): the file creates the marker when unpickled."""
    path, marker = tmp_path / "dino_vits16.pth", tmp_path / "PWNED"
    write_malicious_checkpoint(path, marker)
    return path, marker


def test_eval_and_export_refuse_a_malicious_file_and_run_nothing(tmp_path, malicious):
    path, marker = malicious
    knn = run_cli("eval", "knn", path, *TINY, "--ks", "5", "--img-size", "32", timeout=180)
    assert_refused_in_one_line(knn, path)
    out = tmp_path / "backbone.safetensors"
    export = run_cli("export", path, "--out", out, timeout=180)
    assert_refused_in_one_line(export, path)
    assert not marker.exists() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file either


def test_a_pickle_protocol_above_2_is_refused_in_one_line_too(tmp_path):
    path, marker = tmp_path / "protocol4.pth", tmp_path / "PWNED"
    write_malicious_checkpoint(path, marker, pickle_protocol=4)
    result = run_cli("export", path, "--out", tmp_path / "backbone.pth", timeout=180)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1  # torch's protocol warning is not a second line
    assert f"{path} is not a readable PyTorch checkpoint (UnpicklingError: " in result.stderr
    assert not marker.exists() and not (tmp_path / "backbone.pth").exists()


def test_train_refuses_a_malicious_checkpoint_to_resume_or_start_from(tmp_path, malicious):
    path, marker = malicious
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth").write_bytes(path.read_bytes())
    resumed = run_cli("train", config, *tiny_overrides(run), timeout=180)
    assert_refused_in_one_line(resumed, run / "checkpoint.pth")
    initialised = run_cli(
        "train", config, *tiny_overrides(tmp_path / "fresh"), f"model.checkpoint={path}",
        timeout=180,
    )  # fmt: skip
    assert_refused_in_one_line(initialised, path)
    assert not marker.exists()
    # nothing but the planted file (and the run lock, emptied when the refused run ended)
    assert sorted(p.name for p in run.iterdir() if p.name != ".lock") == ["checkpoint.pth"]


def test_no_loader_in_ssl_kd_can_run_code():
    """The grep a hostile user would run: torch.load only in ssl_kd/safe_load.py, always with
    weights_only=True, and no other unpickler anywhere in the package."""
    sources = {p: p.read_text() for p in (REPO / "ssl_kd").rglob("*.py")}
    assert not [p for p, text in sources.items() if "weights_only=False" in text]
    loaders = {p.name for p, text in sources.items() if "torch.load(" in text}
    assert loaders == {"safe_load.py"}
    calls = re.findall(r"torch\.load\((.*)\)", sources[REPO / "ssl_kd" / "safe_load.py"])
    assert calls and all("weights_only=True" in call for call in calls)
    assert not [p for p, text in sources.items() if re.search(r"\bpickle\.loads?\(", text)]


def test_an_ssl_kd_checkpoint_holds_only_tensors_and_plain_types(tmp_path):
    train(tiny_config(tmp_path, **{"train.max_steps": 1}))
    path = tmp_path / "checkpoint.pth"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    state = load_checkpoint(path)
    assert isinstance(state["rng"]["numpy"]["state"]["key"], list)  # numpy's key, plain ints


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save({"rng": rng_state()}, tmp_path / "rng.pth")
    expected = (random.random(), np.random.standard_normal(3), torch.rand(3))
    set_rng_state(load_weights_only(tmp_path / "rng.pth")["rng"])
    drawn = (random.random(), np.random.standard_normal(3), torch.rand(3))
    assert drawn[0] == expected[0] and np.array_equal(drawn[1], expected[1])
    assert torch.equal(drawn[2], expected[2])


def test_a_checkpoint_of_an_older_ssl_kd_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "checkpoint.pth"
    rng = {"numpy": np.random.get_state()}  # an array: how ssl_kd saved it before
    torch.save({"method": {}, "optimizer": {}, "step": 3, "config": {}, "rng": rng}, path)
    with pytest.raises(UserError, match=r"needs numpy\..*_reconstruct.*older ssl_kd.*--overwrite"):
        load_checkpoint(path)


DINO_ARGS = argparse.Namespace(
    arch="vit_small", patch_size=16, lr=0.0005, global_crops_scale=(0.4, 1.0), output_dir="/out"
)


def official_dino_full_checkpoint(teacher):
    """facebookresearch/dino's checkpoint.pth as main_dino.py writes it: `args` is the argparse
    Namespace, and the optimizer's lr and weight decay are numpy.float64 (set from numpy
    schedules each iteration)."""
    backbone = {f"backbone.{k}": v.clone() for k, v in teacher.vit.state_dict().items()}
    optimizer = torch.optim.AdamW(teacher.parameters()).state_dict()
    for group in optimizer["param_groups"]:
        group["lr"], group["weight_decay"] = np.float64(5e-4), np.float64(0.04)
    return {
        "student": {f"module.{k}": v for k, v in backbone.items()},
        "teacher": backbone,
        "optimizer": optimizer,
        "epoch": 100,
        "args": DINO_ARGS,
        "dino_loss": {"center": torch.zeros(1, 16)},
        "fp16_scaler": torch.amp.GradScaler("cpu").state_dict(),
    }  # fmt: skip


@pytest.mark.parametrize("numpy_module", ["numpy._core", "numpy.core"])
def test_an_official_dino_checkpoint_still_loads(tmp_path, numpy_module):
    """Written by numpy 2 (`numpy._core`) or, as the released files were, numpy 1
    (`numpy.core`): the pickle names the scalar constructor by its module of the day."""
    teacher = tiny_backbone()
    path = tmp_path / "dino_full_checkpoint.pth"
    torch.save(official_dino_full_checkpoint(teacher), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert b"numpy._core.multiarray\nscalar" in data
    path.write_bytes(
        data.replace(b"numpy._core.multiarray\n", f"{numpy_module}.multiarray\n".encode())
    )
    weights = read_backbone_weights(path)
    assert weights.layout == "official DINO checkpoint (teacher)"
    assert weights.args == DINO_ARGS
    for key, value in teacher.vit.state_dict().items():
        assert torch.equal(weights.state[key], value), key


def test_the_official_allow_list_is_not_used_for_ssl_kd_checkpoints(tmp_path):
    """A run's checkpoint.pth needs no allow-list, so it gets none: a Namespace is refused."""
    path = tmp_path / "checkpoint.pth"
    state = {"method": {}, "optimizer": {}, "step": 1, "config": {}}
    torch.save({**state, "args": argparse.Namespace(a=1)}, path)
    with pytest.raises(
        UserError, match=r"checkpoint.pth was not loaded: it needs argparse.Namespace"
    ):
        load_checkpoint(path)


def test_read_backbone_weights_refuses_objects_outside_the_allow_list(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"model": {"pos_embed": torch.zeros(1)}, "where": Path("/data")}, path)
    with pytest.raises(UserError, match=r"weights.pth was not loaded: it needs pathlib[\w.]*Path"):
        read_backbone_weights(path)
