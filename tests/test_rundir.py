"""Output-dir safety: another config never silently continues or replaces a saved run, from the
first step on; the data may move but not change its order; --overwrite clears the whole run."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ssl_kd.cli import main
from ssl_kd.engine.checkpoint import load_checkpoint
from ssl_kd.engine.rundir import trim_metrics
from ssl_kd.engine.trainer import train
from tests.helpers import (
    kill_after_step,
    start_cli,
    tiny_config,
    tiny_overrides,
    write_digit_folder,
)


def args(tmp_path, run, *extra):
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    return ["train", str(config), *tiny_overrides(run, **{"train.max_steps": 3}), *extra]


def test_different_config_is_refused_naming_the_keys(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, **{"train.max_steps": 2}))
    before = (run / "checkpoint.pth").read_bytes()
    assert main(args(tmp_path, run, "data.hflip_prob=0.25", "masking.keep_ratio=0.75")) == 2
    err = capsys.readouterr().err
    assert f"output_dir {run} holds another run (checkpoint.pth at step 2)" in err
    assert "masking.keep_ratio=0.75 here vs 0.5 saved" in err
    assert "data.hflip_prob=0.25 here vs 0.5 saved" in err
    assert "--resume" in err and "--overwrite" in err and err.count("\n") == 1
    assert (run / "checkpoint.pth").read_bytes() == before


def test_resume_continues_the_saved_run_with_its_config(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, **{"train.max_steps": 2}))
    assert main(args(tmp_path, run, "masking.keep_ratio=0.75", "optim.lr=0.01", "--resume")) == 0
    out = capsys.readouterr().out
    assert "--resume: continuing the saved run" in out and "at step 2" in out
    assert "optim.lr changed 0.0005 → 0.01 on resume" in out  # retunable: the new value wins
    state = load_checkpoint(run / "checkpoint.pth")
    assert state["step"] == 3 and state["config"]["masking"]["keep_ratio"] == 0.5
    assert state["config"]["optim"]["lr"] == 0.01


def test_overwrite_clears_the_whole_run_and_keeps_other_files(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, **{"train.max_steps": 2, "train.checkpoint_every_steps": 1}))
    (run / "eval").mkdir()  # what `ssl-kd eval knn RUN/checkpoint.pth` writes by default
    (run / "eval" / "knn_eval.json").write_text("{}")
    (run / "notes.txt").write_text("a user's file, not the run's")
    assert (run / "logs" / "rank0.log").is_file()
    capsys.readouterr()
    assert main(args(tmp_path, run, "optim.lr=0.01", "--overwrite")) == 0
    out = capsys.readouterr().out
    assert (
        "--overwrite: removed checkpoint.pth, metrics.jsonl, summary.json, config.yaml, "
        "checkpoint-000001.pth, checkpoint-000002.pth, tb/, logs/, eval/ from "
        f"{run}; kept notes.txt (not written by ssl-kd)"
    ) in out
    state = load_checkpoint(run / "checkpoint.pth")
    assert state["step"] == 3 and state["config"]["optim"]["lr"] == 0.01
    # the old run's numbered copies (steps 1, 2) are gone
    assert sorted(p.name for p in run.glob("checkpoint-*.pth")) == ["checkpoint-000003.pth"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
    assert steps == [2, 3] and not (run / "eval").exists()
    assert (run / "logs" / "rank0.log").read_text().count("rank 0/1 on") == 1  # this run's
    assert (run / "notes.txt").read_text() == "a user's file, not the run's"


def test_same_config_resumes_and_operational_keys_may_change(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, **{"train.max_steps": 2}))
    assert main(args(tmp_path, run, "train.log_every_steps=1", "eval.knn_k=5")) == 0
    assert "resumed from" in capsys.readouterr().out


def test_trim_metrics_drops_unsaved_steps_and_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "a": 1}\n{"step": 4, "a": 2}\n{"step": 6, "a": 3}\n{"step": 8, "a')
    trim_metrics(path, 4)
    assert path.read_text() == '{"step": 2, "a": 1}\n{"step": 4, "a": 2}\n'


def test_config_is_compared_before_the_first_checkpoint(tmp_path, capsys):
    """Killed at step 8 with no checkpoint yet: another config is refused as after one, and the
    same config starts afresh without the killed run's metrics (jsonl and TensorBoard)."""
    run = tmp_path / "run"
    killed = start_cli(*args(tmp_path, run, "train.max_steps=200", "train.log_every_steps=1"),
                       env={"OMP_NUM_THREADS": "2"})  # fmt: skip
    kill_after_step(killed, run, 8)
    assert not (run / "checkpoint.pth").exists()

    assert main(args(tmp_path, run, "masking.keep_ratio=0.75")) == 2
    err = capsys.readouterr().err
    assert (
        f"output_dir {run} holds another run (config.yaml, stopped before its first "
        "checkpoint) whose config differs: masking.keep_ratio=0.75 here vs 0.5 saved"
    ) in err

    assert main(args(tmp_path, run, "train.log_every_steps=1")) == 0  # 3 steps, from step 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
    assert steps == [1, 2, 3]
    events = EventAccumulator(str(run / "tb"))
    events.Reload()  # TensorBoard's loader, which applies the purge to the killed run's events
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3]


