"""X8bit / X32bit / PagedX classes: the same optimizer with a fixed setting."""

from __future__ import annotations

from typing import Any


def with_fixed(base: type, name: str, doc: str, **fixed: Any) -> type:
    """Subclass of `base` whose constructor pins `fixed` keyword arguments."""

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        clash = sorted(set(kwargs) & set(fixed))
        if clash:
            raise TypeError(f"{name} fixes {', '.join(f'{k}={fixed[k]!r}' for k in clash)}; use {base.__name__} to choose")
        base.__init__(self, params, *args, **kwargs, **fixed)

    return type(name, (base,), {"__init__": __init__, "__doc__": f"{doc}\n\n{base.__doc__ or ''}", "__module__": base.__module__})
