"""Output-dir safety: a run never silently continues, or overwrites, another run's checkpoint.

The same config resumes (keys that do not change what is trained, such as `train.max_steps`
or `eval.*`, may differ, and so may the optimisation keys a divergence calls for, such as a
lower `optim.lr`: each such change is logged). A different config in an output dir holding a
checkpoint is refused with the differing keys named, unless `resume` (continue the saved run
with its own config) or `overwrite` (delete the saved run and start this one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ssl_kd.config import Config, flatten, to_dict
from ssl_kd.config.merge import free_dicts
from ssl_kd.engine.checkpoint import CheckpointStore
from ssl_kd.errors import ConfigError
from ssl_kd.files import write_text_atomic
from ssl_kd.methods import registry
from ssl_kd.run_config import config_from_dict

# Keys a resumed run may change: how long, how often, where, what to evaluate; not what.
RESUMABLE_CHANGES = (
    "output_dir", "train.max_steps", "train.log_every_steps", "train.checkpoint_every_steps",
    "train.keep_checkpoints", "train.device", "train.debug_nan_at_steps", "data.num_workers",
    "data.on_error", "eval.",
)  # fmt: skip
# Optimisation keys a resumed run may retune, each change logged: what a divergence calls for
# (engine/faults.py says so). The lr and weight-decay schedules are recomputed from the new
# values and continue at the saved step; the optimizer's moments are kept.
RETUNABLE_ON_RESUME = (
    "optim.lr", "optim.min_lr", "optim.warmup_epochs", "optim.weight_decay", "dino.clip_grad",
    "train.on_nonfinite", "train.max_skipped_steps",
)  # fmt: skip
RUN_FILES = ("checkpoint.pth", "metrics.jsonl", "summary.json", "config.yaml")


def config_differences(current: dict[str, Any], saved: dict[str, Any]) -> dict[str, tuple]:
    """dotted key → (current, saved) for the keys that change what is trained."""
    return {
        key: values
        for key, values in _changed(current, saved).items()
        if not key.startswith(RESUMABLE_CHANGES + RETUNABLE_ON_RESUME)
    }


def retuned_keys(current: dict[str, Any], saved: dict[str, Any]) -> dict[str, tuple]:
    """dotted key → (current, saved) for the optimisation keys a resume may change."""
    return {
        key: values
        for key, values in _changed(current, saved).items()
        if key.startswith(RETUNABLE_ON_RESUME)
    }


def _changed(current: dict[str, Any], saved: dict[str, Any]) -> dict[str, tuple]:
    free = free_dicts(registry.sections())
    now, before = flatten(current, free), flatten(saved, free)
    return {
        key: (now[key], before[key])
        for key in sorted(set(now) & set(before))
        if _normal(now[key]) != _normal(before[key])
    }


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def prepare_output_dir(
    cfg: Config, *, resume: bool = False, overwrite: bool = False, strict: bool = True
) -> Config:
    """Checks `cfg.output_dir` against the run saved there; returns the config to train.

    Raises:
        ConfigError: the saved run's config differs and neither resume nor overwrite is set.
        ValueError: the saved checkpoint is unreadable (strict), naming the file.
    """
    output_dir = Path(cfg.output_dir)
    store = CheckpointStore(output_dir, cfg.train.keep_checkpoints)
    if overwrite:
        remove_run(output_dir)
        return cfg
    if not output_dir.is_dir():
        return cfg
    stale = store.remove_stale_temporaries()
    if stale:
        print(f"removed {len(stale)} temporary file(s) of an interrupted save in {output_dir}")
    found = store.load_latest(strict, mmap=True)
    if found is None:
        return cfg
    state, path = found
    differences = config_differences(to_dict(cfg), state["config"])
    if differences:
        listed = "; ".join(
            f"{key}={new!r} here vs {old!r} saved" for key, (new, old) in differences.items()
        )
        if not resume:
            raise ConfigError(
                f"output_dir {output_dir} holds another run ({path.name} at step "
                f"{state['step']}) whose config differs: {listed}. Pass --resume to continue the "
                "saved run with its config, --overwrite to delete it and start this one, or "
                "choose another output_dir"
            )
        cfg = _with_saved_values(cfg, {key: old for key, (_, old) in differences.items()})
        print(f"--resume: continuing the saved run with its config ({listed})")
    for key, (new, old) in retuned_keys(to_dict(cfg), state["config"]).items():
        print(f"{key} changed {old} → {new} on resume (from {path.name} at step {state['step']})")
    trim_metrics(output_dir / "metrics.jsonl", int(state["step"]))
    return cfg


def _with_saved_values(cfg: Config, saved: dict[str, Any]) -> Config:
    values = to_dict(cfg)
    for dotted, value in saved.items():
        *parents, key = dotted.split(".")
        node = values
        for parent in parents:
            node = node[parent]
        node[key] = value
    return config_from_dict(values, "--resume")


def remove_run(output_dir: Path) -> None:
    """Deletes what a run writes (checkpoints, logs, summary, config); nothing else."""
    if not output_dir.is_dir():
        return
    removed = [output_dir / name for name in RUN_FILES if (output_dir / name).exists()]
    removed += sorted(output_dir.glob("checkpoint-*.pth"))
    removed += sorted(output_dir.glob(".checkpoint*.pth.tmp-*"))
    for path in removed:
        path.unlink()
    if (output_dir / "tb").is_dir():
        shutil.rmtree(output_dir / "tb")
        removed.append(output_dir / "tb")
    if removed:
        print(f"--overwrite: removed {', '.join(p.name for p in removed)} from {output_dir}")


def trim_metrics(path: Path, step: int) -> None:
    """Drops metrics.jsonl lines logged after the checkpoint's step (a killed run logs steps it
    never saved; the resumed run logs them again)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            logged = json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if logged <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return
    write_text_atomic(path, "".join(kept))
