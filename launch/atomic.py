"""Files the launcher writes whole or not at all: metrics, checkpoint metadata, the corpus cache.

A reader (another rank, a resumed run, compare.py) sees the old file or the new one, never a
half-written one: each file is written to a temporary name beside it and then renamed over it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def write_atomic(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False) -> None:
    """Call `write(file)` on a temporary file beside `path`, then os.replace it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb" if binary else "w") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    write_atomic(path, lambda file: file.write(text))


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    write_text_atomic(json.dumps(obj, indent=1) + "\n", path)


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    write_atomic(path, lambda file: torch.save(obj, file), binary=True)
