"""Checkpoints written atomically: a crash mid-write never replaces a good checkpoint.

`output_dir/checkpoint.pth` is the one a run resumes from (never a numbered copy: the MAE
requeue bug). `train.keep_checkpoints=K` also keeps `checkpoint-<step>.pth` for the last K
saves, the oldest pruned; once a step was skipped for a non-finite loss, the newest copy from
before it is kept as well. Each numbered copy is a file of its own, written atomically from the
bytes just saved: a hard link would share its data with `checkpoint.pth`, so a tool or a user
rewriting `checkpoint.pth` in place (a `truncate`, a copy over it) would corrupt the newest copy
too, the one `--strict false` falls back on.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssl_kd.errors import UserError, key_list
from ssl_kd.files import write_atomic
from ssl_kd.safe_load import describe_load_error, load_weights_only

CHECKPOINT_NAME = "checkpoint.pth"
IMPLEMENTATION_KEYS = ("foreach", "fused")  # torch optimizer flags a resume keeps as built
REQUIRED_KEYS = ("method", "optimizer", "step", "config")
NUMBERED = re.compile(r"checkpoint-(\d+)\.pth")
COPY_CHUNK = 16 << 20
# Test hooks: SIGKILL (or SIGSTOP: the process waits for a SIGCONT) this process inside its
# N-th save_atomic call (1-based), after the temporary file is fully written and before it
# replaces the checkpoint.
KILL_IN_SAVE_ENV = "SSL_KD_TEST_KILL_IN_SAVE"
STOP_IN_SAVE_ENV = "SSL_KD_TEST_STOP_IN_SAVE"
_saves_in_this_process = 0


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """torch.save through `files.write_atomic`: a crash mid-write leaves the old file."""
    global _saves_in_this_process
    _saves_in_this_process += 1
    hooks = {KILL_IN_SAVE_ENV: signal.SIGKILL, STOP_IN_SAVE_ENV: signal.SIGSTOP}
    signals = [
        sig for env, sig in hooks.items() if os.environ.get(env) == str(_saves_in_this_process)
    ]
    write_atomic(
        path,
        lambda handle: torch.save(state, handle),
        before_replace=(lambda: os.kill(os.getpid(), signals[0])) if signals else None,
    )


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Loads a training checkpoint (tensors and plain types only: nothing in it can run code),
    with errors that say what is wrong and what to do."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = load_weights_only(path, mmap=mmap)
    except UserError:
        raise
    except Exception as err:
        raise UserError(
            f"{path} is not a readable checkpoint ({describe_load_error(err)}). Move it away to "
            "start from scratch, restore it from a backup, or pass --strict false to resume "
            "from the newest readable checkpoint-<step>.pth."
        ) from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(
            f"{path} is not an ssl_kd training checkpoint (missing {', '.join(missing)}: an "
            "exported backbone or another program's file?). Pass --strict false to resume from "
            "the newest checkpoint-<step>.pth beside it, move the file away, or use a fresh "
            "output_dir."
        )
    return state


def numbered_step(path: Path) -> int:
    """The step of a numbered copy, `checkpoint-<step>.pth`."""
    match = NUMBERED.fullmatch(path.name)
    assert match is not None, path
    return int(match.group(1))


class CheckpointStore:
    """`checkpoint.pth` plus the last `keep` numbered copies in one output dir."""

    def __init__(self, output_dir: str | Path, keep: int) -> None:
        self.output_dir = Path(output_dir)
        self.keep = keep

    @property
    def path(self) -> Path:
        return self.output_dir / CHECKPOINT_NAME

    def numbered(self) -> list[Path]:
        """The numbered copies, oldest first."""
        found = [
            (int(match.group(1)), path)
            for path in self.output_dir.glob("checkpoint-*.pth")
            if (match := NUMBERED.fullmatch(path.name))
        ]
        return [path for _, path in sorted(found)]

    def exists(self) -> bool:
        return self.path.exists() or bool(self.numbered())

    def save(self, state: dict[str, Any], step: int, first_skipped: int | None = None) -> None:
        """Writes `checkpoint.pth` and its numbered copy, then prunes all but the newest `keep`
        copies, except the newest one at or before `first_skipped` (the first step skipped
        for a non-finite loss): the last state from before a divergence is never pruned."""
        save_atomic(state, self.path)
        if self.keep <= 0:
            return
        with open(self.path, "rb") as saved:
            write_atomic(
                self.output_dir / f"checkpoint-{step:06d}.pth",
                lambda handle: shutil.copyfileobj(saved, handle, COPY_CHUNK),
            )
        numbered = self.numbered()
        pruned = numbered[: -self.keep]
        if first_skipped is not None:
            before = [path for path in numbered if numbered_step(path) <= first_skipped]
            if before:
                pruned = [path for path in pruned if path != before[-1]]
        for old in pruned:
            old.unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> list[Path]:
        """Temporary files of saves that a kill interrupted (never a complete checkpoint).

        Only with the output dir's lock held (engine/lock.py): a live run's save in progress
        has the same names."""
        stale = sorted(self.output_dir.glob(".checkpoint*.pth.tmp-*"))
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def load_latest(self, strict: bool = True, mmap: bool = False) -> tuple[dict, Path] | None:
        """(state, path) of the checkpoint to resume from, or None for a fresh run.

        Strict: `checkpoint.pth`, and an error naming it if it is unreadable. Not strict: the
        first readable of `checkpoint.pth` and the numbered copies, newest first, reporting the
        ones it passed over.
        """
        if not self.exists():
            return None
        if strict:
            if not self.path.exists():
                newest = self.numbered()[-1]
                raise UserError(
                    f"{self.output_dir} holds {newest.name} but no {CHECKPOINT_NAME}: pass "
                    "--strict false to resume from the newest numbered checkpoint, or "
                    "--overwrite to start afresh"
                )
            return load_checkpoint(self.path, mmap), self.path
        candidates = [self.path] if self.path.exists() else []
        candidates += self.numbered()[::-1]
        problems = []
        for path in candidates:
            try:
                state = load_checkpoint(path, mmap)
            except ValueError as err:
                problems.append(str(err).split(". ")[0])
                continue
            for problem in problems:
                print(f"warning (--strict false): skipped {problem}", file=sys.stderr)
            return state, path
        raise UserError(
            f"no readable checkpoint in {self.output_dir}: {'; '.join(problems)}. Use "
            "--overwrite to start afresh"
        )


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from (the trainer also reseeds per step), as tensors and plain
    types: numpy's MT19937 key array is saved as a list, so a weights-only load reads it."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()}
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any] | None) -> None:
    if not state:
        return
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {
        **numpy_state["state"],
        "key": np.asarray(numpy_state["state"]["key"], np.uint32),
    }
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_model_name(state: dict[str, Any], model_name: str, path: Path) -> None:
    saved = state["config"].get("model", {}).get("name")
    if saved != model_name:
        raise UserError(
            f"{path} was written for model {saved!r}, not {model_name!r}: use another "
            "output_dir, or the original model.name"
        )


def load_method_state(
    method: nn.Module, state: dict[str, torch.Tensor], path: Path, strict: bool = True
) -> list[str]:
    """Loads a method's state dict; returns the report of what did not fit ([] if all did).

    Raises:
        ValueError: strict and the keys differ; names the file and the keys.
    """
    expected = method.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        key for key in set(state) & set(expected) if state[key].shape != expected[key].shape
    )
    if not (missing or unexpected or mismatched):
        method.load_state_dict(state)
        return []
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in mismatched]
    problems = (
        f"missing keys: {key_list(missing)}; unexpected keys: {key_list(unexpected)}; "
        f"shape mismatches (file vs model): {key_list(shapes)}"
    )
    if strict:
        raise UserError(
            f"{path} does not fit this configuration ({problems}). Use the config the run was "
            f"started with ({path.parent / 'config.yaml'}), another output_dir, or --strict "
            "false to load the tensors that fit"
        )
    fitting = {k: v for k, v in state.items() if k in expected and k not in mismatched}
    method.load_state_dict(fitting, strict=False)
    return [
        f"{path}: loaded {len(fitting)} of {len(expected)} tensors ({problems}); the rest keep "
        "their initial values and the optimizer starts afresh"
    ]


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, state: dict[str, Any], path: Path, strict: bool = True
) -> None:
    """Loads the optimizer state saved beside weights that all loaded.

    It fits only if the run trains the same tensors: a MAE/DMAE run saved before ssl_kd froze
    MAE's position embedding trained one tensor more, for instance.

    Raises:
        UserError: (strict) it does not fit; without strict, a warning and a fresh optimizer.
    """
    # How the update runs is this run's choice (optim.implementation), not the checkpoint's.
    groups = optimizer.param_groups
    flags = [{key: group.get(key) for key in IMPLEMENTATION_KEYS} for group in groups]
    try:
        optimizer.load_state_dict(state)
    except ValueError as err:  # torch: "... doesn't match the size of optimizer's group"
        problem = f"{path}: the optimizer state does not fit the parameters this run trains ({err})"
        if strict:
            raise UserError(
                f"{problem}; pass --strict false to resume the weights with a fresh optimizer"
            ) from None
        print(f"warning (--strict false): {problem}; the optimizer starts afresh", file=sys.stderr)
        return
    for group, kept in zip(optimizer.param_groups, flags, strict=True):
        group.update(kept)
        if group.get("fused"):  # the fused kernel reads the step count on the parameter's device
            for param in group["params"]:
                step = optimizer.state.get(param, {}).get("step")
                if step is not None:
                    optimizer.state[param]["step"] = step.to(param.device, torch.float32)
