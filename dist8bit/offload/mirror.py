"""One parameter's host side: its fp32 master copy, its host gradient and the copies between them.

Why a separate object per parameter: the gradient hook, the step and
zero_grad all need the same three facts about a parameter (where its local
shard lives, whether the host copy aliases it, which copy is in flight), and
keeping them together keeps the optimizer free of device bookkeeping.
"""

from __future__ import annotations

import torch

from ..optim import sharded


def _pinned_empty(like: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    return torch.empty(like.shape, dtype=dtype, device="cpu", pin_memory=pin)


class HostMirror:
    """The host copy of one parameter (its local shard under FSDP2) that the inner optimizer steps.

    On a CUDA parameter the master is a pinned fp32 host tensor, gradients
    arrive in a pinned host buffer through a side stream, and updates go back
    with a non-blocking copy. On a CPU float32 parameter the master *is* the
    parameter's storage and the host gradient *is* its gradient: no copies,
    no streams, the same logic.
    """

    def __init__(self, param: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
        self.param = param
        self.stream = stream if self.local().is_cuda else None
        local = self.local().detach()
        self.aliases = local.device.type == "cpu" and local.dtype == torch.float32
        if self.aliases:
            self.master = local
        else:
            self.master = _pinned_empty(local, torch.float32, pin=self.stream is not None)
            self.master.copy_(local)
        # Gradients arrive in the parameter's own dtype (half the copy bytes for
        # bf16); the CPU kernel reads bf16/fp16 gradients against fp32 masters.
        self.master.grad_dtype = None
        self._buffer: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        self.received = False  # a gradient was copied since the last step
        self.submitted = False  # handed to the overlapped host step since the last step

    def local(self) -> torch.Tensor:
        """The parameter's local tensor (its shard under FSDP2), sharing storage with it."""
        with torch.no_grad():
            return sharded.local(self.param)

    def receive_grad(self, free_device_grad: bool) -> None:
        """Copy the parameter's (accumulated) gradient to the host; called by its post-accumulate hook."""
        grad = self.param.grad
        if grad.is_sparse:
            raise RuntimeError(
                f"CPUOffloadOptimizer does not support sparse gradients (parameter of shape {tuple(self.param.shape)}); "
                "use torch.nn.Embedding(sparse=False)"
            )
        grad = sharded.local(grad)
        if self.stream is None:
            self.master.grad = grad if grad.device.type == "cpu" else grad.cpu()
        else:
            if self._buffer is None or self._buffer.dtype != grad.dtype:
                self._buffer = _pinned_empty(grad, grad.dtype, pin=True)
            # The side stream must see the gradient that backward just wrote.
            self.stream.wait_stream(torch.cuda.current_stream(grad.device))
            with torch.cuda.stream(self.stream):
                self._buffer.copy_(grad, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record(self.stream)
            if free_device_grad:
                grad.record_stream(self.stream)  # keep its memory alive until the copy has read it
            self.master.grad = self._buffer
        self.received = True
        if free_device_grad:
            self.param.grad = None

    def before_accumulate(self) -> None:
        """Order the next write into the device gradient after the copy still reading it (a tensor hook,
        which autograd runs before it accumulates into .grad): a stream dependency, not a host wait."""
        if self._event is not None:
            torch.cuda.current_stream(self.param.device).wait_event(self._event)

    @property
    def nbytes(self) -> int:
        """Host bytes of the master, what the overlapped step's buckets are sized by."""
        return self.master.numel() * self.master.element_size()

    def wait(self) -> None:
        """Block until the gradient's device-to-host copy has landed (safe from the host-step thread too)."""
        event = self._event
        if event is not None:
            event.synchronize()
            self._event = None

    def write_back(self) -> None:
        """Copy the updated master into the parameter (non-blocking from pinned memory on CUDA)."""
        if self.aliases:
            return
        with torch.no_grad():
            self.local().copy_(self.master, non_blocking=self.stream is not None)

    def clear_grad(self, set_to_none: bool) -> None:
        self.wait()
        if set_to_none:
            self.master.grad = None
        elif self.master.grad is not None:
            self.master.grad.zero_()
