"""Managed memory on CUDA devices: the dist8bit_paging operators of the CUDA extension.

csrc/cuda/paging.cu does the CUDA runtime calls, csrc/cuda/paging_binding.cpp
registers them as torch operators; this module adds the stream handling and
turns failures into the fallback.

Streams. Placement changes (advice plus prefetch) are queued on torch's
current stream of the device: a move runs after the work already queued there
(a state is never migrated under a kernel that still updates it) and before
the optimizer kernels queued next, and the host never waits. Released memory
is freed in the same stream order (see paging.cu).

Failures. The operators return a CUDA failure as a status string (the CUDA
error state already cleared) instead of raising. An allocation that fails
raises PagingFailure here, which the page manager turns into ordinary device
memory and one warning; an advice or prefetch that fails on memory that is
already managed only warns (once per process): the memory stays valid, only
its placement is not what the policy asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import torch

from .fallback import PagingFailure, warn_failed

HOST = -1  # location value of host memory (cudaCpuDeviceId)
UNSET = -2  # no single location recorded for the range (cudaInvalidDeviceId)


@cache
def _load() -> None:
    from ..backends import load_backend

    load_backend("cuda")  # builds (once) and loads the CUDA extension, which registers dist8bit_paging


def operators() -> Any:
    """torch.ops.dist8bit_paging, loading the CUDA extension first (RuntimeError if it cannot be had)."""
    _load()
    namespace = torch.ops.dist8bit_paging
    try:
        namespace.alloc  # noqa: B018 - resolving the attribute is the check
    except (AttributeError, RuntimeError) as error:
        raise RuntimeError("the CUDA extension loaded but registered no dist8bit_paging operators") from error
    return namespace


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _current_stream(index: int) -> int:
    """Handle of torch's current stream on device `index`: where moves and releases are ordered."""
    return torch.cuda.current_stream(index).cuda_stream


def _warn_on_failure(*statuses: str) -> None:
    for status in statuses:
        if status:
            warn_failed(status)


class CudaPaging:
    """The page manager's backend on CUDA (see dist8bit.paging.manager.PagingBackend)."""

    def __init__(self) -> None:
        self._reasons: dict[torch.device, str | None] = {}

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device not in self._reasons:
            self._reasons[device] = self._check(device)
        return self._reasons[device]

    @staticmethod
    def _check(device: torch.device) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device is available (torch.cuda.is_available() is False)"
        if device.type != "cuda":
            return f"the states live on {device}; only CUDA tensors can be paged"
        try:
            ops = operators()
        except RuntimeError as error:
            return f"the CUDA extension could not be loaded ({str(error).splitlines()[0]})"
        index = _index(device)
        try:
            concurrent = ops.concurrent_managed_access(index)
        except RuntimeError as error:
            return f"cuda:{index} could not be queried ({error})"
        if not concurrent:
            return (
                f"cuda:{index} ({torch.cuda.get_device_name(index)}) has no concurrent managed access "
                "(cudaDevAttrConcurrentManagedAccess = 0, as on Windows or GPUs before Pascal)"
            )
        return None

    def allocate(self, nbytes: int, device: torch.device, on_device: bool) -> torch.Tensor:
        """Managed memory first placed on the device or the host; PagingFailure if cudaMallocManaged fails."""
        index = _index(device)
        raw, status = operators().alloc(nbytes, index, index if on_device else HOST, _current_stream(index))
        if raw is None:
            raise PagingFailure(status)
        _warn_on_failure(status)  # only the first placement failed: the memory is managed and usable
        return raw

    def place(self, ranges: Sequence[tuple[int, int]], device: torch.device, to_host: bool) -> None:
        index = _index(device)
        ops = operators()
        ptrs, sizes = [r[0] for r in ranges], [r[1] for r in ranges]
        advised = ops.advise(ptrs, sizes, index, to_host)
        # Prefetched even when the advice failed: the pages still move, only the driver may move them back.
        moved = ops.prefetch(ptrs, sizes, HOST if to_host else index, _current_stream(index))
        _warn_on_failure(advised, moved)

    def on_host(self, ranges: Sequence[tuple[int, int]]) -> list[bool]:
        if not ranges:
            return []
        flat = operators().locations([r[0] for r in ranges], [r[1] for r in ranges])
        pairs = zip(flat[0::2], flat[1::2], strict=True)
        # The last prefetch decides; a range never prefetched as a whole falls back to its preference.
        return [last == HOST or (last == UNSET and preferred == HOST) for preferred, last in pairs]

    def memory(self, device: torch.device) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(_index(device))
        return int(free), int(total)

    def live(self) -> tuple[int, int]:
        if not torch.cuda.is_available():
            return 0, 0
        count, nbytes = operators().live()
        return int(count), int(nbytes)

    def reclaim(self, wait: bool) -> None:
        if not torch.cuda.is_initialized():
            return  # no CUDA call made yet: nothing was ever allocated
        index = torch.cuda.current_device()
        _warn_on_failure(operators().reclaim(index, _current_stream(index), wait))
