"""Open a checkpoint file safely: weights_only (no code from the file runs), memory-mapped.

Memory-mapping means torch.load reads only the pickle; tensor bytes are paged
in when a conversion job touches them, so opening a 100 GB checkpoint costs
next to nothing.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


def load(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (an interrupted save?)")
    mmap = zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"{path} holds objects that torch.load(weights_only=True) refuses ({first}). dist8bit never runs code from a "
            "checkpoint; re-save it from the training script with plain tensors, dicts and numbers"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path} cannot be read as a torch checkpoint (truncated or corrupt?): {error}") from error
