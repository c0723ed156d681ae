"""Faults a long run meets, with real processes and real files: SIGKILL mid-epoch and
mid-save, a NaN loss, corrupt images in an ImageFolder, runs of unreadable files and the
fraction of them that stops a run."""

import json
import math
import re
import signal

import pytest
import torch
from PIL import Image

from ssl_kd.cli import main
from ssl_kd.data import DataError, digits
from ssl_kd.engine.checkpoint import KILL_IN_SAVE_ENV, load_checkpoint
from ssl_kd.engine.trainer import Trainer, train
from ssl_kd.errors import RunFailed
from ssl_kd.schedules import cosine_schedule
from tests.helpers import (
    kill_and_resume,
    run_cli,
    start_cli,
    tiny_config,
    tiny_overrides,
    train_stream,
    write_digit_folder,
)

THREADS = {"OMP_NUM_THREADS": "2"}


def empty_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("{}\n")
    return str(path)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_optimizer(a, b):
    assert a["param_groups"] == b["param_groups"]
    for index, state in a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["state"][index][name]), (index, name)


# --- kill and resume ------------------------------------------------------------------------
def test_kill_during_save_keeps_the_previous_checkpoint_and_resumes_exactly(tmp_path):
    extra = {"train.max_steps": 6, "train.checkpoint_every_steps": 2}
    reference = train(tiny_config(tmp_path / "reference", **extra))
    assert reference["steps"] == 6

    run = tmp_path / "killed"
    args = ["train", empty_yaml(tmp_path), *tiny_overrides(run, **extra)]
    # The 2nd save (step 4) dies after its temporary file is complete, before the rename.
    killed = start_cli(*args, env={**THREADS, KILL_IN_SAVE_ENV: "2"})
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert load_checkpoint(run / "checkpoint.pth")["step"] == 2  # the previous one, intact
    stale = list(run.glob(".checkpoint.pth.tmp-*"))
    assert len(stale) == 1 and load_checkpoint(stale[0])["step"] == 4  # never renamed

    resumed = start_cli(*args, env=THREADS)  # the same command
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in out and "at step 2" in out
    assert not list(run.glob(".checkpoint.pth.tmp-*"))
    final = load_checkpoint(run / "checkpoint.pth")
    expected = load_checkpoint(tmp_path / "reference" / "checkpoint.pth")
    assert final["step"] == 6
    assert_same_state(final["method"], expected["method"])  # bitwise, teacher and center too
    assert_same_optimizer(final["optimizer"], expected["optimizer"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dino", "mae"])
def test_sigkill_mid_epoch_then_same_command_reaches_the_same_weights(tmp_path, method):
    extra = {
        "method": method,
        "train.max_steps": 12,
        "train.checkpoint_every_steps": 3,
        "train.log_every_steps": 1,
    }
    if method == "mae":
        extra.update({"masking.keep_ratio": 0.25, "dmae.decoder_dim": 32, "dmae.decoder_depth": 1,
                      "dmae.decoder_heads": 2, "dmae.norm_pix_loss": False})  # fmt: skip
    train(tiny_config(tmp_path / "reference", **extra))

    run = tmp_path / "killed"
    args = ["train", empty_yaml(tmp_path), *tiny_overrides(run, **extra)]
    saved = kill_and_resume(args, run, 5, env=THREADS)  # killed between checkpoints
    assert 3 <= saved < 12 and saved % 3 == 0  # mid-epoch (44 steps per epoch)
    final = load_checkpoint(run / "checkpoint.pth")
    expected = load_checkpoint(tmp_path / "reference" / "checkpoint.pth")
    assert_same_state(final["method"], expected["method"])
    assert_same_optimizer(final["optimizer"], expected["optimizer"])
    assert final["rng"]["torch"].equal(expected["rng"]["torch"])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # the killed run's unsaved steps are logged once


def test_checkpoint_holds_everything_a_resume_needs(tmp_path):
    train(tiny_config(tmp_path, **{"train.max_steps": 2, "dino.batch_norm": True}))
    state = load_checkpoint(tmp_path / "checkpoint.pth")
    assert {"method", "optimizer", "step", "config", "rng", "data", "faults"} <= state.keys()
    assert {"python", "numpy", "torch"} <= state["rng"].keys()
    assert state["data"] == {"batch": 2, "steps_per_epoch": 44, "images": 1437, "bad_files": []}
    keys = state["method"].keys()
    assert "loss_fn.center" in keys  # the DINO center
    assert any(k.startswith("teacher.head.") for k in keys)
    assert any(k.startswith("student.head.") and "running_mean" in k for k in keys)


# --- non-finite loss ------------------------------------------------------------------------
def test_nan_stops_naming_step_and_terms_and_keeps_the_checkpoint(tmp_path):
    extra = {"train.max_steps": 4, "train.checkpoint_every_steps": 2, "dino.koleo_weight": 0.1}
    cfg = tiny_config(tmp_path, **extra, **{"train.debug_nan_at_steps": "[3]"})
    with pytest.raises(FloatingPointError) as err:
        train(cfg)
    message = str(err.value)
    assert "loss is nan at step 3 (epoch 0; terms: dino_loss=nan, koleo_loss=nan)" in message
    assert "last good state" in message
    state = load_checkpoint(tmp_path / "checkpoint.pth")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())


def test_cli_nan_stop_is_one_line_with_exit_1(tmp_path, capsys):
    overrides = tiny_overrides(tmp_path / "run", **{"train.debug_nan_at_steps": "[0]"})
    assert main(["train", empty_yaml(tmp_path), *overrides]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ssl-kd: error: loss is nan at step 0") and err.count("\n") == 1


def test_skipped_nan_step_changes_nothing(tmp_path):
    # Skipping step 2 of 3 must leave exactly the state after 2 steps: weights, teacher, DINO
    # center, BatchNorm statistics, optimizer moments.
    common = {"dino.batch_norm": True, "train.on_nonfinite": "skip"}
    before = train(tiny_config(tmp_path / "two", **common, **{"train.max_steps": 2}))
    skipped = train(tiny_config(tmp_path / "skip", **common, **{"train.max_steps": 3,
                                "train.debug_nan_at_steps": "[2]"}))  # fmt: skip
    assert before["skipped_steps"] == [] and skipped["skipped_steps"] == [2]
    a = load_checkpoint(tmp_path / "two" / "checkpoint.pth")
    b = load_checkpoint(tmp_path / "skip" / "checkpoint.pth")
    assert b["step"] == 3 and b["faults"] == {"skipped_steps": [2]}
    assert_same_state(a["method"], b["method"])
    assert_same_optimizer(
        a["optimizer"] | {"param_groups": []}, b["optimizer"] | {"param_groups": []}
    )


def test_skips_beyond_the_bound_stop_the_run(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.on_nonfinite": "skip", "train.max_skipped_steps": 1,
                                   "train.debug_nan_at_steps": "[1, 2]"})  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"at step 2 .*train.max_skipped_steps=1"):
        train(cfg)


