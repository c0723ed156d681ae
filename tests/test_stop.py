"""SIGTERM, as schedulers send it before SIGKILL (ssl_kd/engine/stop.py): a final checkpoint at
the next step boundary, exit status 143 with one line, and the same command resumes there."""

import json
import os
import signal

import pytest

from ssl_kd.cli import main
from ssl_kd.engine.checkpoint import load_checkpoint
from tests.helpers import start_cli, tiny_overrides, wait_for_step, write_digit_folder

THREADS = {"OMP_NUM_THREADS": "2"}


def logged_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]


def sigterm_then_resume(tmp_path, capsys, extra, *, group=False):
    """Starts a run, SIGTERMs it (its process group with `group`) once step 3 is logged,
    checks the stop, then runs the same command (in this process) to 2 steps further."""
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    base = {"train.epochs": 100, "train.max_steps": 200, "train.log_every_steps": 1, **extra}
    process = start_cli("train", config, *tiny_overrides(run, **base), env=THREADS,
                        new_session=group)  # fmt: skip
    wait_for_step(process, run, 3)
    if group:  # what Slurm does: every process of the step, DataLoader workers included
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    state = load_checkpoint(run / "checkpoint.pth")
    stopped = state["step"]
    assert 3 <= stopped < 200  # no periodic checkpoint before step 1000: this is the final save
    assert f"SIGTERM: stopped after step {stopped} of 200, saved in {run / 'checkpoint.pth'}" in err
    assert logged_steps(run)[-1] == stopped  # the last step is logged before the save

    again = {**base, "train.max_steps": stopped + 2}
    assert main(["train", str(config), *tiny_overrides(run, **again)]) == 0  # 2 steps further
    assert f"resumed from {run / 'checkpoint.pth'} at step {stopped}" in capsys.readouterr().out
    assert logged_steps(run) == list(range(1, stopped + 3))
    assert load_checkpoint(run / "checkpoint.pth")["step"] == stopped + 2


def test_sigterm_saves_at_the_next_step_and_exits_143(tmp_path, capsys):
    sigterm_then_resume(tmp_path, capsys, {"train.checkpoint_every_steps": 1000})


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_dataloader_workers(tmp_path, capsys):
    """Workers get SIGTERM too: they must not die and fail the batch before the final save.
    (15 batches per epoch: the stop comes while workers still load the epoch's batches.)"""
    write_digit_folder(tmp_path / "data", per_class=20)
    sigterm_then_resume(
        tmp_path,
        capsys,
        {"train.checkpoint_every_steps": 1000, "data.name": "imagefolder",
         "data.path": tmp_path / "data", "data.transform": "lightly", "data.num_workers": 2,
         "train.batch_size": 4},
        group=True,
    )  # fmt: skip
