"""Output-dir safety: a run never silently continues, or overwrites, another run's checkpoint.

The same config resumes (keys that do not change what is trained, such as `train.max_steps`
or `eval.*`, may differ; so may `data.path`, the data order being checked when the checkpoint
loads), and so may the optimisation keys a divergence calls for, such as a lower `optim.lr`,
and `train.epochs` (a finished run is extended): each such change is logged. A different
config is refused with the differing keys named, unless `resume` (continue the saved run with
its own config) or `overwrite` (delete the saved run and start this one).
The config is compared with the checkpoint's, or, before the first checkpoint, with the
`config.yaml` of a run that began training (it created `metrics.jsonl`); a `config.yaml` alone
is the leftover of a start that failed before training (a bad model, a missing folder) and is
replaced. Metrics logged after the checkpoint (all of them when there is none) are dropped.

The caller holds the dir's lock (engine/lock.py): nothing here races a live run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from ssl_kd.config import Config, flatten, to_dict
from ssl_kd.config.merge import free_dicts
from ssl_kd.engine.checkpoint import CheckpointStore
from ssl_kd.engine.lock import LOCK_NAME
from ssl_kd.errors import ConfigError, UserError
from ssl_kd.files import write_text_atomic
from ssl_kd.methods import registry
from ssl_kd.run_config import config_from_dict

# Keys a resumed run may change: how long, how often, where, what to evaluate; not what.
RESUMABLE_CHANGES = (
    "output_dir", "train.max_steps", "train.log_every_steps", "train.checkpoint_every_steps",
    "train.keep_checkpoints", "train.device", "train.debug_nan_at_steps", "data.num_workers",
    "data.on_error", "data.path", "data.max_bad_fraction", "eval.", "optim.implementation",
    "train.compile",
)  # fmt: skip
# Optimisation keys a resumed run may retune, each change logged: what a divergence calls for
# (engine/faults.py says so). The lr and weight-decay schedules are recomputed from the new
# values and continue at the saved step; the optimizer's moments are kept.
RETUNABLE_ON_RESUME = (
    "optim.lr", "optim.min_lr", "optim.warmup_epochs", "optim.weight_decay", "dino.clip_grad",
    "train.on_nonfinite", "train.max_skipped_steps",
)  # fmt: skip
# Keys that change only how long a run is: a finished run is extended with a larger
# train.epochs. Every schedule is a function of the total steps (lr, weight decay, teacher
# momentum; teacher temperature and warm-ups are counted in epochs): they are recomputed for the
# new length and continue at the saved step, as official DINO does when restarted with a larger
# --epochs. A run is never cut short below the step it reached.
LENGTH_ON_RESUME = ("train.epochs",)
# What a run writes in its output dir, and all that --overwrite deletes: `ssl-kd train`'s files
# and folders, and `eval/` (where `ssl-kd eval` writes a run's results by default).
RUN_FILES = ("checkpoint.pth", "metrics.jsonl", "summary.json", "config.yaml")
RUN_FOLDERS = ("tb", "logs", "eval")
RUN_TEMPORARIES = (*(f".{name}.tmp-*" for name in RUN_FILES), ".checkpoint-*.pth.tmp-*")


def config_differences(current: dict[str, Any], saved: dict[str, Any]) -> dict[str, tuple]:
    """dotted key → (current, saved) for the keys that change what is trained."""
    return {
        key: values
        for key, values in _changed(current, saved).items()
        if not key.startswith(RESUMABLE_CHANGES + RETUNABLE_ON_RESUME + LENGTH_ON_RESUME)
    }


def retuned_keys(current: dict[str, Any], saved: dict[str, Any]) -> dict[str, tuple]:
    """dotted key → (current, saved) for the optimisation and length keys a resume may change."""
    return {
        key: values
        for key, values in _changed(current, saved).items()
        if key.startswith(RETUNABLE_ON_RESUME + LENGTH_ON_RESUME)
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
        UserError: the saved checkpoint (strict) or config.yaml is unreadable, naming the file.
    """
    output_dir = Path(cfg.output_dir)
    store = CheckpointStore(output_dir, cfg.train.keep_checkpoints)
    if overwrite:
        remove_run(output_dir)
        return cfg
    if not output_dir.is_dir():
        return cfg
    stale = store.remove_stale_temporaries()  # the caller's lock: no live run is saving
    if stale:
        print(f"removed {len(stale)} temporary file(s) of an interrupted save in {output_dir}")
    found = store.load_latest(strict, mmap=True)
    if found is not None:
        state, path = found
        saved, step = state["config"], int(state["step"])
        source = f"{path.name} at step {step}"
        _check_length(cfg, state, path)
    else:
        saved, step = _started_config(output_dir), 0
        source = "config.yaml, stopped before its first checkpoint"
    if saved is not None:
        cfg = _settle_differences(cfg, saved, source, output_dir, resume)
        _note_data_path(cfg, saved)
        for key, (new, old) in retuned_keys(to_dict(cfg), saved).items():
            print(f"{key} changed {old} → {new} on resume (from {source})")
            if key == "train.epochs":
                print(
                    f"schedules (lr, weight decay, teacher momentum and temperature) recomputed "
                    f"for {new} epochs; training continues at step {step}"
                )
    trim_metrics(output_dir / "metrics.jsonl", step)
    return cfg


