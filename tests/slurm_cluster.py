"""A real one-node Slurm cluster on this machine, for the `slurm` tests.

Debian's `slurm-wlm` and `munge` (installed with apt-get when missing and running as root).
munged, slurmctld and slurmd run in the foreground as children of the test process, with their
key, sockets, state and logs under one temporary folder and their own ports, so they touch no
system-wide Slurm; at the end exactly these processes are stopped.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scontrol", "srun", "munge")
PARTITION = "debug"


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message says why (the tests are skipped with it)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def ensure_installed() -> None:
    """Installs slurm-wlm and munge with apt-get if a binary is missing (root only)."""
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable(
            f"{', '.join(missing)} missing and cannot be installed here (needs root and "
            "apt-get): apt-get install slurm-wlm munge"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq",
                                                    "slurm-wlm", "munge"]):  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0:
            raise SlurmUnavailable(
                f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr[-800:]}"
            )
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        raise SlurmUnavailable(f"after apt-get install, still missing: {', '.join(missing)}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_line(node: str) -> str:
    """This machine as a Slurm node: its CPUs and (most of) its memory."""
    out = subprocess.run([_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True)
    cpus = re.search(r"CPUs=(\d+)", out.stdout)
    memory = re.search(r"RealMemory=(\d+)", out.stdout)
    cpu_count = int(cpus.group(1)) if cpus else os.cpu_count() or 1
    memory_mb = int(int(memory.group(1)) * 0.9) if memory else 1024
    return f"NodeName={node} CPUs={cpu_count} RealMemory={memory_mb} State=UNKNOWN"


def write_config(root: Path, node: str) -> Path:
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = f"""\
ClusterName=sslkdtest
SlurmctldHost={node}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmctldPidFile={root}/state/slurmctld.pid
SlurmdPidFile={root}/state/slurmd.pid
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=5
Waittime=0
{_node_line(node)}
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
    path = root / "slurm.conf"
    path.write_text(conf)
    return path


class LocalSlurm:
    """A running cluster: `env` has SLURM_CONF; `run` calls its client commands."""

    def __init__(self, root: Path, conf: Path) -> None:
        self.root = root
        self.conf = conf
        self.partition = PARTITION
        self.env = {**os.environ, "SLURM_CONF": str(conf)}

    def run(self, *command: str, check: bool = True) -> str:
        result = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr}")
        return result.stdout

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False)
        match = re.search(r"JobState=(\S+)", out)
        return match.group(1) if match else "UNKNOWN"

    def job_field(self, job_id: str, name: str) -> str:
        match = re.search(rf"\b{name}=(\S+)", self.run("scontrol", "show", "job", job_id))
        return match.group(1) if match else ""

    def wait(self, job_id: str, timeout: float = 300) -> str:
        """Waits for the job to end; returns its final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in (
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
            ):
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout} s")

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-20:]))
        return "\n".join(parts)


@contextmanager
def local_slurm(root: Path) -> Iterator[LocalSlurm]:
    """Starts munged, slurmctld and slurmd under `root`; stops exactly them at the end."""
    ensure_installed()
    root.chmod(0o755)  # munged checks that its socket's folder is reachable by everyone
    node = socket.gethostname().split(".")[0]
    conf = write_config(root, node)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    commands = [
        [_which("munged"), "--foreground", "--force", f"--socket={root}/munge/munge.socket",
         f"--key-file={key}", f"--log-file={root}/log/munged.log",
         f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/munged.seed"],
        [_which("slurmctld"), "-D", "-c", "-i", "-f", str(conf)],
        [_which("slurmd"), "-D", "-f", str(conf)],
    ]  # fmt: skip
    started: list[subprocess.Popen] = []
    cluster = LocalSlurm(root, conf)
    try:
        for command in commands:
            log = open(root / "log" / f"{Path(str(command[0])).name}.stdout", "w")  # noqa: SIM115
            started.append(
                subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)  # type: ignore[arg-type]
            )
            time.sleep(1)
            if started[-1].poll() is not None:
                raise SlurmUnavailable(f"{command[0]} exited at start:\n{cluster.logs()}")
        deadline = time.monotonic() + 60
        while cluster.run("sinfo", "-h", "-o", "%T", check=False).strip() != "idle":
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"the node never became idle:\n{cluster.logs()}")
            time.sleep(1)
        yield cluster
    finally:
        if started and started[-1].poll() is None:  # cancel what a failed test left running
            cluster.run("scancel", f"--partition={PARTITION}", check=False)
            time.sleep(2)
        for process in reversed(started):  # slurmd, slurmctld, then munged
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
