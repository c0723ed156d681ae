"""The one training loop, for every method.

`train(cfg)` is where the CLI, torchrun and the submitit callable all end. It resumes from
`output_dir/checkpoint.pth` when that file exists, so a requeued job never restarts from zero.
Rank 0 holds the output dir's lock for the run's whole life (engine/lock.py); SIGTERM ends the
run at the next step boundary with a final checkpoint (engine/stop.py).
Under torch.distributed (engine/distributed.py) each rank trains on its shard of every global
batch through DDP; rank 0 alone writes logs, checkpoints and evaluates while the others wait.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ssl_kd.config import Config, to_dict, to_yaml
from ssl_kd.data import build_train_stream
from ssl_kd.engine import distributed
from ssl_kd.engine.build import build_method
from ssl_kd.engine.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointStore,
    check_model_name,
    load_method_state,
    load_optimizer_state,
    rng_state,
    set_rng_state,
)
from ssl_kd.engine.evaluate import Evaluator
from ssl_kd.engine.faults import NonFiniteGuard
from ssl_kd.engine.lock import RunLock
from ssl_kd.engine.logging import (
    RunLogger,
    adaptive_summary,
    host_values,
    progress_fields,
    step_scalars,
)
from ssl_kd.engine.optimizer import build_optimizer
from ssl_kd.engine.rundir import check_data_order, prepare_output_dir
from ssl_kd.engine.stop import StopRequest
from ssl_kd.errors import Terminated, UserError
from ssl_kd.files import write_text_atomic
from ssl_kd.methods import registry
from ssl_kd.methods.base import Method, StepOutput, StepState, probe_interval
from ssl_kd.schedules import cosine_schedule
from ssl_kd.seeding import generator_for, seed_for


def seed_step(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """Seeds the global RNGs (drop path, dropout) and returns a generator for this step only,
    so that a resumed step draws exactly what the uninterrupted run drew.

    The global RNGs differ per rank (ranks must not drop the same paths for different images);
    the returned generator is the same on every rank, which draws for the global batch and
    keeps its own rows (`StepState.shard`).
    """
    torch.manual_seed(seed_for(seed, "global", step, rank))
    return generator_for(seed, "step", step)


class Trainer:
    """State of one run: method, optimizer, schedules, cost counters.

    `ctx` is this process's place in the process group; by default the current group (or a
    single process). `train(cfg)` creates the group.
    """

    def __init__(
        self, cfg: Config, ctx: distributed.DistContext | None = None, *, strict: bool = True,
        stop: StopRequest | None = None,
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self.ctx = ctx or distributed.current(cfg.train.device)
        self.strict = strict  # False: resume from what loads, with a report (--strict false)
        self.output_dir = Path(cfg.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.device = self.ctx.device
        self.rank, self.world_size = self.ctx.rank, self.ctx.world_size
        torch.manual_seed(seed_for(cfg.train.seed, "init"))  # the same weights on every rank

        self.method_class = registry.method_class(cfg.method)
        self.stream = build_train_stream(
            cfg.data, self.method_class.views, cfg.train.batch_size, cfg.train.seed, self.rank,
            self.world_size, self.method_class.train_transform(cfg), self.device,
        )  # fmt: skip
        self.method: Method = build_method(cfg).to(self.device)
        if self.ctx.distributed:
            distributed.sync_batch_norms(self.method, self.ctx)  # CUDA only (torch's limit)
            self.method.wrap_trainable(lambda module: distributed.wrap_ddp(module, self.ctx))
        self.evaluator = Evaluator(cfg, self.method, self.device, self.rank)
        self.optimizer = build_optimizer(self.method.param_groups(), cfg.optim, self.device)
        self.steps_per_epoch = self.stream.steps_per_epoch
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)
        self.schedules = self._schedules()
        self.method.set_schedule(self.total_steps, self.steps_per_epoch)
        if self.method.adaptive is not None and cfg.masking.probe_every_steps is None:
            self.method.adaptive.probe_every = probe_interval(self.total_steps)
        self.step = 0
        # Teacher multiply-adds over ranks and steps; probe_macs: the part the probes cost.
        self.totals = dict.fromkeys(("teacher_macs", "teacher_macs_unmasked", "probe_macs"), 0.0)
        self.images_seen = 0  # since this process started (for images/s)
        self.results: dict[str, Any] = {}
        self.amp = cfg.train.amp and self.device.type == "cuda"  # bf16 on CPU is far slower
        self.checkpoints = CheckpointStore(self.output_dir, cfg.train.keep_checkpoints)
        self.guard = NonFiniteGuard(cfg.train, self.checkpoint_path)
        self.resumed_from = self.checkpoint_path  # or the numbered copy --strict false took
        self.stop = stop or StopRequest()  # SIGTERM's flag (set only inside `with stop`)
        self.stopping = False  # a rank saw SIGTERM: every rank stops after this step

    def _schedules(self) -> dict[str, torch.Tensor]:
        """The optimizer's per-iteration lr and weight decay (the method keeps its own)."""
        optim = self.cfg.optim
        global_batch = self.cfg.train.batch_size * self.world_size
        lr = optim.lr * global_batch / 256  # the linear scaling rule of the DINO/MAE recipes
        return {
            "lr": cosine_schedule(
                lr, optim.min_lr, self.total_steps, optim.warmup_epochs * self.steps_per_epoch
            ),
            "weight_decay": cosine_schedule(
                optim.weight_decay, optim.weight_decay_end, self.total_steps
            ),
        }

    # --- checkpoints ----------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT_NAME

    def save(self) -> None:
        """Rank 0 writes the checkpoint; the others wait until it is on disk."""
        # A NaN state never replaces a good checkpoint. Every rank checks (DDP keeps the weights
        # equal), so all stop together instead of leaving the others at the barrier.
        self.guard.check_state(self.method, self.step)
        if self.rank != 0:
            distributed.barrier()
            return
        state = {
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "config": to_dict(self.cfg),
            # Where the backbones sit in `method`, so evaluation and export need no method code.
            "backbones": {
                part: f"{path}.vit." for part, path in self.method_class.backbones.items()
            } if self.method.has_vit_backbone else {},
            "default_backbone": self.method_class.default_backbone,
            "totals": self.totals,
            "results": self.results,
            # Data position: the batch order is a function of (seed, epoch), resumed at this batch.
            "data": {"batch": self.step % self.steps_per_epoch,
                     "steps_per_epoch": self.steps_per_epoch,
                     "images": self.stream.num_images,
                     "bad_files": sorted(self.stream.bad_files)},
            "faults": self.guard.state_dict(),
            "rng": rng_state(),
            "adaptive": self.method.adaptive.state_dict() if self.method.adaptive else None,
        }  # fmt: skip
        self.checkpoints.save(state, self.step, self.guard.first_skipped)
        distributed.barrier()

    def resume(self) -> bool:
        found = self.checkpoints.load_latest(self.strict)
        if found is None:
            return False
        state, path = found
        check_model_name(state, self.cfg.model.name, path)
        data = state.get("data", {})
        check_data_order(state, path, self.cfg.data.path, self.stream.num_images,
                         self.steps_per_epoch, self.strict)  # fmt: skip
        notes = load_method_state(self.method, state["method"], path, self.strict)
        for note in notes:
            print(f"warning (--strict false): {note}", file=sys.stderr)
        if not notes:  # the optimizer state fits only weights that all loaded
            load_optimizer_state(self.optimizer, state["optimizer"], path, self.strict)
        self.step = int(state["step"])
        self.totals.update(state.get("totals", {}))
        self.results.update(state.get("results", {}))
        self.stream.bad_files.update(data.get("bad_files", []))
        self.guard.load_state_dict(state.get("faults", {}))
        if self.method.adaptive is not None and state.get("adaptive"):
            self.method.adaptive.load_state_dict(state["adaptive"])  # the ratio it got to
        set_rng_state(state.get("rng"))
        self.resumed_from = path
        return True

    # --- the loop -------------------------------------------------------------------------
    def train_step(self, views: list[torch.Tensor]) -> dict[str, float | torch.Tensor]:
        """One optimisation step; returns what to log (the global batch's values). The method's
        metrics stay 0-d tensors on the device until a log step reads them (`host_values`):
        the loss is the one value the host waits for every step (the non-finite guard)."""
        epoch = self.step // self.steps_per_epoch
        values = {name: float(array[self.step]) for name, array in self.schedules.items()}
        generator = seed_step(self.cfg.train.seed, self.step, self.rank)
        state = StepState(self.step, epoch, generator, (self.rank, self.world_size))
        for group in self.optimizer.param_groups:
            group["lr"] = values["lr"]
            group["weight_decay"] = values["weight_decay"] if group.get("apply_wd", True) else 0.0

        views = [view.to(self.device, non_blocking=True) for view in views]
        views = self.guard.poison(views, self.step)  # test hook: train.debug_nan_at_steps
        buffers = self.guard.snapshot(self.method)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        )
        with autocast:
            out: StepOutput = self.method(views, state)
        # The global batch's metrics, before backward: a NaN on any rank is seen by every rank
        # here (all stop or all skip) rather than leaving the others waiting in DDP's all-reduce.
        means = {"loss": out.loss.detach(), **out.metrics}
        if out.keep_ratio_gap is not None:  # a probe step, the same step on every rank
            means["keep_ratio_gap"] = out.keep_ratio_gap
        counts = {"images": float(out.images or views[0].shape[0]),
                  "teacher_macs": out.teacher_macs,
                  "teacher_macs_unmasked": out.teacher_macs_unmasked,
                  "probe_macs": out.probe_macs}  # fmt: skip
        # Read with the step's metrics, so that every rank stops after the same step.
        counts["stop_requested"] = float(self.stop.requested)
        means, counts = distributed.reduce_metrics(means, counts, self.ctx)
        loss = float(means["loss"])  # the step's one wait for the device
        self.stopping = counts.pop("stop_requested") > 0
        for key in self.totals:
            self.totals[key] += counts[key]
        self.images_seen += int(counts["images"])
        gap = means.pop("keep_ratio_gap", None)
        if self.method.adaptive is not None:
            # The gap averaged over the ranks: every rank moves its ratio identically, so the
            # masked teachers of the next step agree.
            self.method.adaptive.update(None if gap is None else float(gap), epoch)
        logged = {**values, **means, "loss": loss, "teacher_gflops_per_image":
                  2 * counts["teacher_macs"] / max(counts["images"], 1.0) / 1e9}  # fmt: skip
        if self.guard.should_skip(loss, means, self.step, epoch, self.method, buffers):
            self.step += 1
            return {**logged, "skipped_steps": len(self.guard.skipped_steps)}
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        logged.update(self.method.before_optimizer_step(state))
        self.optimizer.step()
        self.method.update_teacher(state)
        self.step += 1
        return logged

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        restarted = (self.output_dir / "tb").is_dir()  # a run's events are there already
        resumed = self.resume()  # before the logger: TensorBoard hides steps after the checkpoint
        # Without a checkpoint, all earlier events are hidden (purged from step 0 on).
        purge_step = self.step if resumed or restarted else None
        logger = RunLogger(self.output_dir, self.rank, purge_step=purge_step)
        logger.console(
            f"rank {self.rank}/{self.world_size} on {self.device}: batch {cfg.train.batch_size} "
            f"per process, {cfg.train.batch_size * self.world_size} in all",
            all_ranks=True,
        )
        if resumed:
            logger.console(f"resumed from {self.resumed_from} at step {self.step}")
        elif cfg.eval.knn_random_init and "knn_top1_random_init" not in self.results:
            baseline = self.evaluator.run(knn=True, classify=False)
            if baseline:
                self.results["knn_top1_random_init"] = baseline["knn_top1"]
                logger.console(f"k-NN top-1 of the untrained backbone: {baseline['knn_top1']:.2f}")
        start_step, start_time = self.step, time.perf_counter()
        self.method.train()
        window_time, window_images = time.perf_counter(), self.images_seen

        while self.step < self.last_step:
            epoch, batch_index = divmod(self.step, self.steps_per_epoch)
            for views in self.stream.epoch(epoch, batch_index):
                metrics = self.train_step(views)
                metrics["skipped_images"] = len(self.stream.bad_files)
                every = self.method.picture_every_steps
                if every and self.step % every == 0 and self.rank == 0:
                    with torch.no_grad():
                        state = StepState(
                            self.step, epoch, generator_for(cfg.train.seed, "pictures", self.step)
                        )
                        logger.images(self.step, self.method.pictures(views, state))
                logged = self.step % cfg.train.log_every_steps == 0 or self.step == self.last_step
                if logged or self.stopping:
                    now = time.perf_counter()
                    images = self.images_seen - window_images
                    metrics["images_per_s"] = images / max(now - window_time, 1e-9)
                    window_time, window_images = now, self.images_seen
                    self._log(logger, host_values(metrics), start_step)
                if self.step % cfg.train.checkpoint_every_steps == 0 or self.stopping:
                    self.save()
                if self.stopping:
                    logger.close()
                    raise Terminated(
                        f"SIGTERM: stopped after step {self.step} of {self.last_step}, saved in "
                        f"{self.checkpoint_path}; the same command resumes from there"
                    )
                if self.step >= self.last_step or self.step % self.steps_per_epoch == 0:
                    break
            epoch_done = self.step // self.steps_per_epoch
            if self.step % self.steps_per_epoch == 0 or self.step >= self.last_step:
                if self.step < self.last_step:
                    self._log_scores(logger, self.evaluator.run(*self.evaluator.due(epoch_done)))
                self.save()

        scores = self.evaluator.run(cfg.eval.knn_at_end, cfg.eval.classify_at_end)
        self.results.update(scores)
        self._log_scores(logger, scores)
        summary = self._summary(time.perf_counter() - start_time)
        if self.rank == 0:
            text = json.dumps(summary, indent=2) + "\n"
            write_text_atomic(self.output_dir / "summary.json", text)
        self.save()
        logger.close()
        return summary

    def _log_scores(self, logger: RunLogger, scores: dict[str, float]) -> None:
        if scores:
            logger.scalars(self.step, {f"eval/{name}": value for name, value in scores.items()})
            epoch = self.step / self.steps_per_epoch
            logger.console(
                f"epoch {epoch:g}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
            )

    def _log(self, logger: RunLogger, metrics: dict[str, float], start_step: int) -> None:
        scalars = step_scalars(metrics, self.totals, self.method.adaptive)
        logger.scalars(self.step, scalars)
        logger.progress(
            self.step, self.last_step, self.step - start_step,
            (self.step - 1) // self.steps_per_epoch, self.cfg.train.epochs,
            progress_fields(metrics, scalars),
        )  # fmt: skip

    def _summary(self, wall_s: float) -> dict[str, Any]:
        adaptive = self.method.adaptive
        return {
            "output_dir": str(self.output_dir),
            "method": self.cfg.method,
            "model": self.cfg.model.name,
            "steps": self.step,
            **self.method.summary(),
            "teacher_pflops": 2 * self.totals["teacher_macs"] / 1e15,
            "teacher_pflops_unmasked": 2 * self.totals["teacher_macs_unmasked"] / 1e15,
            **(
                {"keep_ratio_adaptive": adaptive_summary(adaptive, self.totals)} if adaptive else {}
            ),
            "wall_s": wall_s,
            "skipped_steps": self.guard.skipped_steps,
            "skipped_images": sorted(self.stream.bad_files),
            **self.results,
        }


