"""Placeholders for names a compatibility namespace deliberately leaves out.

A script that uses such a name fails on the line that uses it, with an error
that says what to use instead, rather than with an AttributeError at import
time that says nothing (or, worse, a silent stand-in).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn


def _message(qualname: str, alternative: str) -> str:
    return f"{qualname} is not provided by dist8bit (8-bit optimizer states only); {alternative}"


def unsupported_function(module: str, name: str, alternative: str) -> Callable[..., NoReturn]:
    """A function named `name` that raises NotImplementedError naming `alternative`."""
    message = _message(f"{module}.{name}", alternative)

    def placeholder(*args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(message)

    placeholder.__name__ = placeholder.__qualname__ = name
    placeholder.__module__ = module
    placeholder.__doc__ = message
    return placeholder


def unsupported_class(module: str, name: str, alternative: str) -> type:
    """A class named `name` whose construction raises NotImplementedError naming `alternative`."""
    message = _message(f"{module}.{name}", alternative)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(message)

    return type(name, (), {"__init__": __init__, "__doc__": message, "__module__": module})
