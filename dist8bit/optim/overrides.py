"""Per-parameter configuration overrides (bitsandbytes' GlobalOptimManager API).

bitsandbytes keys overrides by id(param), so they are lost when a wrapper
(FSDP, DeepSpeed) replaces the parameter objects. Here an override given for a
module attribute is stored on the module side and resolved to whatever
parameter the module holds when an optimizer looks, and parameter overrides are
kept in a weak, identity-keyed map.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .identity_map import WeakIdentityMap


class GlobalOptimManager:
    """Process-wide registry of configuration overrides."""

    _instance: GlobalOptimManager | None = None

    def __init__(self) -> None:
        self.initialize()

    @classmethod
    def get_instance(cls) -> GlobalOptimManager:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def initialize(self) -> None:
        """Forget every override."""
        self._by_param: WeakIdentityMap = WeakIdentityMap()
        self._by_module: WeakIdentityMap = WeakIdentityMap()

    def register_parameters(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]]) -> None:
        """Kept for bitsandbytes compatibility (tensors or param-group dicts, as it takes); overrides work without it."""
        for item in params:
            group = item.get("params", ()) if isinstance(item, dict) else (item,)
            for param in [group] if isinstance(group, torch.Tensor) else group:
                if not isinstance(param, torch.Tensor):
                    raise TypeError(f"register_parameters expects tensors or param groups, got {type(param).__name__}")

    def override_config(
        self,
        parameters: torch.Tensor | Iterable[torch.Tensor],
        key: str | None = None,
        value: Any = None,
        key_value_dict: dict[str, Any] | None = None,
    ) -> None:
        """Set config keys (e.g. optim_bits=32, lr) for one or more parameters."""
        updates = _updates(key, value, key_value_dict)
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        for param in params:
            if not isinstance(param, torch.Tensor):
                raise TypeError(f"override_config expects parameters (tensors), got {type(param).__name__}")
            self._by_param.setdefault(param, {}).update(updates)

    def register_module_override(self, module: torch.nn.Module, param_name: str, config: dict[str, Any]) -> None:
        """Override the config of `module.<param_name>`, whichever tensor it holds later."""
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(getattr(module, param_name, None), torch.Tensor):
            raise ValueError(f"{type(module).__name__} has no parameter named {param_name!r}")
        self._by_module.setdefault(module, {}).setdefault(param_name, {}).update(_updates(None, None, config))

    def overrides(self) -> WeakIdentityMap:
        """Current overrides, keyed by parameter identity (module overrides resolved now)."""
        resolved = WeakIdentityMap()
        for module, by_name in self._by_module.items():
            for name, config in by_name.items():
                param = getattr(module, name, None)
                if isinstance(param, torch.Tensor):
                    resolved.setdefault(param, {}).update(config)
        for param, config in self._by_param.items():
            resolved.setdefault(param, {}).update(config)
        return resolved


def _updates(key: str | None, value: Any, key_value_dict: dict[str, Any] | None) -> dict[str, Any]:
    if key_value_dict is not None:
        if key is not None:
            raise ValueError("pass either key/value or key_value_dict, not both")
        if not isinstance(key_value_dict, dict):
            raise TypeError(f"key_value_dict must be a dict, got {type(key_value_dict).__name__}")
        return dict(key_value_dict)
    if key is None:
        raise ValueError("override_config needs key and value, or key_value_dict")
    return {key: value}
