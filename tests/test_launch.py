"""The submitit launcher: resources → sbatch options, the requeue contract, `--local`."""

from __future__ import annotations

import json

import pytest
import submitit

from ssl_kd.cli import main
from ssl_kd.config import ConfigError
from ssl_kd.engine.checkpoint import load_checkpoint
from ssl_kd.launch import SlurmOptions, TrainJob, executor_parameters
from tests.helpers import tiny_config, tiny_overrides, write_digit_folder


def test_one_task_per_gpu_and_the_slurm_options():
    params = executor_parameters(
        SlurmOptions(
            nodes=2, gpus_per_node=8, partition="gpu", timeout_min=60, account="a", qos="high",
            constraint="a100", mem_gb=400, cpus_per_task=10, extra={"exclusive": True},
        )
    )  # fmt: skip
    assert params == {
        "nodes": 2, "tasks_per_node": 8, "gpus_per_node": 8, "timeout_min": 60,
        "slurm_signal_delay_s": 120, "mem_gb": 400, "cpus_per_task": 10,
        "slurm_partition": "gpu", "slurm_account": "a", "slurm_qos": "high",
        "slurm_constraint": "a100", "slurm_additional_parameters": {"exclusive": True},
    }  # fmt: skip


def test_cpu_cluster_needs_tasks_and_gpu_jobs_run_one_task_per_gpu():
    params = executor_parameters(SlurmOptions(gpus_per_node=0, tasks_per_node=4))
    assert params["tasks_per_node"] == 4 and "gpus_per_node" not in params
    with pytest.raises(ConfigError, match="--gpus-per-node 0 needs --tasks-per-node"):
        executor_parameters(SlurmOptions(gpus_per_node=0))
    with pytest.raises(ConfigError, match="one task per GPU"):
        executor_parameters(SlurmOptions(gpus_per_node=8, tasks_per_node=2))


def test_checkpoint_resubmits_a_fresh_job_of_the_same_config(tmp_path):
    job = TrainJob(tiny_config(tmp_path))
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, TrainJob) and delayed.function is not job
    assert delayed.function.cfg == job.cfg
    assert delayed.args == () and delayed.kwargs == {}


def test_bad_slurm_extra_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["submit", "cfg.yaml", "--slurm-extra", "no-equals-sign"])
    assert "use KEY=VALUE" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
def test_local_submit_runs_two_tasks_through_submitit(tmp_path, capsys):
    """`--local`: the same TrainJob in 2 local processes, submitit's env exported to gloo."""
    config = tmp_path / "run.yaml"
    config.write_text("method: dino\n")
    overrides = tiny_overrides(tmp_path / "run", **{"train.max_steps": 2, "train.batch_size": 16})
    code = main(["submit", str(config), *overrides, "--gpus-per-node", "0",
                 "--tasks-per-node", "2", "--local"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "job id:" in out and f"output dir: {tmp_path / 'run'}" in out
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["step"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    assert "rank 1/2" in (tmp_path / "run" / "logs" / "rank1.log").read_text()


# --- checks before submitting ---------------------------------------------------------------
class Submitted(Exception):
    """Raised by the stand-in executor: the checks let the submission through."""


@pytest.fixture
def executor_refused(monkeypatch):
    """No job may start and no submitit folder appear before the checks pass: the executor is
    replaced by a stand-in that records the attempt (no Slurm needed)."""

    def executor(*args, **kwargs):
        raise Submitted(kwargs.get("folder"))

    monkeypatch.setattr(submitit, "AutoExecutor", executor)


SUBMIT_CASES = {
    "not a ViT": ({"model.name": "resnet50"}, [], "'resnet50' is a timm ResNet"),
    "batch × tasks": (
        {},
        ["--nodes", "4", "--tasks-per-node", "12"],
        "larger than the dataset's share per process (1437 images / 48 processes)",
    ),
    "folder too small": (
        {"data.name": "imagefolder", "data.transform": "lightly", "train.batch_size": 4},
        ["--tasks-per-node", "4"],
        "larger than the dataset's share per process (12 images / 4 processes)",
    ),
    "cuda without GPUs": ({"train.device": "cuda"}, ["--tasks-per-node", "2"], "--gpus-per-node 0"),
    "no nodes": ({}, ["--nodes", "0", "--tasks-per-node", "2"], "--nodes 0 / --timeout-min"),
    "output under a file": ({"output_dir": "{file}/run"}, ["--tasks-per-node", "2"], "lies under"),
}


@pytest.mark.parametrize("case", SUBMIT_CASES)
def test_submit_checks_model_data_and_batch_before_any_job_or_folder(
    tmp_path, capsys, executor_refused, case
):
    extra, options, expected = SUBMIT_CASES[case]
    write_digit_folder(tmp_path / "data")  # 12 images
    (tmp_path / "file").write_text("not a folder\n")
    extra = {key: str(value).format(file=tmp_path / "file") for key, value in extra.items()}
    extra.setdefault("data.path", str(tmp_path / "data"))
    output_dir = extra.pop("output_dir", str(tmp_path / "out"))
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    args = ["submit", str(config), *tiny_overrides(output_dir, **extra)]
    assert main([*args, "--gpus-per-node", "0", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ssl-kd: error: ") and err.count("\n") == 1 and expected in err
    assert not (tmp_path / "out").exists()  # no output dir, no submitit/%j folder


def test_a_good_submission_passes_the_checks(tmp_path, executor_refused):
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    args = ["submit", str(config), *tiny_overrides(tmp_path / "out"), "--gpus-per-node", "0"]
    with pytest.raises(Submitted, match=r"out/submitit/%j"):
        main([*args, "--nodes", "2", "--tasks-per-node", "2"])
