"""The page manager: every paged state allocation, where it is, and the per-step policy.

Allocations are tracked weakly: a record lives exactly as long as the tensor
storage that owns the managed memory (a finalizer on the storage drops it,
when the storage's deleter frees the memory), so the manager never keeps a
state alive and deleting an optimizer releases its memory.

The per-step policy runs in a torch.optim step pre-hook (installed once per
process with the first paged allocation) for optimizers built with
is_paged=True, before any of their kernels are queued:
  1. states that are not in managed memory (ordinary copies that
     load_state_dict put in place) are moved into it, once per state dict;
  2. with a budget or threshold set: the step's parameters are marked used,
     and under pressure the coldest resident states move to host memory, or,
     when pressure has ended, the hottest evicted states that fit come back.
Moves are advice plus a prefetch queued on the current stream, after the work
already there (dist8bit.paging.native): no host synchronisation, per parameter
or otherwise. An evicted state prefers host memory and stays mapped for its
GPU, so its kernel updates it in place over the interconnect rather than
faulting its pages back. With no limits set nothing runs after step 1 and
paged states cost nothing per step.

A paging call that fails never raises out of optimizer.step(): a state whose
managed allocation fails gets ordinary device memory, a move that fails
leaves the state where the driver keeps it, and the process gets one warning
(dist8bit.paging.fallback). A step being captured into a CUDA graph is
refused before anything is placed (dist8bit.paging.capture).
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .capture import refuse_graph_capture
from .fallback import PagingFailure, warn_failed, warn_unavailable
from .native import CudaPaging
from .policy import Candidate, Limits, check_budget, check_threshold, coldest_first, deficit, headroom, hottest_that_fit

# State tensors smaller than this stay in ordinary memory: 8-bit scales, biases
# and norms are a rounding error of the state's size, and each managed range
# costs a driver call per move and at least one page.
MIN_PAGED_BYTES = 1 << 16


class PagingBackend(Protocol):
    """What the manager needs from the device side (CUDA: native.CudaPaging)."""

    def unavailable_reason(self, device: torch.device) -> str | None: ...

    def allocate(self, nbytes: int, device: torch.device, on_device: bool) -> torch.Tensor:
        """Managed memory; raises PagingFailure when the device refuses it (the caller falls back)."""
        ...

    def place(self, ranges: Sequence[tuple[int, int]], device: torch.device, to_host: bool) -> None: ...

    def on_host(self, ranges: Sequence[tuple[int, int]]) -> list[bool]: ...

    def memory(self, device: torch.device) -> tuple[int, int]: ...

    def live(self) -> tuple[int, int]: ...

    def reclaim(self, wait: bool) -> None: ...


@dataclass
class _Allocation:
    nbytes: int
    device: torch.device
    on_host: bool  # where the manager last placed it
    token: object = field(default_factory=object)  # tells this record from a later one at the same address


@dataclass
class _OptimizerView:
    state_id: int | None = None  # id of the optimizer.state dict last moved into managed memory
    last_use: dict[int, int] = field(default_factory=dict)  # id(param) -> tick of its last update


@dataclass(frozen=True)
class Residency:
    """Bytes of paged state on the device and in host memory, as the driver records them.

    The CUDA runtime has no per-page residency query; each managed range counts
    where cudaMemRangeGetAttribute says it was last prefetched to (the manager
    places every range by prefetching it). `unpaged_bytes` are state bytes of
    the optimizer asked about that live in ordinary memory (small states, or
    everything where paging fell back).
    """

    device_bytes: int
    host_bytes: int
    unpaged_bytes: int
    allocations: int

    def __str__(self) -> str:
        mib = 1 << 20
        return (
            f"paged states: {self.device_bytes / mib:.1f} MiB on the GPU, {self.host_bytes / mib:.1f} MiB in host memory "
            f"({self.allocations} allocations); unpaged: {self.unpaged_bytes / mib:.1f} MiB"
        )


class PageManager:
    """Tracks managed state allocations and moves them between device and host."""

    def __init__(self, backend: PagingBackend) -> None:
        self.backend = backend
        self.limits = Limits()
        self._allocations: dict[int, _Allocation] = {}
        self._resident: dict[torch.device, int] = defaultdict(int)
        self._evicted: dict[torch.device, int] = defaultdict(int)
        self._optimizers: weakref.WeakKeyDictionary[torch.optim.Optimizer, _OptimizerView] = weakref.WeakKeyDictionary()
        self._tick = 0

    # ------------------------------------------------------------ allocation
    def pageable(self, device: torch.device) -> bool:
        reason = self.backend.unavailable_reason(device)
        if reason is not None:
            warn_unavailable(reason)
        return reason is None

    def allocate(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """Uninitialised managed memory shaped like a state, or None where it should stay ordinary."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_PAGED_BYTES or not self.pageable(device):
            return None
        # A state is born on the device only if it fits; else it starts evicted,
        # so allocating never oversubscribes the GPU.
        on_device = nbytes <= self._room(device)
        try:
            raw = self.backend.allocate(nbytes, device, on_device)
        except PagingFailure as failure:
            warn_failed(str(failure))
            return None  # the caller allocates ordinary memory on the device
        self._track(raw, device, on_host=not on_device)
        _install_step_hook()
        return raw.view(dtype).view(tuple(shape))

    def _room(self, device: torch.device) -> int:
        free, total = self.backend.memory(device)
        if not self.limits.active:
            return free
        return headroom(self.limits, self._resident[device], free, total)

    def _track(self, raw: torch.Tensor, device: torch.device, on_host: bool) -> None:
        ptr = raw.data_ptr()
        record = _Allocation(raw.numel(), device, on_host)
        self._allocations[ptr] = record
        self._count(record, +1)
        finalizer = weakref.finalize(raw.untyped_storage(), self._forget, ptr, record.token)
        finalizer.atexit = False

    def _forget(self, ptr: int, token: object) -> None:
        record = self._allocations.get(ptr)
        if record is not None and record.token is token:
            del self._allocations[ptr]
            self._count(record, -1)

    def _count(self, record: _Allocation, sign: int) -> None:
        (self._evicted if record.on_host else self._resident)[record.device] += sign * record.nbytes

    # ------------------------------------------------------------- step hook
    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not getattr(optimizer, "defaults", {}).get("is_paged"):
            return
        refuse_graph_capture(optimizer)  # before any driver call that would break the capture
        view = self._optimizers.get(optimizer)
        if view is None:
            view = self._optimizers[optimizer] = _OptimizerView()
        if view.state_id != id(optimizer.state):
            self._adopt(optimizer)
            view.state_id = id(optimizer.state)
        if not self.limits.active:
            return
        self._tick += 1
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    view.last_use[id(param)] = self._tick
        self.rebalance()

    def _adopt(self, optimizer: torch.optim.Optimizer) -> None:
        """Move ordinary state tensors (what load_state_dict copies in) into managed memory."""
        for state in optimizer.state.values():
            for name, value in list(state.items()):
                ptr = _storage_ptr(value)
                if ptr is None or ptr in self._allocations:
                    continue
                managed = self.allocate(value.shape, value.dtype, value.device)
                if managed is not None:
                    state[name] = managed.copy_(value)

    # ---------------------------------------------------------------- policy
    def rebalance(self) -> None:
        """Apply the budget/threshold once on every device that holds paged states."""
        holders = [d for d, n in self._resident.items() if n > 0] + [d for d, n in self._evicted.items() if n > 0]
        for device in dict.fromkeys(holders):
            free, total = self.backend.memory(device)
            need = deficit(self.limits, self._resident[device], free, total)
            if need > 0:
                victims = coldest_first(self._candidates(device, on_host=False), need)
                self._move([c.key for c in victims], to_host=True)
            elif self._evicted[device] > 0:
                room = headroom(self.limits, self._resident[device], free, total)
                if room > 0:
                    returning = hottest_that_fit(self._candidates(device, on_host=True), room)
                    self._move([c.key for c in returning], to_host=False)

    def _candidates(self, device: torch.device, on_host: bool) -> list[Candidate]:
        recency: dict[int, tuple[int, int]] = {}
        for optimizer, view in list(self._optimizers.items()):
            for param, state in optimizer.state.items():
                tick = view.last_use.get(id(param), 0)
                for ptr in self._managed_ptrs(state.values()):
                    recency[ptr] = (max(tick, recency.get(ptr, (0, 0))[0]), len(recency))
        return [
            Candidate(ptr, record.nbytes, *recency.get(ptr, (0, -1)))
            for ptr, record in self._allocations.items()
            if record.device == device and record.on_host == on_host
        ]

    def _managed_ptrs(self, values: Iterable[Any]) -> list[int]:
        """Addresses of the managed allocations behind these state values (views counted once)."""
        ptrs: dict[int, None] = {}
        for value in values:
            ptr = _storage_ptr(value)
            if ptr in self._allocations:
                ptrs[ptr] = None
        return list(ptrs)

    def _move(self, ptrs: Sequence[int], to_host: bool) -> None:
        by_device: dict[torch.device, list[int]] = defaultdict(list)
        for ptr in ptrs:
            by_device[self._allocations[ptr].device].append(ptr)
        for device, members in by_device.items():
            self.backend.place([(p, self._allocations[p].nbytes) for p in members], device, to_host)
            for ptr in members:
                record = self._allocations[ptr]
                self._count(record, -1)
                record.on_host = to_host
                self._count(record, +1)

    # ------------------------------------------------------------ public API
    def set_limits(self, budget: int | None, threshold: float | None) -> None:
        self.limits = Limits(check_budget(budget), check_threshold(threshold))

    def move_all(self, to_host: bool, optimizer: torch.optim.Optimizer | None = None) -> None:
        ptrs = self._ptrs_of(optimizer) if optimizer is not None else list(self._allocations)
        self._move(ptrs, to_host)

    def residency(self, optimizer: torch.optim.Optimizer | None = None) -> Residency:
        unpaged = 0
        if optimizer is None:
            ptrs = list(self._allocations)
        else:
            ptrs = self._ptrs_of(optimizer)
            seen: set[int] = set()
            for state in optimizer.state.values():
                for value in state.values():
                    ptr = _storage_ptr(value)
                    if ptr is not None and ptr not in self._allocations and ptr not in seen:
                        seen.add(ptr)
                        unpaged += value.untyped_storage().nbytes()
        ranges = [(p, self._allocations[p].nbytes) for p in ptrs]
        on_host = self.backend.on_host(ranges)
        host = sum(n for (_, n), h in zip(ranges, on_host, strict=True) if h)
        return Residency(sum(n for _, n in ranges) - host, host, unpaged, len(ranges))

    def _ptrs_of(self, optimizer: torch.optim.Optimizer) -> list[int]:
        return self._managed_ptrs(value for state in optimizer.state.values() for value in state.values())


def _storage_ptr(value: Any) -> int | None:
    """Address of the storage behind a state tensor; None for scalars (`step`), non-tensors and
    tensor subclasses (a DTensor's memory is its local tensor's, which the optimizer keeps itself)."""
    if type(value) is not torch.Tensor or value.dim() == 0:
        return None
    return value.untyped_storage().data_ptr()


_manager: PageManager | None = None
_hook_handle: Any = None


def get_manager() -> PageManager:
    """The process-wide page manager (CUDA backend)."""
    global _manager
    if _manager is None:
        _manager = PageManager(CudaPaging())
    return _manager


def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    get_manager().before_step(optimizer)


def _install_step_hook() -> None:
    """One global step pre-hook for the process: paged optimizers need no registration of their own."""
    global _hook_handle
    if _hook_handle is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _hook_handle = register_optimizer_step_pre_hook(_before_step)
