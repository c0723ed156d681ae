"""SIGTERM stops a run at the next step boundary, after a final checkpoint (exit status 143).

Slurm, Kubernetes, torchrun and most schedulers send SIGTERM some seconds before SIGKILL. The
handler only raises a flag; the trainer reads it once per step (all-reduced with the step's
metrics, so every rank stops at the same step), saves `checkpoint.pth` and raises
`errors.Terminated`. A second SIGTERM ends the process at once (the default action again): the
checkpoint on disk is still whole, every save being atomic.

The handler is installed only where nobody else handles SIGTERM (its action is the default) and
in the main thread: a submitit job keeps submitit's handling (it ignores SIGTERM and requeues
the job on its USR2 signal; the requeued run resumes from the last checkpoint).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class StopRequest:
    """A context manager: while inside it, SIGTERM sets `requested` instead of killing."""

    def __init__(self) -> None:
        self.requested = False
        self._installed = False

    def __enter__(self) -> StopRequest:
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._installed = False
