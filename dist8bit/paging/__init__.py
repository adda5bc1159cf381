"""Paged optimizer states: CUDA unified memory that spills to host memory under GPU pressure.

Optimizers built with is_paged=True (or the Paged* classes) keep their large
state tensors in managed memory (cudaMallocManaged), resident on the GPU while
it has room. When free GPU memory drops below a threshold, or paged bytes
exceed a budget, the coldest states move to host memory and are updated there
in place; they come back when the pressure ends. Where paging is unavailable
(no CUDA, no concurrent managed access) paged optimizers use ordinary memory
after one warning. See docs/paging.md.

    dist8bit.paging.set_threshold(0.10)      # keep 10% of GPU memory free
    dist8bit.paging.set_budget(8 << 30)      # or: at most 8 GiB of paged state on each GPU
    print(dist8bit.paging.residency(opt))    # bytes on the GPU / in host memory
    dist8bit.paging.evict_all(); dist8bit.paging.prefetch_all()

Managed memory of dead states is freed in stream order, without waiting for
the device; free_pending() frees what is still waiting for its last kernels.
"""

from __future__ import annotations

import torch

from .allocation import new_state_tensor
from .capture import refuse_graph_capture
from .fallback import PagingFailure
from .manager import MIN_PAGED_BYTES, PageManager, Residency, get_manager

__all__ = [
    "MIN_PAGED_BYTES",
    "PageManager",
    "PagingFailure",
    "Residency",
    "available",
    "evict_all",
    "free_pending",
    "get_manager",
    "managed_memory",
    "new_state_tensor",
    "prefetch_all",
    "refuse_graph_capture",
    "residency",
    "set_budget",
    "set_threshold",
    "warn_if_unavailable",
]


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def available(device: torch.device | str | None = None) -> bool:
    """Whether states on `device` (default: the current CUDA device) can be paged; warns once if not."""
    return get_manager().pageable(torch.device(device) if device is not None else _default_device())


def warn_if_unavailable() -> None:
    """Called by optimizers built with is_paged=True, so a machine that cannot page says so at once."""
    available()


def set_budget(nbytes: int | None) -> None:
    """At most `nbytes` of paged state resident on each GPU (None: no budget); applied at each paged step."""
    manager = get_manager()
    manager.set_limits(nbytes, manager.limits.threshold)


def set_threshold(free_fraction: float | None) -> None:
    """Evict when free GPU memory falls below this fraction of the total (None: off); applied at each paged step."""
    manager = get_manager()
    manager.set_limits(manager.limits.budget, free_fraction)


def prefetch_all(optimizer: torch.optim.Optimizer | None = None) -> None:
    """Bring every paged state (or one optimizer's) to its GPU now, asynchronously."""
    get_manager().move_all(False, optimizer)


def evict_all(optimizer: torch.optim.Optimizer | None = None) -> None:
    """Move every paged state (or one optimizer's) to host memory now, asynchronously.

    They stay there until prefetch_all(), or until a budget/threshold policy
    finds room for them at a later step.
    """
    get_manager().move_all(True, optimizer)


def residency(optimizer: torch.optim.Optimizer | None = None) -> Residency:
    """Where paged state bytes are, for one optimizer or the whole process."""
    return get_manager().residency(optimizer)


def managed_memory() -> tuple[int, int]:
    """(allocations, bytes) of managed memory alive in this process, counted by the allocator itself."""
    return get_manager().backend.live()


def free_pending(wait: bool = True) -> None:
    """Free the managed memory of dead states now, waiting (with `wait`) only for the kernels queued before each died.

    Deleting a paged state never waits: its memory is freed once the work
    queued before its deletion has run, checked at the next managed allocation
    or deletion. Call this to return that memory at a point of your choosing
    (before measuring free memory, say); managed_memory() counts it until then.
    """
    get_manager().backend.reclaim(wait)