def train(
    cfg: Config, *, resume: bool = False, overwrite: bool = False, strict: bool = True
) -> dict[str, Any]:
    """Trains (or resumes) the run `cfg` describes; returns the summary.

    Joins the process group the environment describes (torchrun, or a submitit job after
    `distributed.export_submitit_env`) and leaves it at the end if it created it.
    `resume` / `overwrite`: what to do when output_dir holds a run with another config
    (engine/rundir.py); `strict=False` resumes from whatever checkpoint loads, with a report.
    """
    created = not distributed.is_initialized()
    ctx = distributed.init(cfg.train.device)
    lock = RunLock(cfg.output_dir) if ctx.is_main else None  # rank 0 alone; the others wait
    try:
        settled: Config | UserError = cfg
        if lock is not None:
            try:
                settled = _settle_output_dir(lock, cfg, resume, overwrite, strict)
            except UserError as err:  # handed to every rank, so that none waits for rank 0
                settled = err
        # Every rank trains the config rank 0 settled on: --resume may have taken saved values.
        settled = distributed.broadcast_object(settled)
        if isinstance(settled, UserError):
            raise settled
        with StopRequest() as stop:
            return Trainer(settled, ctx, strict=strict, stop=stop).fit()
    finally:
        if lock is not None:
            lock.release()
        if created:
            distributed.cleanup()


def _settle_output_dir(
    lock: RunLock, cfg: Config, resume: bool, overwrite: bool, strict: bool
) -> Config:
    """Locks the output dir, then checks (and may clear) it and writes config.yaml."""
    note = lock.acquire()  # first: no other run may be reading, saving or clearing the dir
    if note:
        print(note)
    cfg = prepare_output_dir(cfg, resume=resume, overwrite=overwrite, strict=strict)
    write_text_atomic(Path(cfg.output_dir) / "config.yaml", to_yaml(cfg))
    return cfg
