"""The overlapped host step's machinery: one worker thread, gradient-ready buckets, and who may overlap.

Why one thread: the host steps of one iteration must not race each other on
the fused kernel's thread pool or on the optimizer's bookkeeping (state dict,
non-finite counter), and they must finish in submission order so that a
failure stops the rest. A single worker gives both; the main thread keeps
running backward meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..optim import Optimizer8bit

# Methods that scale a step by norms: the overlapped step runs them on a subset
# of the parameters, which is only equal to a full step when they are per parameter.
SCALE_METHODS = ("update_scale", "trust_ratio")


def mixes_parameters(optimizer_class: type[Optimizer8bit]) -> str | None:
    """The qualified name of a step-scale method that may combine several parameters' statistics, or None.

    Every such method defined in dist8bit works per parameter (LAMB/LARS trust
    ratios, max_unorm, percentile clipping: see dist8bit/optim/norms.py), so
    stepping a bucket equals stepping everything. A method from elsewhere (a
    user subclass) might use global statistics over the batch; it is refused
    for overlap rather than guessed about.
    """
    for name in SCALE_METHODS:
        method = getattr(optimizer_class, name)
        if not method.__module__.startswith("dist8bit."):
            return method.__qualname__
    return None


class HostStepWorker:
    """Runs submitted host steps, in order, on one background thread; errors come back at drain().

    After a job fails the later ones of the same round are skipped (their
    parameters would step against a half-stepped model); drain() re-raises the
    first error itself, so its traceback still shows the worker's frames.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None  # started on first use
        self._futures: list[Future] = []
        self._failed = False

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist8bit-offload-step")
        self._futures.append(self._executor.submit(self._run, job, args))

    def _run(self, job: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if self._failed:
            return
        try:
            job(*args)
        except BaseException:
            self._failed = True
            raise

    @property
    def busy(self) -> bool:
        """Whether jobs were submitted since the last drain()."""
        return bool(self._futures)

    def drain(self) -> None:
        """Wait for every submitted job; raise the first job's error, if any."""
        futures, self._futures = self._futures, []
        first: BaseException | None = None
        for future in futures:
            error = future.exception()
            if error is not None and first is None:
                first = error
        self._failed = False
        if first is not None:
            raise first


class Buckets:
    """Groups parameters in gradient-ready order until a bucket holds `capacity` host bytes.

    Buckets keep the fused kernel's batching (one launch per bucket and
    precision, not per parameter) while still starting the host step long
    before backward ends; capacity 0 makes every parameter its own bucket.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"bucket size must be >= 0 bytes, got {capacity}")
        self.capacity = capacity
        self._items: list[Any] = []
        self._bytes = 0

    def add(self, item: Any, nbytes: int) -> list[Any] | None:
        """Add one item; return the full bucket when this filled it (and start a new one)."""
        self._items.append(item)
        self._bytes += nbytes
        return self.flush() if self._bytes >= self.capacity else None

    def flush(self) -> list[Any] | None:
        """The partial bucket (None when empty), emptied."""
        items, self._items, self._bytes = self._items, [], 0
        return items or None
