"""Timing helpers: medians of repeated runs, synchronised on GPUs."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from unittest import mock

import torch

from ..backends import BACKEND_ENV


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    repeats: int
    warmup_ms: float  # the first, untimed-for-the-median call: compilation, allocation, kernel builds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, min_repeats: int = 5, budget_s: float = 2.0) -> Timing:
    """Median wall time of fn() after a warm-up, repeated until the time budget is used."""
    begin = time.perf_counter()
    fn()
    _sync(device)
    warmup_ms = (time.perf_counter() - begin) * 1e3
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < min_repeats or (time.perf_counter() - started < budget_s and len(samples) < 200):
        begin = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - begin) * 1e3)
    return Timing(statistics.median(samples), min(samples), len(samples), warmup_ms)


def copy_bandwidth_gbs(device: torch.device, numel: int = 1 << 24) -> float:
    """Measured memory-copy bandwidth: dst.copy_(src) of float32, read + write bytes.

    On CPUs the store to dst also reads each line first (read for ownership),
    which this count leaves out, so it understates what an in-place kernel can
    reach; rmw_bandwidth_gbs measures that case.
    """
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    timing = time_call(lambda: dst.copy_(src), device, min_repeats=20, budget_s=1.0)
    return 2 * 4 * numel / (timing.median_ms * 1e-3) / 1e9


def rmw_bandwidth_gbs(device: torch.device, numel: int = 1 << 24) -> float:
    """Measured read-modify-write bandwidth: a.add_(b) of float32, 2 reads + 1 write per element.

    An optimizer step updates its tensors in place, like this: no line is
    written without having been read, so this is the traffic pattern its
    bytes bound refers to.
    """
    a = torch.randn(numel, device=device)
    b = torch.randn(numel, device=device)
    timing = time_call(lambda: a.add_(b), device, min_repeats=20, budget_s=1.0)
    return 3 * 4 * numel / (timing.median_ms * 1e-3) / 1e9


@contextlib.contextmanager
def busy_cores(count: int) -> Iterator[None]:
    """Keep `count` other processes spinning (a machine whose other cores are busy)."""
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(count)
    ]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def forced_backend(name: str) -> contextlib.AbstractContextManager:
    """Run the public API on one backend (what DIST8BIT_BACKEND does for users); the old value comes back after."""
    return mock.patch.dict(os.environ, {BACKEND_ENV: name})
