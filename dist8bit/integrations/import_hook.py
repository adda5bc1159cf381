"""Run a callback right after a top-level module is imported, without importing it.

`import dist8bit` must stay cheap, so it cannot import DeepSpeed (seconds) just
to patch it. Instead a finder on `sys.meta_path` waits for `import deepspeed`,
lets the real loader execute the package, and then calls the callback: the
user's own import triggers the registration, whatever imports DeepSpeed (a
training script, HF Trainer, Accelerate).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


class _CallbackLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the callback once the module is executed."""

    def __init__(self, loader: Any, finder: AfterImportFinder) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Put the real loader back first, so the module looks untouched to
        # importlib.resources and friends.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._finder.remove()
        self._finder.callback()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class AfterImportFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder for one module name; removes itself once that module is imported."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        # Stay installed until the module is actually executed: availability
        # checks such as importlib.util.find_spec("deepspeed") (transformers
        # does one) look the module up without importing it.
        spec = None
        for finder in list(sys.meta_path):
            if finder is self:
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _CallbackLoader(spec.loader, self)
        return spec

    def install(self) -> None:
        if not any(isinstance(f, AfterImportFinder) and f.name == self.name for f in sys.meta_path):
            sys.meta_path.insert(0, self)

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def call_after_import(name: str, callback: Callable[[], None]) -> None:
    """Call `callback` now if `name` is imported, else right after it gets imported."""
    if name in sys.modules:
        callback()
        return
    AfterImportFinder(name, callback).install()
