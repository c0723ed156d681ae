"""Shared test helpers (not fixtures, those live in conftest.py): tiny ViTs and configs, a
digits image folder, an MAE teacher checkpoint, and the one way tests start `ssl-kd` processes.

Test modules import shared code from here only, never from another test module or conftest.py
(tests/test_layout.py checks this).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_kd.config import Config
from ssl_kd.models.backbone import ViTBackbone, create_backbone
from ssl_kd.run_config import load_config

REPO = Path(__file__).resolve().parents[1]

TINY_VIT = {"patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}


# --- tiny models and configs ----------------------------------------------------------------
def tiny_backbone(img_size: int = 32, **overrides) -> ViTBackbone:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", img_size, **{**TINY_VIT, **overrides})


def tiny_overrides(output_dir: Path, **extra: object) -> list[str]:
    values: dict[str, object] = {
        "output_dir": str(output_dir),
        "model.name": "vit_tiny_patch16_224",
        "model.img_size": 32,
        "model.kwargs": "{patch_size: 4, embed_dim: 64, depth: 2, num_heads: 2}",
        "data.name": "digits",
        "data.transform": "batched",
        "data.global_crop_size": 32,
        "data.local_crop_size": 16,
        "data.num_local_views": 2,
        "dino.out_dim": 128,
        "dino.hidden_dim": 64,
        "dino.bottleneck_dim": 32,
        "masking.keep_ratio": 0.5,
        "optim.warmup_epochs": 1,
        "train.epochs": 2,
        "train.batch_size": 32,
        "train.log_every_steps": 2,
        "train.checkpoint_every_steps": 1000,
        "train.max_steps": 6,
        "eval.knn_at_end": False,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def tiny_config(output_dir: Path, **extra: object) -> Config:
    return load_config(None, tiny_overrides(output_dir, **extra))


# --- the originals' formulas, written out independently -------------------------------------
def mae_sincos_reference(dim: int, size: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed(dim, size) without the [CLS] row: meshgrid with w first,
    half the channels from each coordinate, omega in float64."""

    def one_axis(half: int, positions: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(half // 2, dtype=np.float64) / (half / 2.0))
        angles = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    axis = np.arange(size, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis), axis=0).reshape(2, 1, size, size)
    return np.concatenate([one_axis(dim // 2, grid[0]), one_axis(dim // 2, grid[1])], axis=1)


# --- data and teacher files -----------------------------------------------------------------
def train_stream(cfg: Config, views: Any = None, rank: int = 0, world_size: int = 1) -> Any:
    """The stream a Trainer builds for `cfg` (DINO's multi-crop views unless told)."""
    from ssl_kd.data import Views, build_train_stream

    return build_train_stream(
        cfg.data, views or Views.MULTI_CROP, cfg.train.batch_size, cfg.train.seed, rank,
        world_size,
    )  # fmt: skip


def write_digit_folder(root, per_class=4):  # type: ignore[no-untyped-def]
    """An ImageFolder of digits PNGs: `per_class` images in each of class_0 .. class_2."""
    from PIL import Image

    from ssl_kd.data import digits

    images, labels, _, _ = digits(0)
    for c in range(3):
        (root / f"class_{c}").mkdir(parents=True)
        for i, index in enumerate((labels == c).nonzero().flatten()[:per_class].tolist()):
            array = (images[index].permute(1, 2, 0) * 255).byte().numpy()
            Image.fromarray(array).save(root / f"class_{c}" / f"{i}.png")


def teacher_backbone() -> ViTBackbone:
    """The tiny MAE teacher of the DMAE tests: wider and deeper than `tiny_backbone()`."""
    return tiny_backbone(embed_dim=96, depth=4, num_heads=3)


def official_mae_state(backbone: ViTBackbone) -> dict[str, Any]:
    """A checkpoint laid out as the official MAE release's (`model` with decoder keys)."""
    state = {k: v.clone() for k, v in backbone.vit.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 1, 32)
    state["decoder_embed.weight"] = torch.zeros(32, backbone.embed_dim)
    state["decoder_pred.bias"] = torch.zeros(48)
    return {"model": state, "optimizer": {}, "epoch": 799}


class _RunsAShellCommand:
    """Unpickling this calls os.system(command): what a hostile `.pth` file does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


def write_malicious_checkpoint(path: Path, marker: Path, pickle_protocol: int = 2) -> None:
    """A `.pth` that looks like a backbone state dict and, when unpickled, creates `marker`
    (`touch`): reading it must never create the file."""
    state = {"model": {"cls_token": torch.zeros(1, 1, 64)}, "epoch": 1}
    state["args"] = _RunsAShellCommand(f"touch {marker}")
    torch.save(state, path, pickle_protocol=pickle_protocol)


# --- file systems ---------------------------------------------------------------------------
@contextlib.contextmanager
def mounted_tmpfs(mountpoint: Path, options: str) -> Iterator[Path]:
    """A real tmpfs at `mountpoint` (`options`: e.g. `size=1m` or `ro`), unmounted at the end,
    for tests of full and read-only file systems. Skips the test where mounting is not allowed
    (not root, or no CAP_SYS_ADMIN in this container)."""
    import pytest

    mountpoint.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)]
    try:
        mounted = subprocess.run(mount, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30)


def fill(folder: Path) -> None:
    """Writes into `folder` until its file system is full (ENOSPC)."""
    import errno

    with open(folder / "filler", "wb", buffering=0) as handle:  # unbuffered: close never fails
        try:
            while True:
                handle.write(bytes(64 << 10))
        except OSError as err:
            assert err.errno == errno.ENOSPC, err


# --- real `ssl-kd` processes ----------------------------------------------------------------
def _cli_command(args: Sequence[str], launcher: Sequence[str]) -> list[str]:
    return [sys.executable, *launcher, "-m", "ssl_kd.cli", *map(str, args)]


def _checkout_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """os.environ + `env`, with this checkout first on PYTHONPATH so that the process (and
    every process it starts) imports this checkout's ssl_kd, whatever is installed."""
    merged = {**os.environ, **(env or {})}
    rest = merged.get("PYTHONPATH")
    merged["PYTHONPATH"] = os.pathsep.join([str(REPO), *([rest] if rest else [])])
    return merged


def run_cli(
    *args: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    timeout: float | None = 300,
    cwd: str | os.PathLike[str] | None = None,
    launcher: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Runs `python [launcher...] -m ssl_kd.cli *args` to its end; text output captured.

    The environment is os.environ + `env`, with this checkout first on PYTHONPATH. `launcher`
    goes between the interpreter and `-m ssl_kd.cli`, e.g. ("-m", "torch.distributed.run",
    "--standalone", "--nproc-per-node=2") for torchrun.
    """
    return subprocess.run(
        _cli_command(args, launcher),
        capture_output=True,
        text=True,
        env=_checkout_env(env),
        timeout=timeout,
        cwd=cwd,
    )


def start_cli(
    *args: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[str]:
    """Starts `python -m ssl_kd.cli *args` and returns at once, for tests that signal or kill
    the running process; stdout and stderr are text pipes (read them with communicate()).

    `new_session`: the process leads its own process group (its pid is the group's id), which a
    test may signal as a whole (`os.killpg`) as schedulers do, DataLoader workers included.
    """
    return subprocess.Popen(
        _cli_command(args, ()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_checkout_env(env),
        cwd=cwd,
        start_new_session=new_session,
    )


def run_python(
    code: str, env: Mapping[str, str] | None = None, timeout: float | None = 300
) -> subprocess.CompletedProcess[str]:
    """Runs `python -c code` in a fresh interpreter that imports this checkout's ssl_kd, for
    checks of what a process does from its start (e.g. which modules `ssl-kd` imports)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_checkout_env(env),
        timeout=timeout,
    )


def wait_for_step(process: subprocess.Popen[str], run: Path, step: int) -> None:
    """Returns as soon as `run/metrics.jsonl` shows `step` logged.

    Raises:
        AssertionError: the process ended first, or 240 s passed.
    """
    import time

    logged = run / "metrics.jsonl"
    deadline = time.time() + 240
    prefix = f'{{"step": {step},'
    while time.time() < deadline and process.poll() is None:
        if logged.exists() and any(
            line.startswith(prefix) for line in logged.read_text().splitlines()
        ):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} was never logged (exit status {process.poll()})")


def kill_after_step(process: subprocess.Popen[str], run: Path, step: int) -> None:
    """SIGKILLs a training process as soon as `run/metrics.jsonl` shows `step` logged.

    Raises:
        AssertionError: the run ended by itself before it could be killed.
    """
    import signal

    wait_for_step(process, run, step)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def kill_and_resume(
    args: Sequence[str], run: Path, kill_step: int, env: Mapping[str, str] | None = None
) -> int:
    """Starts `ssl-kd *args`, SIGKILLs it once `kill_step` is logged in `run`, then runs the same
    command to its end; returns the checkpoint step the second run resumed from.

    Raises:
        AssertionError: the resumed run failed, or did not say it resumed from that step.
    """
    from ssl_kd.engine.checkpoint import load_checkpoint

    kill_after_step(start_cli(*args, env=env), run, kill_step)
    saved = int(load_checkpoint(run / "checkpoint.pth")["step"])
    resumed = run_cli(*args, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {saved}" in resumed.stdout
    return saved


def bench(name: str):  # type: ignore[no-untyped-def]
    """The benchmark script eval/bench/NAME.py as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "eval" / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve string annotations through sys.modules, so the module must be there.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
