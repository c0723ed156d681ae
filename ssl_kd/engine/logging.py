"""Run logging: TensorBoard scalars, a metrics.jsonl line per log step, a console line with ETA.

Rank 0 writes TensorBoard, metrics.jsonl and the console; every rank keeps its own
`output_dir/logs/rank{R}.log` (its console lines and progress).
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from ssl_kd.adaptive import KeepRatioController


def wait_for_a_later_event_file_name(folder: Path) -> None:
    """Waits (under a second) until an event file made now sorts after every one in `folder`.

    TensorBoard reads a folder's event files in name order, and a name starts with the whole
    second it was made in, then the host and the pid. A run restarted within the second its
    killed predecessor started could sort first; its purge marker would then be read before
    the events it is meant to hide, and they would show again.
    """
    newest = 0
    for path in folder.glob("events.out.tfevents.*"):
        stamp = path.name.split(".")[3]
        if stamp.isdigit():
            newest = max(newest, int(stamp))
    while int(time.time()) <= newest:
        time.sleep(max(0.01, newest + 1 - time.time()))


class RunLogger:
    """TensorBoard, metrics.jsonl and console on rank 0; a log file per rank."""

    def __init__(
        self, output_dir: str | Path, rank: int = 0, purge_step: int | None = None
    ) -> None:
        """`purge_step`: a resumed run's checkpoint step (0 for a run restarted before its first
        checkpoint). TensorBoard then hides every event an earlier process logged at a later
        step (a killed run's unsaved steps, which this run logs again, like `trim_metrics` does
        for metrics.jsonl). SummaryWriter's own purge_step hides steps >= its value, hence + 1:
        the checkpoint's step was logged before the save."""
        self.rank = rank
        self.enabled = enabled = rank == 0
        self.output_dir = Path(output_dir)
        (self.output_dir / "logs").mkdir(parents=True, exist_ok=True)
        self._rank_log = open(self.output_dir / "logs" / f"rank{rank}.log", "a")  # noqa: SIM115
        tb_purge = None if purge_step is None else purge_step + 1
        if enabled:
            wait_for_a_later_event_file_name(self.output_dir / "tb")
        self.writer = (
            SummaryWriter(str(self.output_dir / "tb"), purge_step=tb_purge) if enabled else None
        )
        self._jsonl = open(self.output_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self._start = time.perf_counter()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        assert self.writer is not None and self._jsonl is not None
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        # SummaryWriter queues events for a background thread: out now, so that a kill loses
        # none a checkpoint (or this metrics.jsonl line) covers.
        self.writer.flush()
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()

    def images(self, step: int, images: dict[str, Any]) -> None:
        if self.writer is not None:
            for tag, image in images.items():
                self.writer.add_image(tag, image, step)
            self.writer.flush()

    def console(self, message: str, all_ranks: bool = False) -> None:
        """Prints on rank 0 (on every rank with `all_ranks`); always goes to the rank's log."""
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        self._rank_log.write(f"{stamp} {message}\n")
        self._rank_log.flush()
        if self.enabled or all_ranks:
            prefix = "" if self.enabled else f"[rank {self.rank}] "
            print(prefix + message, file=sys.stdout, flush=True)

    def progress(
        self, step: int, total: int, done_since_start: int, epoch: int, epochs: int, fields: str
    ) -> None:
        elapsed = time.perf_counter() - self._start
        eta = elapsed / max(done_since_start, 1) * (total - step)
        eta_text = str(datetime.timedelta(seconds=int(eta)))
        self.console(f"[epoch {epoch + 1}/{epochs} step {step}/{total}] {fields} eta {eta_text}")

    def close(self) -> None:
        self._rank_log.close()
        if self.writer is not None:
            self.writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


TRAIN_TAGS = ("loss", "lr", "weight_decay", "images_per_s")


def host_values(metrics: Mapping[str, float | Tensor]) -> dict[str, float]:
    """A step's metrics as floats, the device's 0-d tensors read in one transfer: a step leaves
    its metrics on the device, and only a log step reads them (the values of that step)."""
    tensors = {name: value for name, value in metrics.items() if isinstance(value, Tensor)}
    read: dict[str, float] = {}
    if tensors:
        device = next(iter(tensors.values())).device
        stacked = torch.stack([t.detach().to(device, torch.float64) for t in tensors.values()])
        read = dict(zip(tensors, stacked.tolist(), strict=True))
    return {name: read[name] if name in read else float(value) for name, value in metrics.items()}


def step_scalars(
    metrics: dict[str, float],
    totals: dict[str, float],
    adaptive: KeepRatioController | None = None,
) -> dict[str, float]:
    """A step's metrics and the running cost totals → TensorBoard tags: `train/` for the loop's
    own values, `cost/` for the teacher's, `method/` for everything the method reported, and
    with an adaptive keep ratio `masking/gap` (of the latest probe, once there was one),
    `masking/probe_share` and `cost/probe_pflops_total`."""
    scalars = {f"train/{key}": metrics[key] for key in TRAIN_TAGS}
    scalars.update(
        {
            "cost/teacher_gflops_per_image": metrics["teacher_gflops_per_image"],
            "cost/teacher_pflops_total": 2 * totals["teacher_macs"] / 1e15,
            "cost/teacher_pflops_unmasked_total": 2 * totals["teacher_macs_unmasked"] / 1e15,
        }
    )
    own = set(TRAIN_TAGS) | {"teacher_gflops_per_image"}
    scalars.update({f"method/{k}": v for k, v in metrics.items() if k not in own})
    if adaptive is not None:
        scalars["masking/probe_share"] = probe_share(totals)
        scalars["cost/probe_pflops_total"] = 2 * totals["probe_macs"] / 1e15
        if adaptive.last_gap is not None:
            scalars["masking/gap"] = adaptive.last_gap
    return scalars


def probe_share(totals: dict[str, float]) -> float:
    """The adaptive keep ratio's probes' share of the teacher's multiply-adds so far."""
    return totals["probe_macs"] / totals["teacher_macs"] if totals["teacher_macs"] else 0.0


def adaptive_summary(adaptive: KeepRatioController, totals: dict[str, float]) -> dict[str, Any]:
    """summary.json's `keep_ratio_adaptive`: the ratio's trajectory, the gaps, the probes' cost."""
    return {
        **adaptive.summary(),
        "probe_pflops": 2 * totals["probe_macs"] / 1e15,
        "probe_share": probe_share(totals),
    }


def progress_fields(metrics: dict[str, float], scalars: dict[str, float]) -> str:
    return (
        f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
        f"keep {metrics.get('keep_ratio', 1.0):.2f} "
        f"teacher {scalars['cost/teacher_gflops_per_image']:.3f} GFLOPs/img "
        f"{metrics['images_per_s']:.0f} img/s"
    )