def _check_length(cfg: Config, state: dict[str, Any], path: Path) -> None:
    """Raises a ConfigError when train.epochs ends before the step the saved run reached."""
    step = int(state["step"])
    steps_per_epoch = state.get("data", {}).get("steps_per_epoch")
    if not steps_per_epoch or cfg.train.epochs * steps_per_epoch >= step:
        return
    raise ConfigError(
        f"train.epochs={cfg.train.epochs} ends at step {cfg.train.epochs * steps_per_epoch}, "
        f"but the run in {path.parent} has trained {step} steps ({path.name}, "
        f"{steps_per_epoch} per epoch): a run can be extended, not cut short. Give "
        f"train.epochs >= {-(-step // steps_per_epoch)}, or another output_dir"
    )


def _started_config(output_dir: Path) -> dict[str, Any] | None:
    """config.yaml of a run that began training (it opened metrics.jsonl), else None."""
    path = output_dir / "config.yaml"
    if not (path.is_file() and (output_dir / "metrics.jsonl").exists()):
        return None
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(
            f"{path} is not readable ({type(err).__name__}); restore it, or pass --overwrite "
            "to delete that run"
        ) from None
    if not isinstance(saved, dict):
        raise UserError(f"{path} holds no config; restore it, or pass --overwrite")
    return saved


def _settle_differences(
    cfg: Config, saved: dict[str, Any], source: str, output_dir: Path, resume: bool
) -> Config:
    differences = config_differences(to_dict(cfg), saved)
    if not differences:
        return cfg
    listed = "; ".join(
        f"{key}={new!r} here vs {old!r} saved" for key, (new, old) in differences.items()
    )
    if not resume:
        raise ConfigError(
            f"output_dir {output_dir} holds another run ({source}) whose config differs: "
            f"{listed}. Pass --resume to continue the saved run with its config, --overwrite to "
            "delete it and start this one, or choose another output_dir"
        )
    print(f"--resume: continuing the saved run with its config ({listed})")
    return _with_saved_values(cfg, {key: old for key, (_, old) in differences.items()})


def _note_data_path(cfg: Config, saved: dict[str, Any]) -> None:
    before = saved.get("data", {}).get("path")
    now = cfg.data.path
    if before == now or (before and now and os.path.normpath(before) == os.path.normpath(now)):
        return
    print(
        f"data.path changed: {now} (the saved run read {before}); the run goes on if the data "
        "order is the same (images and batches per epoch, checked against the checkpoint)"
    )


def check_data_order(
    state: dict[str, Any], path: Path, data_path: str | None, images: int, batches: int,
    strict: bool,
) -> None:  # fmt: skip
    """The data may move (data.path may change), the order of its batches may not: that is a
    function of the number of images and of batches per epoch (and of the seed), which the
    checkpoint `state` at `path` holds.

    Raises:
        UserError: (strict) they differ; without strict, a warning.
    """
    saved = state.get("data", {})
    now = (images, batches)
    # Checkpoints written before the image count was saved: the batches alone.
    before = (saved.get("images", images), saved.get("steps_per_epoch", batches))
    if before == now:
        return
    saved_path = state["config"].get("data", {}).get("path")
    problem = (
        f"{path}: the data (data.path={data_path}) gives {images} images and {batches} batches "
        f"per epoch, the run was saved with {before[0]} images and {before[1]} batches "
        f"(data.path={saved_path}), so the resumed data order differs"
    )
    if strict:
        raise UserError(f"{problem}; point data.path at the run's data, or pass --strict false")
    print(f"warning (--strict false): {problem}", file=sys.stderr)


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
    """Deletes what a run wrote (RUN_FILES, its numbered checkpoints, the temporary files of
    its atomic writes, RUN_FOLDERS) and nothing else: files a user put beside it are kept and
    named."""
    if not output_dir.is_dir():
        return
    removed = [output_dir / name for name in RUN_FILES if (output_dir / name).is_file()]
    removed += CheckpointStore(output_dir, 0).numbered()
    for pattern in RUN_TEMPORARIES:
        removed += sorted(output_dir.glob(pattern))
    for path in removed:
        path.unlink()
    for name in RUN_FOLDERS:
        if (output_dir / name).is_dir():
            shutil.rmtree(output_dir / name)
            removed.append(output_dir / name)
    kept = sorted(p.name for p in output_dir.iterdir() if p.name != LOCK_NAME)
    if removed:
        names = ", ".join(p.name + "/" * (p.name in RUN_FOLDERS) for p in removed)
        print(
            f"--overwrite: removed {names} from {output_dir}"
            + (f"; kept {', '.join(kept)} (not written by ssl-kd)" if kept else "")
        )


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
