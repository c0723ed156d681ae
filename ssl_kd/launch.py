"""Slurm (and local) launching through submitit: the callable and the submission.

`TrainJob(cfg)` runs in every task of the job: it exports submitit's environment as torchrun's
(RANK, WORLD_SIZE, MASTER_ADDR...) and calls the same `train(cfg)` as `ssl-kd train`. When Slurm
preempts the job or its time runs out, submitit calls `checkpoint()` on rank 0 (inside a signal
handler: no collectives, no saving there), which returns a fresh `TrainJob` of the same config;
submitit requeues the job and the new run resumes from `output_dir/checkpoint.pth`, written
every `train.checkpoint_every_steps` and at each epoch end. A job requeued by hand
(`scontrol requeue`) reruns the original submission and resumes the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from ssl_kd.config import Config
from ssl_kd.engine import distributed
from ssl_kd.errors import ConfigError


class TrainJob:
    """The submitit callable: one instance per job, called in each of its tasks."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __call__(self) -> dict[str, Any]:
        from ssl_kd.engine.trainer import train

        distributed.export_submitit_env()
        return train(self.cfg)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        # The trainer's own checkpoint.pth carries the state; a fresh instance resumes from it.
        return submitit.helpers.DelayedSubmission(type(self)(self.cfg))


@dataclass
class SlurmOptions:
    """Resources of one job. One task per GPU; on CPU-only clusters `tasks_per_node` tasks."""

    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # default: gpus_per_node
    partition: str | None = None
    timeout_min: int = 24 * 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem_gb: int | None = None
    cpus_per_task: int | None = None
    extra: dict[str, str] = field(default_factory=dict)  # any other sbatch option
    local: bool = False  # run the tasks as local processes (debugging), not through Slurm
    folder: str | None = None  # submitit's job folder; default OUTPUT_DIR/submitit/JOB_ID


def executor_parameters(options: SlurmOptions) -> dict[str, Any]:
    """submitit AutoExecutor parameters for `options` (slurm_* ones are ignored locally)."""
    tasks = options.tasks_per_node or options.gpus_per_node
    if tasks < 1:
        raise ConfigError(
            "--gpus-per-node 0 needs --tasks-per-node N (processes per node on a CPU-only "
            "cluster); with GPUs, one task runs per GPU"
        )
    if options.gpus_per_node and options.tasks_per_node not in (None, options.gpus_per_node):
        raise ConfigError(
            f"--tasks-per-node {options.tasks_per_node} with --gpus-per-node "
            f"{options.gpus_per_node}: ssl_kd runs one task per GPU; drop --tasks-per-node"
        )
    params: dict[str, Any] = {
        "nodes": options.nodes,
        "tasks_per_node": tasks,
        "timeout_min": options.timeout_min,
        "slurm_signal_delay_s": 120,  # time for the requeue before Slurm kills the job
    }
    if options.gpus_per_node:
        params["gpus_per_node"] = options.gpus_per_node
    optional = {
        "mem_gb": options.mem_gb,
        "cpus_per_task": options.cpus_per_task,
        "slurm_partition": options.partition,
        "slurm_account": options.account,
        "slurm_qos": options.qos,
        "slurm_constraint": options.constraint,
    }
    params.update({key: value for key, value in optional.items() if value is not None})
    if options.extra:
        params["slurm_additional_parameters"] = dict(options.extra)
    return params


def check_submission(cfg: Config, options: SlurmOptions) -> None:
    """What the job would fail on, checked here before any submitit object or folder exists
    (the config itself, model included, is checked when it is loaded): the task layout, a
    CUDA run without GPUs, the data against the batch of every task, the output folders.

    Raises:
        ConfigError / UserError: one line naming the option or key.
    """
    from ssl_kd.data import build_train_stream
    from ssl_kd.files import check_writable_folder
    from ssl_kd.methods import registry

    tasks = executor_parameters(options)["tasks_per_node"]
    if options.nodes < 1 or options.timeout_min < 1:
        raise ConfigError(
            f"--nodes {options.nodes} / --timeout-min {options.timeout_min} must be >= 1"
        )
    if not options.gpus_per_node and cfg.train.device == "cuda":
        raise ConfigError(
            "train.device=cuda with --gpus-per-node 0: the tasks would have no GPU; use "
            "train.device=cpu (or auto), or give --gpus-per-node"
        )
    # The stream every task builds: for an image folder this scans it once, here, so that too
    # few images for batch × tasks fails now and not in the job.
    world_size = options.nodes * tasks
    views = registry.method_class(cfg.method).views
    build_train_stream(cfg.data, views, cfg.train.batch_size, cfg.train.seed, 0, world_size)
    check_writable_folder(cfg.output_dir)
    if options.folder:
        check_writable_folder(options.folder, "--folder")


def submit(cfg: Config, options: SlurmOptions) -> submitit.Job:
    """Checks the submission (`check_submission`), then submits `TrainJob(cfg)`; returns the
    job (its id, `paths.folder`, `paths.stdout`)."""
    cfg.output_dir = str(Path(cfg.output_dir).resolve())  # the job may start elsewhere
    check_submission(cfg, options)
    folder = Path(options.folder) if options.folder else Path(cfg.output_dir) / "submitit"
    executor = submitit.AutoExecutor(
        folder=folder / "%j", cluster="local" if options.local else "slurm"
    )
    executor.update_parameters(
        name=f"ssl_kd-{Path(cfg.output_dir).name}", **executor_parameters(options)
    )
    return executor.submit(TrainJob(cfg))
