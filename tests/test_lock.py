"""One run per output dir (ssl_kd/engine/lock.py): a second run exits 2 naming the holder and
touches nothing, not even the temporary file of the holder's save in progress; a lock left by
a dead process is taken over; without kernel locks the pid/host record decides."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ssl_kd.cli import main
from ssl_kd.engine.checkpoint import STOP_IN_SAVE_ENV, load_checkpoint
from ssl_kd.engine.lock import RunLock, RunLocked
from ssl_kd.engine.trainer import train
from tests.helpers import start_cli, tiny_config, tiny_overrides

THREADS = {"OMP_NUM_THREADS": "2"}


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def record(run):
    return json.loads((run / ".lock").read_text())


def wait_until_stopped(pid: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        assert state != "Z", "the process ended before it stopped in its save"
        time.sleep(0.05)
    raise AssertionError("the process never stopped in its save")


def test_second_run_exits_2_naming_the_holder_and_leaves_its_save_alone(tmp_path, capsys):
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    extra = {"train.max_steps": 4, "train.checkpoint_every_steps": 2}
    args = ["train", str(config), *tiny_overrides(run, **extra)]
    # The first run freezes (SIGSTOP) inside its first save: temporary file written, not renamed.
    first = start_cli(*args, env={**THREADS, STOP_IN_SAVE_ENV: "1"})
    try:
        wait_until_stopped(first.pid)
        temporary = run / f".checkpoint.pth.tmp-{first.pid}"
        assert temporary.is_file()
        holder = record(run)
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()

        # A second `ssl-kd train` (in this process: the lock is between processes anyway).
        assert main([*args, "masking.keep_ratio=1.0"]) == 2  # same dir, any config
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert (
            f"output_dir {run} is in use by another run: pid {first.pid} on host "
            f"{socket.gethostname()}, since {holder['since']}"
        ) in err
        assert temporary.is_file() and record(run) == holder  # nothing of the first run touched
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert load_checkpoint(run / "checkpoint.pth")["step"] == 4
    assert (run / ".lock").read_text() == ""  # released: the record is emptied


def test_a_dead_processs_lock_is_taken_over_and_reported(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    stale = {"pid": dead_pid(), "host": socket.gethostname(), "since": "2024-01-01T00:00:00"}
    (run / ".lock").write_text(json.dumps(stale))  # what a SIGKILLed run leaves
    train(tiny_config(run, **{"train.max_steps": 1}))
    assert (
        f"took over the lock of pid {stale['pid']} on host {stale['host']}, since "
        f"2024-01-01T00:00:00 (no longer running), which ended without releasing it"
    ) in capsys.readouterr().out
    assert (run / ".lock").read_text() == ""


def test_without_kernel_locks_the_record_decides(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for holder in ({"pid": live.pid, "host": socket.gethostname()},
                       {"pid": 1234, "host": "another-node"}):  # fmt: skip
            (tmp_path / ".lock").write_text(json.dumps({**holder, "since": "today"}))
            with pytest.raises(RunLocked, match=f"pid {holder['pid']} on host {holder['host']}"):
                RunLock(tmp_path).acquire()
    finally:
        live.kill()
        live.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
    lock = RunLock(tmp_path)
    assert "no longer running" in (lock.acquire() or "")
    assert record(tmp_path)["pid"] == os.getpid()
    lock.release()


def test_the_lock_excludes_within_one_process_too(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
        second.acquire()  # flock locks belong to open files, not to processes
    first.release()
    assert second.acquire() is None
    second.release()
