"""CPUOffloadOptimizer: a dist8bit optimizer whose step runs on the host, for GPU parameters.

The device keeps only parameters and (until they are copied) gradients; the
fp32 master weights and the 8-bit states live on the host, owned by an inner
dist8bit optimizer over host tensors whose step is dist8bit's fused CPU
kernel. See docs/offload.md for bytes, overlap and limits.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ..optim import Optimizer8bit
from .mirror import HostMirror
from .overlap import Buckets, HostStepWorker, mixes_parameters

MASTERS_KEY = "offload_masters"
DEFAULT_BUCKET_MB = 25.0  # host master bytes per overlapped step (DDP's default bucket size)


def _check_optimizer_class(optimizer_class: Any) -> None:
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer8bit)):
        raise TypeError(
            f"optimizer_class must be a dist8bit optimizer class (a subclass of dist8bit.optim.Optimizer8bit, e.g. "
            f"dist8bit.optim.AdamW8bit), got {optimizer_class!r}"
        )


class CPUOffloadOptimizer(torch.optim.Optimizer):
    """Steps GPU parameters with a dist8bit optimizer that runs on the host.

    `param_groups` hold the device parameters, as in any torch optimizer, so
    `zero_grad`, LR schedulers and gradient hooks see what they expect; their
    hyper-parameters are handed to the inner optimizer at every step.
    `state_dict()` is the inner optimizer's (same parameter order), so a
    checkpoint loads into a plain dist8bit optimizer of the same class too.

    offload_gradients=True frees each device gradient as soon as its host copy
    is queued (saves a gradient's worth of GPU memory; accumulate gradients
    over several backward passes only inside `accumulating()`).

    overlap_step=True steps each bucket of about `bucket_mb` MB of host masters
    on a background thread as soon as backward has produced its gradients, so
    the host step overlaps the rest of backward. It is a promise: every
    backward outside `accumulating()` is the last one before step(). It is off
    by default because a backward cannot tell whether more micro-batches
    follow, and the default must never step on a partial accumulation.
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_class: type[Optimizer8bit] | None = None,
        *,
        offload_gradients: bool = False,
        overlap_step: bool = False,
        bucket_mb: float = DEFAULT_BUCKET_MB,
        **kwargs: Any,
    ) -> None:
        if optimizer_class is None:
            from ..optim import AdamW8bit

            optimizer_class = AdamW8bit
        _check_optimizer_class(optimizer_class)
        if overlap_step and (method := mixes_parameters(optimizer_class)) is not None:
            warnings.warn(
                f"CPUOffloadOptimizer: {method} may combine several parameters' statistics, which a step per bucket "
                "cannot see; stepping all parameters at step() instead (overlap_step=False)",
                RuntimeWarning,
                stacklevel=2,
            )
            overlap_step = False
        self.offload_gradients = offload_gradients
        self.overlap_step = overlap_step
        self._buckets = Buckets(int(bucket_mb * 2**20))
        self._worker = HostStepWorker()
        self._accumulating = 0  # depth of accumulating() contexts
        self._snapshot: list[dict[str, Any]] | None = None  # hyper-parameters of an open overlapped iteration
        self._write_back_stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._mirrors: dict[torch.Tensor, HostMirror] = {}
        self._hooks: list[Any] = []
        self._pending_host_groups: list[dict[str, Any]] | None = []
        self.inner: Optimizer8bit | None = None
        super().__init__(params, {})
        self.inner = optimizer_class(self._pending_host_groups, **kwargs)
        self._pending_host_groups = None
        self._record_logical_sizes()
        self._pull_hyper_parameters()

    # ----------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        masters = [self._mirror(param).master for param in params]
        host_group = {**{k: v for k, v in param_group.items() if k != "params"}, "params": masters}
        super().add_param_group({**param_group, "params": params})
        if self.inner is None:
            self._pending_host_groups.append(host_group)
        else:
            self.inner.add_param_group(host_group)
            self._record_logical_sizes()
            self._pull_hyper_parameters()

    def _mirror(self, param: torch.Tensor) -> HostMirror:
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"optimizer params must be tensors, got {type(param).__name__}")
        if param in self._mirrors:
            raise ValueError(f"a parameter of shape {tuple(param.shape)} is listed twice")
        mirror = self._mirrors[param] = HostMirror(param, self._stream)
        if param.requires_grad:
            self._hooks.append(param.register_post_accumulate_grad_hook(self._on_grad))
            if mirror.stream is not None:  # gradient accumulation: see HostMirror.before_accumulate
                self._hooks.append(param.register_hook(lambda grad, m=mirror: m.before_accumulate()))
        return mirror

    def _on_grad(self, param: torch.Tensor) -> None:
        """A parameter's gradient is complete for this backward: copy it (and step it, when overlapping)."""
        mirror = self._mirrors[param]
        if mirror.submitted:
            raise RuntimeError(
                f"CPUOffloadOptimizer(overlap_step=True): a second backward reached a parameter of shape "
                f"{tuple(param.shape)} before step(), but it was already handed to the host step with the previous "
                "backward's gradient. Run every backward but the last of an accumulation inside `with optimizer.accumulating():`"
            )
        if self._accumulating:
            mirror.received = False  # more micro-batches follow: the device gradient keeps accumulating
            return
        mirror.receive_grad(self.offload_gradients)
        if self.overlap_step:
            self._submit(mirror)

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[None]:
        """Backward passes inside are not the last before step(): their gradients stay on the device.

        Needed for gradient accumulation with overlap_step=True (otherwise the
        first micro-batch would be stepped) and with offload_gradients=True
        (which would free the gradient being accumulated); it also saves the
        copies of every micro-batch but the last in the default mode.
        """
        self._accumulating += 1
        try:
            yield
        finally:
            self._accumulating -= 1

    # ------------------------------------------------------- overlapped step
    def _submit(self, mirror: HostMirror) -> None:
        """Queue a parameter for the overlapped host step; a full bucket goes to the worker thread."""
        if self._snapshot is None:  # the iteration's first gradient: its hyper-parameters are the ones now
            self._snapshot = [_hyper_parameters(group) for group in self.param_groups]
            self._push_hyper_parameters(self._snapshot)
        mirror.submitted = True
        bucket = self._buckets.add(mirror, mirror.nbytes)
        if bucket is not None:
            self._worker.submit(self._host_step, bucket)

    def _host_step(self, mirrors: list[HostMirror]) -> None:
        """On the worker thread: wait for the bucket's gradient copies, step it, queue the parameters' copies back."""
        for mirror in mirrors:
            mirror.wait()
        self.inner.step_params([mirror.master for mirror in mirrors])
        device_mirrors = [mirror for mirror in mirrors if mirror.stream is not None]
        if device_mirrors:
            # A stream of its own: the main thread orders the next forward after it at step().
            with torch.cuda.stream(self._write_back_stream):
                for mirror in device_mirrors:
                    mirror.write_back()
        for mirror in mirrors:
            if mirror.stream is None:
                mirror.write_back()

    def _finish_overlapped(self) -> None:
        """Send the last partial bucket and wait for the worker; its first error is raised here."""
        bucket = self._buckets.flush()
        if bucket is not None:
            self._worker.submit(self._host_step, bucket)
        try:
            self._worker.drain()
        except BaseException:
            self._end_iteration()
            raise
        if self._write_back_stream is not None:
            torch.cuda.current_stream().wait_stream(self._write_back_stream)  # a device-side dependency, no host wait

    def _end_iteration(self) -> None:
        for mirror in self._mirrors.values():
            mirror.received = False
            mirror.submitted = False
        self._snapshot = None

    def _record_logical_sizes(self) -> None:
        """Precision (8-bit vs 32-bit by min_8bit_size) follows the full parameter, not the local FSDP2 shard."""
        for param, mirror in self._mirrors.items():
            self.inner._logical_numel[mirror.master] = param.numel()

    def _pull_hyper_parameters(self) -> None:
        for outer, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            outer.update({k: v for k, v in inner.items() if k != "params"})

    def _push_hyper_parameters(self, values: list[dict[str, Any]] | None = None) -> None:
        """What a scheduler or the user set on `param_groups` (or `values`, one dict per group) reaches the inner optimizer."""
        values = values if values is not None else [_hyper_parameters(group) for group in self.param_groups]
        for inner, hyper in zip(self.inner.param_groups, values, strict=True):
            inner.update(hyper)

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Finish the overlapped host steps, step on the host what they did not cover, send parameters back.

        The write-back copies are queued without waiting: the next forward pass
        is ordered after them on the device, and the next host step only starts
        after that step's backward (its gradient events).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._finish_overlapped()
        hyper_parameters = self._iteration_hyper_parameters()
        rest = []
        for param, mirror in self._mirrors.items():
            if mirror.submitted:
                continue
            if not mirror.received and param.grad is not None:
                # No hook saw this gradient (assigned as param.grad = g, or
                # accumulated inside accumulating()): copied now, without overlap.
                mirror.receive_grad(self.offload_gradients)
            if mirror.master.grad is not None:
                mirror.wait()
                rest.append(mirror)
        if rest:
            self._push_hyper_parameters(hyper_parameters)
            self.inner.step_params([mirror.master for mirror in rest])
            for mirror in rest:
                mirror.write_back()
        self._end_iteration()
        return loss

    def _iteration_hyper_parameters(self) -> list[dict[str, Any]]:
        """The hyper-parameters this step uses: those at the overlapped step's start, else the current ones."""
        current = [_hyper_parameters(group) for group in self.param_groups]
        if self._snapshot is None:
            return current
        if repr(current) != repr(self._snapshot):
            warnings.warn(
                "CPUOffloadOptimizer(overlap_step=True): param_groups changed between backward and step(); the host "
                "step used the values from backward time (step LR schedulers after optimizer.step())",
                RuntimeWarning,
                stacklevel=4,
            )
        return self._snapshot

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._snapshot is not None:
            self._finish_overlapped()
            stepped = sum(mirror.submitted for mirror in self._mirrors.values())
            warnings.warn(
                f"CPUOffloadOptimizer(overlap_step=True): zero_grad() before step() after a backward whose host step "
                f"already ran for {stepped} parameter(s); those keep their update and the others are not stepped. "
                "To decide on a step after backward (e.g. skipping non-finite losses), turn overlap_step off",
                RuntimeWarning,
                stacklevel=2,
            )
            self._end_iteration()
        super().zero_grad(set_to_none)
        for mirror in self._mirrors.values():
            mirror.clear_grad(set_to_none)

    # ------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, plus the fp32 masters of low-precision parameters.

        The masters (key MASTERS_KEY, by parameter index) make a bf16/fp16 resume
        exact; float32 parameters are their own masters and are not repeated.
        """
        self._worker.drain()
        self._push_hyper_parameters()
        state_dict = self.inner.state_dict()
        masters = {index: mirror.master.clone() for index, mirror in enumerate(self._mirrors.values()) if not mirror.aliases}
        if masters:
            state_dict[MASTERS_KEY] = masters
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the inner optimizer; masters come from the dict, else from the parameters as they are now."""
        masters = state_dict.get(MASTERS_KEY, {})
        self._worker.drain()
        self.inner.load_state_dict({k: v for k, v in state_dict.items() if k != MASTERS_KEY})
        self._pull_hyper_parameters()
        for index, mirror in enumerate(self._mirrors.values()):
            if not mirror.aliases:
                mirror.master.copy_(masters[index] if index in masters else mirror.local().detach())

    def host_grad(self, param: torch.Tensor) -> torch.Tensor | None:
        """The host copy of `param`'s gradient (after its copy has landed), or None."""
        mirror = self._mirrors[param]
        mirror.wait()
        return mirror.master.grad

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the optimizer no longer sees new gradients)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @property
    def state(self) -> Any:  # the inner optimizer's, keyed by host masters
        return self.inner.state if self.inner is not None else {}

    @state.setter
    def state(self, value: Any) -> None:  # torch.optim.Optimizer.__init__ assigns one
        pass


def _hyper_parameters(group: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key != "params"}


__all__ = ["CPUOffloadOptimizer"]
