"""Open a checkpoint file safely: weights_only (no code from the file runs), memory-mapped.

Memory-mapping means torch.load reads only the pickle; tensor bytes are paged
in when a conversion job touches them, so opening a 100 GB checkpoint costs
next to nothing.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Callable
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
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"it pickles {found.group(1)}" if found else (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"{path} holds objects that torch.load(weights_only=True) refuses ({what}). dist8bit never runs code from a "
            "checkpoint; re-save it from the training script with plain tensors, dicts and numbers"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path} cannot be read as a torch checkpoint (truncated or corrupt?): {error}") from error


# A chunk reader: read(tensor, start, stop) -> elements [start, stop) of the flattened tensor.
Read = Callable[[torch.Tensor, int, int], torch.Tensor]


def slice_read(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return tensor.reshape(-1)[start:stop]


class FileReader:
    """Reads chunks of memory-mapped tensors with ordinary file reads.

    Touching a memory-mapped tensor leaves its pages resident in the process
    (clean page cache, but counted in its RSS) until the whole file is
    unmapped, so a converter that read through the mapping would show an RSS
    as large as the checkpoint. Reading the same bytes with readinto() into a
    chunk-sized buffer keeps the process at one chunk. Tensors that are not in
    a mapped file (or not contiguous) are sliced as usual.
    """

    def __init__(self) -> None:
        self._files: list[tuple[int, int, Any]] = []  # (start address, end address, open file)

    def add(self, path: Path, tree: Any) -> None:
        """Register a file loaded with mmap=True; a no-op if its mapping cannot be located."""
        from .archive import data_records
        from .writer import walk

        storages = {}
        for _, leaf in walk(tree):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu" and leaf.untyped_storage().nbytes():
                storage = leaf.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        records = {r.offset: r.size for r in data_records(path) if r.size}
        if not storages or not records:
            return
        # One mapping holds the whole file, so pointer - base = file offset for every storage.
        base = min(storages) - min(records)
        if any(records.get(pointer - base) != size for pointer, size in storages.items()):
            return
        self._files.append((base, base + path.stat().st_size, open(path, "rb")))  # noqa: SIM115 (closed in close())

    def __call__(self, tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        size = tensor.element_size()
        address = tensor.data_ptr() + start * size
        if tensor.is_contiguous() and stop > start:
            for first, end, file in self._files:
                if first <= address and address + (stop - start) * size <= end:
                    out = torch.empty(stop - start, dtype=tensor.dtype)
                    file.seek(address - first)
                    view = memoryview(out.view(torch.uint8).numpy())
                    if file.readinto(view) != view.nbytes:
                        raise CheckpointError(f"{file.name} ended early while reading a tensor (truncated?)")
                    return out
        return slice_read(tensor, start, stop)

    def close(self) -> None:
        for _, _, file in self._files:
            file.close()
        self._files.clear()