def test_the_nan_advice_can_be_followed_a_lower_lr_resumes(tmp_path, capsys):
    """The stop message says: the same command with a lower optim.lr resumes. It does, with the
    new lr in use from the saved step on and the change logged."""
    run, config = tmp_path / "run", empty_yaml(tmp_path)
    extra = {"train.max_steps": 6, "train.checkpoint_every_steps": 2}
    command = ["train", config, *tiny_overrides(run, **extra)]
    assert main([*command, "train.debug_nan_at_steps=[3]"]) == 1
    err = capsys.readouterr().err
    assert "run the same command with a lower optim.lr" in err and "resume" in err

    assert main([*command, "optim.lr=0.00025"]) == 0  # the divergence is gone at this lr
    out = capsys.readouterr().out
    assert "optim.lr changed 0.0005 → 0.00025 on resume" in out
    assert "at step 2" in out
    state = load_checkpoint(run / "checkpoint.pth")
    assert state["step"] == 6 and state["config"]["optim"]["lr"] == 0.00025
    # 32 images per step, 44 steps per epoch, 1 warm-up epoch of 2: the new schedule
    lr = cosine_schedule(0.00025 * 32 / 256, 1e-6, 88, 44)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {line["step"]: line["train/lr"] for line in lines}
    assert logged[4] == pytest.approx(float(lr[3])) and logged[6] == pytest.approx(float(lr[5]))


