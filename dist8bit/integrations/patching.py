"""Replacing another library's functions so that a changed function fails loudly, not subtly.

A `Registry` holds patches: each names one function of the library ("module:Class.function"),
the signature its wrapper was written against, and the body that runs instead. Wrappers take
and forward `*args, **kwargs` and hand the body a `Call` (the arguments by name, and `proceed()`
for the original), so no wrapper restates the library's private signature. `apply()` compares
every recorded signature with the installed library's first and patches nothing if any differ,
naming each function that changed.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

ORIGINAL = "__dist8bit_original__"  # on a wrapper: the function it replaced (makes apply() idempotent)


@dataclass(frozen=True)
class Call:
    """One call of a patched function: its arguments by name, and the original to go on with."""

    original: Callable
    args: tuple
    kwargs: dict[str, Any]
    arguments: dict[str, Any]  # by parameter name, defaults filled in

    def __getitem__(self, name: str) -> Any:
        return self.arguments[name]

    def proceed(self) -> Any:
        """The original, with the arguments exactly as given."""
        return self.original(*self.args, **self.kwargs)


@dataclass(frozen=True)
class Patch:
    """Function `path` ("module:Class.function" under the registry's package), the signature recorded
    for it, and the body that replaces it (None: only called by the wrappers, never replaced)."""

    path: str
    signature: str
    body: Callable[[Call], Any] | None


def signature_of(function: Callable) -> str:
    """The parameters of `function` as text (names, kinds, defaults; annotations dropped)."""
    signature = inspect.signature(function)
    parameters = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty))


def wrap(original: Callable, body: Callable[[Call], Any]) -> Callable:
    """A function that forwards `*args, **kwargs` to `body` as a Call of `original`."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def patched(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return body(Call(original, args, kwargs, dict(bound.arguments)))

    setattr(patched, ORIGINAL, original)
    return patched


@dataclass
class Registry:
    """The patches of one library (`package`, e.g. "deepspeed"), written for its `supported` versions.
    A signature mismatch raises `error` with the mismatches and `install_hint`."""

    package: str
    supported: str
    error: type[Exception]
    install_hint: str
    patches: list[Patch] = field(default_factory=list)

    def __iter__(self) -> Iterator[Patch]:
        return iter(self.patches)

    def __len__(self) -> int:
        return len(self.patches)

    def patch(self, *paths: str, signature: str) -> Callable[[Callable[[Call], Any]], Callable[[Call], Any]]:
        """Register the decorated body as the patch of each function in `paths`."""

        def register(body: Callable[[Call], Any]) -> Callable[[Call], Any]:
            self.patches.extend(Patch(path, signature, body) for path in paths)
            return body

        return register

    def record(self, path: str, signature: str) -> None:
        """Register a function that the wrappers call with named arguments but do not replace."""
        self.patches.append(Patch(path, signature, None))

    def owner_and_name(self, patch: Patch) -> tuple[Any, str]:
        module, _, qualname = patch.path.partition(":")
        owner: Any = importlib.import_module(f"{self.package}.{module}")
        *classes, name = qualname.split(".")
        for cls in classes:
            owner = getattr(owner, cls)
        return owner, name

    def missing(self) -> list[str]:
        """The functions the patches need but the installed library lacks."""
        missing = []
        for patch in self.patches:
            try:
                owner, name = self.owner_and_name(patch)
            except (ImportError, AttributeError):
                owner, name = None, ""
            if not hasattr(owner, name):
                missing.append(patch.path)
        return missing

    def mismatches(self) -> list[str]:
        """One line per function whose signature differs from the recorded one."""
        mismatches = []
        for patch in self.patches:
            current = getattr(*self.owner_and_name(patch))
            found = signature_of(getattr(current, ORIGINAL, current))
            if found != patch.signature:
                mismatches.append(f"{patch.path}: recorded {patch.signature}, found {found}")
        return mismatches

    def apply(self) -> None:
        """Check every recorded signature, then install every patch (once). Patches nothing on a mismatch."""
        mismatches = self.mismatches()
        if mismatches:
            raise self.error(
                f"dist8bit's {self.package} patches were written for {self.package} {self.supported} and these "
                f"functions have changed: {'; '.join(mismatches)}. {self.install_hint}"
            )
        for patch in self.patches:
            owner, name = self.owner_and_name(patch)
            current = getattr(owner, name)
            if patch.body is not None and getattr(current, ORIGINAL, None) is None:
                setattr(owner, name, wrap(current, patch.body))
