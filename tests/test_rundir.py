"""Output-dir safety: another config never silently continues or replaces a saved run."""

import json

from ssl_kd.cli import main
from ssl_kd.engine.checkpoint import load_checkpoint
from ssl_kd.engine.rundir import trim_metrics
from ssl_kd.engine.trainer import train
from tests.helpers import tiny_config, tiny_overrides


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


def test_overwrite_starts_the_new_run_from_zero(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, **{"train.max_steps": 2, "train.checkpoint_every_steps": 1}))
    (run / "eval").mkdir()  # not the run's own output: kept
    assert main(args(tmp_path, run, "optim.lr=0.01", "--overwrite")) == 0
    assert "--overwrite: removed" in capsys.readouterr().out
    state = load_checkpoint(run / "checkpoint.pth")
    assert state["step"] == 3 and state["config"]["optim"]["lr"] == 0.01
    # the old run's numbered copies (steps 1, 2) are gone
    assert sorted(p.name for p in run.glob("checkpoint-*.pth")) == ["checkpoint-000003.pth"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
    assert steps == [2, 3] and (run / "eval").is_dir()


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