def test_skip_mode_stops_at_once_when_the_weights_are_not_finite(tmp_path):
    # Before, every allowed skip was spent on a state no step can repair.
    cfg = tiny_config(tmp_path, **{"train.on_nonfinite": "skip", "train.max_steps": 4})
    trainer = Trainer(cfg)
    with torch.no_grad():
        trainer.method.student.backbone.vit.blocks[1].mlp.fc1.weight[0, 0] = math.inf
    with pytest.raises(RunFailed) as err:
        trainer.fit()
    message = str(err.value)
    assert "loss is nan at step 0" in message
    assert "student.backbone.vit.blocks.1.mlp.fc1.weight holds NaN/Inf" in message
    assert "skipping cannot recover" in message and trainer.guard.skipped_steps == []


def test_a_non_finite_state_is_never_saved(tmp_path):
    train(tiny_config(tmp_path, **{"train.max_steps": 2}))
    before = (tmp_path / "checkpoint.pth").read_bytes()
    trainer = Trainer(tiny_config(tmp_path, **{"train.max_steps": 4}))
    assert trainer.resume()
    with torch.no_grad():  # what an update from an infinite gradient leaves
        trainer.method.teacher.head.last_layer.weight_v.fill_(math.nan)
    with pytest.raises(RunFailed, match=r"teacher.head.last_layer.weight_v holds NaN/Inf"):
        trainer.save()
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pth")) == ["checkpoint-000002.pth"]


def test_skipping_never_prunes_the_last_checkpoint_before_the_first_skip(tmp_path):
    extra = {"train.on_nonfinite": "skip", "train.keep_checkpoints": 1,
             "train.checkpoint_every_steps": 1, "train.debug_nan_at_steps": "[2]"}  # fmt: skip
    train(tiny_config(tmp_path, **extra, **{"train.max_steps": 4}))
    numbered = sorted(p.name for p in tmp_path.glob("checkpoint-*.pth"))
    # step 2 holds steps 0 and 1: the state before the skipped step 2
    assert numbered == ["checkpoint-000002.pth", "checkpoint-000004.pth"]
    assert load_checkpoint(tmp_path / numbered[0])["faults"] == {"skipped_steps": []}
    train(tiny_config(tmp_path, **extra, **{"train.max_steps": 5}))  # resumed: still kept
    numbered = sorted(p.name for p in tmp_path.glob("checkpoint-*.pth"))
    assert numbered == ["checkpoint-000002.pth", "checkpoint-000005.pth"]


# --- bad data -------------------------------------------------------------------------------
def corrupt_image_folder(root):
    """12 good PNGs in 3 classes plus 3 bad files: truncated JPEG and PNG, text named .jpg."""
    write_digit_folder(root)
    jpeg = root / "class_0" / "truncated.jpg"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    png = root / "class_1" / "truncated.png"
    Image.new("RGB", (32, 32), (10, 200, 10)).save(png)
    png.write_bytes(png.read_bytes()[:60])
    text = root / "class_2" / "notes.jpg"
    text.write_text("this is not an image\n")
    return sorted(str(p) for p in (jpeg, png, text))


def folder_overrides(data, **extra):
    return {"data.name": "imagefolder", "data.path": str(data), "data.transform": "lightly",
            "data.num_workers": 0, "train.batch_size": 5, **extra}  # fmt: skip


