"""Launching on a real Slurm (tests/slurm_cluster.py): `ssl-kd submit`, requeue, example.sbatch.

Each job trains tiny DINO with 2 CPU tasks (gloo), as a GPU job would with 2 GPUs.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ssl_kd.engine.checkpoint import load_checkpoint
from tests.helpers import REPO, run_cli, tiny_overrides
from tests.slurm_cluster import LocalSlurm

pytestmark = pytest.mark.slurm


def submit(cluster: LocalSlurm, output_dir: Path, **values: object) -> str:
    """`ssl-kd submit` of tiny DINO on 2 CPU tasks; returns the job id."""
    config = output_dir.with_suffix(".yaml")
    config.write_text("method: dino\n")
    overrides = tiny_overrides(output_dir, **{"model.drop_path_rate": 0.0, **values})
    args = [
        "submit", str(config), *overrides, "--gpus-per-node", "0",
        "--tasks-per-node", "2", "--cpus-per-task", "1", "--partition", cluster.partition,
        "--timeout-min", "20",
    ]  # fmt: skip
    result = run_cli(*args, env=cluster.env, timeout=None, cwd=REPO)
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"job id: (\d+)", result.stdout)
    assert job_id, result.stdout
    assert f"output dir: {output_dir}" in result.stdout
    assert re.search(rf"job folder: {output_dir}/submitit/{job_id.group(1)}", result.stdout)
    return job_id.group(1)


def job_output(output_dir: Path, job_id: str) -> str:
    folder = output_dir / "submitit" / job_id
    return "\n".join(p.read_text() for p in sorted(folder.glob("*_log.*")))


def logged_steps(output_dir: Path) -> list[int]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record["step"] for record in map(json.loads, lines) if "train/loss" in record]


def test_submit_trains_and_leaves_checkpoint_and_events(slurm: LocalSlurm, tmp_path):
    output_dir = tmp_path / "run"
    job_id = submit(slurm, output_dir, **{"train.max_steps": 6})
    state = slurm.wait(job_id)
    assert state == "COMPLETED", job_output(output_dir, job_id) + slurm.logs()

    assert load_checkpoint(output_dir / "checkpoint.pth")["step"] == 6
    events = EventAccumulator(str(output_dir / "tb"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [2, 4, 6]
    jsonl = [json.loads(line)["train/loss"] for line in (output_dir / "metrics.jsonl").open()]
    assert [event.value for event in events.Scalars("train/loss")] == pytest.approx(jsonl)
    # two ranks of one job, each with its log; the global batch is both shards
    for rank in (0, 1):
        assert (
            "batch 32 per process, 64 in all" in (output_dir / f"logs/rank{rank}.log").read_text()
        )
    assert slurm.job_field(job_id, "NumTasks") == "2"


@pytest.mark.parametrize("how", ["scontrol_requeue", "preemption_signal"])
def test_requeued_job_resumes_from_its_checkpoint(slurm: LocalSlurm, tmp_path, how):
    """Interrupted after its first checkpoint, the job is requeued and continues the count.

    scontrol_requeue: Slurm kills and requeues the job; the same submission reruns.
    preemption_signal: USR2 (what Slurm sends before a time limit or preemption); submitit calls
    TrainJob.checkpoint() on rank 0, requeues the job and the fresh TrainJob reruns.
    """
    output_dir = tmp_path / "run"
    steps, every = 120, 10
    job_id = submit(
        slurm, output_dir, **{"train.max_steps": steps, "train.checkpoint_every_steps": every,
                              "train.epochs": 20, "train.batch_size": 16}
    )  # fmt: skip
    checkpoint = output_dir / "checkpoint.pth"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert slurm.job_state(job_id) in ("PENDING", "RUNNING"), job_output(output_dir, job_id)
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.2)
    if how == "scontrol_requeue":
        slurm.run("scontrol", "requeue", job_id)
    else:
        slurm.run("scancel", "--signal=USR2", job_id)

    state = slurm.wait(job_id, timeout=600)
    log = job_output(output_dir, job_id)
    assert state == "COMPLETED", log + slurm.logs()
    assert int(slurm.job_field(job_id, "Restarts")) == 1
    if how == "preemption_signal":
        assert "Calling checkpoint method" in log and "Requeued job" in log

    resumed_at = [
        int(step) for step in re.findall(r"resumed from .* at step (\d+)", (
            output_dir / "logs/rank0.log").read_text())
    ]  # fmt: skip
    final = load_checkpoint(checkpoint)
    per_epoch = final["data"]["steps_per_epoch"]  # a checkpoint is also written at epoch ends
    assert len(resumed_at) == 1 and 0 < resumed_at[0] < steps
    assert resumed_at[0] % every == 0 or resumed_at[0] % per_epoch == 0, (resumed_at, per_epoch)
    assert final["step"] == steps
    # The first run logged up to where it was killed (at least up to its first checkpoint),
    # the second one from the checkpoint on: the count continued, it never went back to 0.
    logged = logged_steps(output_dir)
    second = list(range(resumed_at[0] + 2, steps + 1, 2))
    first = logged[: len(logged) - len(second)]
    assert logged[len(first) :] == second
    assert first == list(range(2, 2 * len(first) + 1, 2)) and first[-1] >= resumed_at[0]


def test_example_sbatch_runs_torchrun_under_srun(slurm: LocalSlurm, tmp_path):
    output_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text("method: dino\n")
    out_file = tmp_path / "sbatch.out"
    command = [
        "sbatch", "--parsable", f"--output={out_file}", f"--partition={slurm.partition}",
        "--cpus-per-task=2", f"--export=ALL,NPROC_PER_NODE=2,PYTHON={sys.executable}",
        str(REPO / "slurm" / "example.sbatch"), str(config),
        *tiny_overrides(output_dir, **{"train.max_steps": 4, "train.batch_size": 16}),
    ]  # fmt: skip
    job_id = slurm.run(*command).strip().split(";")[0]
    state = slurm.wait(job_id)
    output = out_file.read_text() if out_file.exists() else ""
    assert state == "COMPLETED", output + slurm.logs()
    assert "1 node(s) x 2 process(es)" in output
    assert load_checkpoint(output_dir / "checkpoint.pth")["step"] == 4
    assert "rank 1/2" in (output_dir / "logs/rank1.log").read_text()
    assert logged_steps(output_dir) == [2, 4]
