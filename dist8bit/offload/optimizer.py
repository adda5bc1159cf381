"""CPUOffloadOptimizer: a dist8bit optimizer whose step runs on the host, for GPU parameters.

The device keeps only parameters and (until they are copied) gradients; the
fp32 master weights and the 8-bit states live on the host, owned by an inner
dist8bit optimizer over host tensors whose step is dist8bit's fused CPU
kernel. See docs/offload.md for bytes, overlap and limits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..optim import Optimizer8bit
from .mirror import HostMirror

MASTERS_KEY = "offload_masters"


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
    is queued (saves a gradient's worth of GPU memory, but gradient
    accumulation over several backward passes is then not supported).
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_class: type[Optimizer8bit] | None = None,
        *,
        offload_gradients: bool = False,
        **kwargs: Any,
    ) -> None:
        if optimizer_class is None:
            from ..optim import AdamW8bit

            optimizer_class = AdamW8bit
        _check_optimizer_class(optimizer_class)
        self.offload_gradients = offload_gradients
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
        self._mirrors[param].receive_grad(self.offload_gradients)

    def _record_logical_sizes(self) -> None:
        """Precision (8-bit vs 32-bit by min_8bit_size) follows the full parameter, not the local FSDP2 shard."""
        for param, mirror in self._mirrors.items():
            self.inner._logical_numel[mirror.master] = param.numel()

    def _pull_hyper_parameters(self) -> None:
        for outer, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            outer.update({k: v for k, v in inner.items() if k != "params"})

    def _push_hyper_parameters(self) -> None:
        """What a scheduler or the user set on `param_groups` reaches the inner optimizer."""
        for outer, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            inner.update({k: v for k, v in outer.items() if k != "params"})

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Wait for the gradient copies, step on the host, send updated parameters back.

        The write-back copies are queued on the current stream without waiting:
        the next forward pass is ordered after them on the device, and the next
        host step only starts after that step's backward (its gradient events).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for param, mirror in self._mirrors.items():
            if not mirror.received and param.grad is not None:
                # No hook saw this gradient: it was assigned (param.grad = g),
                # not accumulated by autograd. Copied now, without overlap.
                mirror.receive_grad(self.offload_gradients)
            mirror.wait()
        self._push_hyper_parameters()
        self.inner.step()
        for mirror in self._mirrors.values():
            if mirror.master.grad is not None:
                mirror.write_back()
            mirror.received = False
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for mirror in self._mirrors.values():
            mirror.clear_grad(set_to_none)

    # ------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, plus the fp32 masters of low-precision parameters.

        The masters (key MASTERS_KEY, by parameter index) make a bf16/fp16 resume
        exact; float32 parameters are their own masters and are not repeated.
        """
        self._push_hyper_parameters()
        state_dict = self.inner.state_dict()
        masters = {index: mirror.master.clone() for index, mirror in enumerate(self._mirrors.values()) if not mirror.aliases}
        if masters:
            state_dict[MASTERS_KEY] = masters
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the inner optimizer; masters come from the dict, else from the parameters as they are now."""
        masters = state_dict.get(MASTERS_KEY, {})
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


__all__ = ["CPUOffloadOptimizer"]