def test_corrupt_images_are_skipped_logged_once_and_counted(tmp_path, capfd):
    bad = corrupt_image_folder(tmp_path / "data")
    # 15 files, batch 5: every file is read in each of the 2 epochs. 3 of 15 unreadable:
    # exactly the fraction allowed (more would stop the run).
    extra = {"train.max_steps": 6, "train.log_every_steps": 3, "data.max_bad_fraction": 0.2}
    cfg = tiny_config(tmp_path / "run", **folder_overrides(tmp_path / "data", **extra))
    summary = train(cfg)
    assert summary["steps"] == 6 and summary["skipped_images"] == bad
    err = capfd.readouterr().err
    for path in bad:
        assert err.count(f"cannot read image {path}") == 1, err
    assert "checkpoint is kept" not in err  # training goes on: nothing stopped
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert lines[-1]["method/skipped_images"] == 3
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["data"]["bad_files"] == bad


def test_corrupt_image_with_on_error_error_stops_naming_it(tmp_path, capsys):
    bad = corrupt_image_folder(tmp_path / "data")
    overrides = tiny_overrides(
        tmp_path / "run", **folder_overrides(tmp_path / "data", **{"data.on_error": "error"})
    )
    assert main(["train", empty_yaml(tmp_path), *overrides]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert any(f"cannot read image {path}" in err for path in bad)
    assert "data.on_error=skip" in err and "resumes from the last checkpoint" in err
    with pytest.raises(DataError):  # and from the library: a DataError naming the file
        train(tiny_config(tmp_path / "run2", **folder_overrides(
            tmp_path / "data", **{"data.on_error": "error"})))  # fmt: skip


def flat_digits(folder, count):
    """`count` digits PNGs (32×32 RGB) in one flat folder: digit_000.png, digit_001.png, ..."""
    folder.mkdir(parents=True)
    for i, image in enumerate(digits(0)[0][:count]):
        array = (image.permute(1, 2, 0) * 255).byte().numpy()
        Image.fromarray(array).save(folder / f"digit_{i:03d}.png")


def zero_byte_files(folder, count):
    """An interrupted copy: `count` empty files with image names, sorted after the digits."""
    paths = [folder / f"partial_{i:02d}.png" for i in range(count)]
    for path in paths:
        path.write_bytes(b"")
    return paths


def test_any_number_of_unreadable_files_in_a_row_is_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    flat_digits(data, 200)
    huge = data / "huge.png"  # 14000² px, over PIL's 89.5 Mpx limit; 24 KB as a 1-bit PNG
    Image.new("1", (14000, 14000)).save(huge)
    bad = sorted(map(str, [huge, *zero_byte_files(data, 20)]))
    # 221 files: digit_*, huge, partial_*: 21 unreadable in a row (9.5%, under the default
    # data.max_bad_fraction=0.1); one batch of 221 reads every file once.
    overrides = tiny_overrides(tmp_path / "run", **folder_overrides(data, **{
        "train.batch_size": 221, "train.max_steps": 1, "data.num_workers": 1}))  # fmt: skip
    result = run_cli("train", empty_yaml(tmp_path), *overrides, env=THREADS)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["skipped_images"] == bad
    assert result.stderr.count("skipping unreadable image") == 21
    assert f"{huge}: 196000000 px is over PIL's limit of 89478485 pixels" in result.stderr
    assert "Traceback" not in result.stderr
    layout = f"data.path {data}: flat folder, 221 images (221 at the top, 0 in sub-folders)"
    assert result.stdout.count("data.path") == 1 and layout in result.stdout


@pytest.mark.slow  # two `ssl-kd train` processes
def test_more_unreadable_files_than_max_bad_fraction_stop_the_run_naming_them(tmp_path):
    data = tmp_path / "data"
    flat_digits(data, 40)
    bad = sorted(map(str, zero_byte_files(data, 10)))  # 10 of 50: 20%
    run = tmp_path / "run"
    extra = {"train.max_steps": 10, "train.checkpoint_every_steps": 1, "data.num_workers": 1}
    args = ["train", empty_yaml(tmp_path), *tiny_overrides(run, **folder_overrides(data, **extra))]
    stopped = run_cli(*args, env=THREADS)
    assert stopped.returncode == 1
    assert "Traceback" not in stopped.stderr and "DataLoader worker" not in stopped.stderr
    message = stopped.stderr.splitlines()[-1]
    count = int(re.match(r"ssl-kd: error: (\d+) of the 50 images are unreadable", message)[1])
    assert 5 < count <= 10 and f"({count / 50:.1%}), more than data.max_bad_fraction=0.1" in message
    assert f"{bad[0]}, {bad[1]}, {bad[2]} and {count - 3} more" in message
    assert "rerun with data.max_bad_fraction raised" in message
    saved_at = load_checkpoint(run / "checkpoint.pth")["step"]
    assert 0 < saved_at < 10  # the run stopped mid-epoch, after some checkpoints

    # The advice works: the same command with the fraction raised resumes and trains on.
    resumed = run_cli(*args, "data.max_bad_fraction=0.5", env=THREADS)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run / 'checkpoint.pth'} at step {saved_at}" in resumed.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["skipped_images"] == bad


