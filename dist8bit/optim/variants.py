"""X8bit / X4bit / X32bit / PagedX classes: the same optimizer with some settings fixed.

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
        # Merged over every base, so that `class PagedAdam8bit(Paged, Adam8bit)` pins both bases' settings.
        inherited = [base.fixed_settings for base in reversed(cls.__mro__[1:]) if issubclass(base, FixedSettings)]
        cls.fixed_settings = {key: value for settings in (*inherited, fixed) for key, value in settings.items()}

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


class Paged(FixedSettings, is_paged=True):
    """Mixin: `class PagedAdam8bit(Paged, Adam8bit)` is Adam8bit with is_paged=True fixed."""
