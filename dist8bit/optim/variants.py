"""X8bit / X32bit / PagedX classes: the same optimizer with some settings fixed.

Each variant is a plain class statement (`class AdamW8bit(FixedSettings, AdamW)`)
so that it reads, greps and pickles like any class; this mixin only pins its
`fixed_settings` keyword arguments and refuses a caller's attempt to change
them, naming the base class that lets one choose.
"""

from __future__ import annotations

from typing import Any, ClassVar


class FixedSettings:
    """Mixin: pins `fixed_settings` in the constructor of the optimizer class after it."""

    fixed_settings: ClassVar[dict[str, Any]] = {}

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        clash = sorted(set(kwargs) & set(self.fixed_settings))
        if clash:
            fixed = ", ".join(f"{key}={self.fixed_settings[key]!r}" for key in clash)
            raise TypeError(f"{type(self).__name__} fixes {fixed}; use {self._chooser().__name__} to choose")
        super().__init__(params, *args, **kwargs, **self.fixed_settings)

    @classmethod
    def _chooser(cls) -> type:
        """The first base class that does not fix anything (e.g. AdamW for PagedAdamW8bit)."""
        return next(base for base in cls.__mro__[1:] if not issubclass(base, FixedSettings))
