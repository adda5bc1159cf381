"""X8bit / X32bit / PagedX classes: the same optimizer with some settings fixed.

Each variant is a plain class statement that names its fixed settings as
class keywords, `class AdamW8bit(FixedSettings, AdamW, optim_bits=8)`, so
that it reads, greps and pickles like any class; this mixin only pins those
keyword arguments in the constructor and refuses a caller's attempt to
change them, naming the base class that lets one choose. Passing a fixed
setting with its own value (`Adam8bit(..., optim_bits=8)`, as scripts written
for older bitsandbytes releases do) is accepted.
"""

from __future__ import annotations

from typing import Any, ClassVar


class FixedSettingError(TypeError, ValueError):
    """A variant's fixed setting given another value. A TypeError (a wrong argument for this class) that
    is also a ValueError, which bitsandbytes raises for the same call (`Adagrad8bit(optim_bits=32)`)."""


class FixedSettings:
    """Mixin: pins the class keywords (`optim_bits=8`, `is_paged=True`) in the constructor of the optimizer after it."""

    fixed_settings: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **fixed: Any) -> None:
        super().__init_subclass__()
        cls.fixed_settings = {**cls.fixed_settings, **fixed}

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        for key in set(kwargs) & set(self.fixed_settings):
            if kwargs[key] == self.fixed_settings[key]:
                del kwargs[key]
        clash = sorted(set(kwargs) & set(self.fixed_settings))
        if clash:
            fixed = ", ".join(f"{key}={self.fixed_settings[key]!r}" for key in clash)
            raise FixedSettingError(f"{type(self).__name__} fixes {fixed}; use {self._chooser().__name__} to choose")
        super().__init__(params, *args, **kwargs, **self.fixed_settings)

    @classmethod
    def _chooser(cls) -> type:
        """The first base class that does not fix anything (e.g. AdamW for PagedAdamW8bit)."""
        return next(base for base in cls.__mro__[1:] if not issubclass(base, FixedSettings))