@pytest.mark.parametrize("max_bad_fraction", [1.0, 0.1])
def test_the_search_for_a_readable_image_ends_when_there_is_none(tmp_path, max_bad_fraction):
    data = tmp_path / "data"
    data.mkdir()
    bad = sorted(map(str, zero_byte_files(data, 8)))
    cfg = tiny_config(tmp_path / "run", **folder_overrides(data, **{
        "train.batch_size": 4, "data.num_workers": 1,
        "data.max_bad_fraction": max_bad_fraction}))  # fmt: skip
    with pytest.raises(DataError) as err:
        next(train_stream(cfg).epoch(0))
    message = str(err.value)
    assert "\n" not in message  # one line: the message, not the worker's traceback
    if max_bad_fraction == 1.0:  # every file may be bad: stops once each was tried
        assert message.startswith("no readable image in the data set: all 8 files tried")
    else:  # 0 of 8 may be bad: the first batch (4 files) stops the run
        assert message.startswith("4 of the 8 images are unreadable (50.0%), more than")
    assert err.value.path in bad


@pytest.mark.parametrize("layout", ["missing", "empty", "empty_classes"])
def test_missing_or_empty_data_folder_fails_before_training(tmp_path, capsys, layout):
    data = tmp_path / "data"
    if layout != "missing":
        data.mkdir()
    if layout == "empty_classes":
        (data / "class_0").mkdir()
        (data / "class_0" / "readme.txt").write_text("no images here")
    overrides = tiny_overrides(tmp_path / "run", **folder_overrides(data))
    assert main(["train", empty_yaml(tmp_path), *overrides]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_image_batches_depend_only_on_epoch_and_batch_index(tmp_path):
    # What makes a resume of an ImageFolder run exact: the crops of batch k are the same
    # whether the epoch starts at 0 or at k, and whichever worker builds them.
    write_digit_folder(tmp_path / "data")
    cfg = tiny_config(tmp_path / "run", **folder_overrides(tmp_path / "data",
                                                           **{"train.batch_size": 4}))  # fmt: skip
    stream = train_stream(cfg)
    full = list(stream.epoch(1))
    resumed = list(stream.epoch(1, start_batch=2))
    assert len(full) == 3 and len(resumed) == 1
    assert all(torch.equal(a, b) for a, b in zip(full[2], resumed[0], strict=True))
    stream.num_workers = 2
    with_workers = list(stream.epoch(1))
    for a, b in zip(full, with_workers, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    other_epoch = next(stream.epoch(0))
    assert not torch.equal(other_epoch[0], full[0][0])