def test_a_config_yaml_without_training_is_replaced(tmp_path):
    """A start that failed before training (no metrics.jsonl) left only config.yaml: a
    corrected command is not refused."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("masking:\n  keep_ratio: 0.9\n")
    train(tiny_config(run, **{"train.max_steps": 1}))
    assert load_checkpoint(run / "checkpoint.pth")["config"]["masking"]["keep_ratio"] == 0.5


def test_data_may_move_but_its_order_may_not_change(tmp_path, capsys):
    """data.path may change (here: the folder renamed, given with a trailing /): the number of
    images and batches per epoch must match; --resume keeps the new path."""
    first, moved = tmp_path / "data", tmp_path / "moved"
    write_digit_folder(first)  # 12 images, batch 4: 3 batches per epoch
    folder = {"data.name": "imagefolder", "data.transform": "lightly", "data.num_workers": 0,
              "train.batch_size": 4}  # fmt: skip
    run = tmp_path / "run"
    train(tiny_config(run, **{**folder, "data.path": first, "train.max_steps": 2}))
    first.rename(moved)
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")

    def command(path, steps, *extra):
        overrides = tiny_overrides(run, **{**folder, "data.path": path, "train.max_steps": steps})
        return ["train", str(config), *overrides, *extra]

    capsys.readouterr()
    assert main(command(f"{moved}/", 3)) == 0
    out = capsys.readouterr().out
    assert f"data.path changed: {moved}/ (the saved run read {first})" in out
    assert "at step 2" in out
    assert load_checkpoint(run / "checkpoint.pth")["config"]["data"]["path"] == f"{moved}/"

    # --resume restores the saved config's differing keys, never the old data.path
    assert main(command(moved, 4, "masking.keep_ratio=0.25", "--resume")) == 0
    state = load_checkpoint(run / "checkpoint.pth")
    assert state["step"] == 4 and state["data"]["images"] == 12
    assert state["config"]["masking"]["keep_ratio"] == 0.5
    assert state["config"]["data"]["path"] == str(moved)

    write_digit_folder(tmp_path / "other", per_class=5)  # 15 images, still 3 batches of 4
    capsys.readouterr()
    assert main(command(tmp_path / "other", 5)) == 2
    err = capsys.readouterr().err
    assert (
        f"the data (data.path={tmp_path / 'other'}) gives 15 images and 3 batches per epoch, the "
        f"run was saved with 12 images and 3 batches (data.path={moved})"
    ) in err
    assert "resumed data order differs" in err and err.count("\n") == 1


def test_a_finished_run_is_extended_by_a_larger_train_epochs(tmp_path, capsys):
    """DINO's users extend a finished run: train.epochs 2 → 3 in the same output dir trains
    steps 5..6 only, from the saved step, and every schedule from there on is the 3-epoch run's
    (recomputed for the new length, as official DINO does when restarted with a larger --epochs).
    The same config again trains nothing; fewer epochs than trained are refused."""
    write_digit_folder(tmp_path / "data")  # 12 images, batch 6: 2 steps per epoch
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")

    def command(run, epochs, *extra):
        overrides = tiny_overrides(
            run, **{"data.name": "imagefolder", "data.path": tmp_path / "data",
                    "data.transform": "lightly", "data.num_workers": 0, "train.batch_size": 6,
                    "train.epochs": epochs, "train.max_steps": "null", "train.log_every_steps": 1},
        )  # fmt: skip
        return ["train", str(config), *overrides, *extra]

    def logged(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").open()]

    run = tmp_path / "run"
    assert main(command(run, 2)) == 0
    first = logged(run)
    assert [line["step"] for line in first] == [1, 2, 3, 4]
    assert main(command(run, 2)) == 0  # finished, same config: no step trained, nothing lost
    assert logged(run) == first and load_checkpoint(run / "checkpoint.pth")["step"] == 4

    capsys.readouterr()
    assert main(command(run, 3)) == 0
    out = capsys.readouterr().out
    assert "train.epochs changed 2 → 3 on resume (from checkpoint.pth at step 4)" in out
    assert "recomputed for 3 epochs; training continues at step 4" in out
    assert f"resumed from {run / 'checkpoint.pth'} at step 4" in out
    extended = logged(run)
    assert [line["step"] for line in extended] == [1, 2, 3, 4, 5, 6]  # each step once
    assert extended[:4] == first
    state = load_checkpoint(run / "checkpoint.pth")
    assert (state["step"], state["epoch"], state["config"]["train"]["epochs"]) == (6, 3, 3)
    assert json.loads((run / "summary.json").read_text())["steps"] == 6

    straight = tmp_path / "straight"
    assert main(command(straight, 3)) == 0
    schedules = ("train/lr", "train/weight_decay", "method/momentum", "method/teacher_temp")
    reference = logged(straight)
    assert [line["train/lr"] for line in first] != [line["train/lr"] for line in reference[:4]]
    for ours, theirs in zip(extended[4:], reference[4:], strict=True):
        assert {k: ours[k] for k in schedules} == pytest.approx(
            {k: theirs[k] for k in schedules}, rel=1e-6
        )

    # --resume used to keep the saved epochs and train 0 steps: the new length wins there too
    assert main(command(run, 4, "masking.keep_ratio=0.75", "--resume")) == 0
    state = load_checkpoint(run / "checkpoint.pth")
    assert state["step"] == 8 and state["config"]["masking"]["keep_ratio"] == 0.5

    capsys.readouterr()
    assert main(command(run, 3)) == 2
    err = capsys.readouterr().err
    assert "train.epochs=3 ends at step 6, but the run in" in err and "has trained 8 steps" in err
    assert "train.epochs >= 4" in err and err.count("\n") == 1
    assert load_checkpoint(run / "checkpoint.pth")["step"] == 8
