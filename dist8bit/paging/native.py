"""Managed memory on CUDA devices: the dist8bit_paging operators of the CUDA extension.

csrc/cuda/paging.cu does the CUDA runtime calls, csrc/cuda/paging_binding.cpp
registers them as torch operators; this module adds the stream handling.
Placement changes (advice plus prefetch) run on one side stream per device
and end in an event that the current stream waits on: the host never waits,
the copies overlap whatever the current stream still has queued (the tail of
the backward pass when called at the start of an optimizer step), and the
optimizer kernels start only once their states have arrived.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import torch

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


class CudaPaging:
    """The page manager's backend on CUDA (see dist8bit.paging.manager.PagingBackend)."""

    def __init__(self) -> None:
        self._reasons: dict[torch.device, str | None] = {}
        self._side_streams: dict[int, torch.cuda.Stream] = {}

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
        if not ops.concurrent_managed_access(index):
            return (
                f"cuda:{index} ({torch.cuda.get_device_name(index)}) has no concurrent managed access "
                "(cudaDevAttrConcurrentManagedAccess = 0, as on Windows or GPUs before Pascal)"
            )
        return None

    def allocate(self, nbytes: int, device: torch.device, on_device: bool) -> torch.Tensor:
        index = _index(device)
        stream = torch.cuda.current_stream(index).cuda_stream
        return operators().alloc(nbytes, index, index if on_device else HOST, stream)

    def place(self, ranges: Sequence[tuple[int, int]], device: torch.device, to_host: bool) -> None:
        index = _index(device)
        ops = operators()
        ptrs, sizes = [r[0] for r in ranges], [r[1] for r in ranges]
        ops.advise(ptrs, sizes, index, to_host)
        side = self._side_stream(index)
        ops.prefetch(ptrs, sizes, HOST if to_host else index, side.cuda_stream)
        arrived = torch.cuda.Event()
        arrived.record(side)
        torch.cuda.current_stream(index).wait_event(arrived)

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

    def _side_stream(self, index: int) -> torch.cuda.Stream:
        if index not in self._side_streams:
            self._side_streams[index] = torch.cuda.Stream(device=index)
        return self._side_streams[index]
