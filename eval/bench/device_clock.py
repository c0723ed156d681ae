"""Step timing and memory on a CPU or CUDA device, for the GPU sections of the step benchmarks.

A step's time is taken from a finished device to a finished device (`torch.cuda.synchronize`
on both sides), so it covers the kernels and not only their launches. Memory: the variants of a
benchmark are held at once to run round-robin, so the allocator's peak counts them all; a
variant's own peak is what it holds between steps (`allocated` before its build and after its
warm-up) plus its steps' highest transient above what was allocated before each.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    """Bytes the caching allocator has handed out on `device` (0 off CUDA)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def timed(step: Callable[[], object], device: torch.device) -> tuple[float, int | None]:
    """Seconds of one `step()`, and its transient peak of allocated bytes above what was
    allocated before it (None off CUDA)."""
    synchronize(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = allocated(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated(device) - before if cuda else None


def or_oom(action: Callable[[], T]) -> T | None:
    """`action()`, or None when the device ran out of memory. The failed step's tensors are
    free once the handler has exited; the caller drops the variant, then calls `release`."""
    try:
        return action()
    except torch.OutOfMemoryError:
        return None


def release(device: torch.device) -> None:
    """Hands memory nothing references any more (a dropped variant) back to the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class SpanTimer:
    """Summed durations of stretches inside a step (a teacher's forward), read after the step:
    CUDA events on a GPU, where the host's clock would see only the launches; the host's else."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host_s = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def span(self) -> Iterator[None]:
        if not self.cuda:
            start = time.perf_counter()
            yield
            self.host_s += time.perf_counter() - start
            return
        begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        begin.record()
        yield
        end.record()
        self.events.append((begin, end))

    def seconds(self) -> float:
        """The sum since the last call (once the device has finished the step), then reset."""
        total = self.host_s + sum(b.elapsed_time(e) for b, e in self.events) / 1e3  # ms → s
        self.host_s, self.events = 0.0, []
        return total
