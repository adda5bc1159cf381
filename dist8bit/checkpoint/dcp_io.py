"""Reading DCP directories safely and writing them with bounded memory.

DCP itself unpickles `.metadata` and non-tensor entries with plain pickle
(arbitrary code); the reader here lets `.metadata` through an unpickler that
allows only DCP's own metadata classes. The writer's planner produces each
tensor lazily and releases it once written, so converting holds one state
tensor at a time (see dcp_format.py for the conversion itself).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import math
import pickle
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

from .errors import CheckpointError

METADATA_FILE = ".metadata"
LATEST_FILE = "latest"


# ------------------------------------------------------------------ detection
def is_dcp(path: Path) -> bool:
    return (path / METADATA_FILE).is_file()


def find_checkpoint(path: Path) -> tuple[Path, str | None] | None:
    """(the DCP directory, tag) for a DCP directory or a directory whose `latest` names one (the launcher's layout)."""
    if is_dcp(path):
        return path, None
    latest = path / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag and is_dcp(path / tag):
            return path / tag, tag
    return None


# ---------------------------------------------------------------- safe reading
class _MetadataUnpickler(pickle.Unpickler):
    """Only DCP's metadata classes, torch sizes/dtypes/layouts and paths: `.metadata` can run no code."""

    DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "Path"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in self.DCP_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


class _SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is unpickled safely and read once."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            where = Path(self.path) / METADATA_FILE
            try:
                with open(where, "rb") as handle:
                    metadata = _MetadataUnpickler(handle).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as error:
                raise CheckpointError(
                    f"{where} is not readable DCP metadata ({error}); the checkpoint is corrupt or truncated"
                ) from None
            if not isinstance(metadata, Metadata):
                raise CheckpointError(f"{where} holds a {type(metadata).__name__}, not DCP metadata")
            self._metadata = metadata
        return self._metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """Flat keys in, flat keys out; non-tensor entries loaded with weights_only=True."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            self.state_dict[fqn] = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"DCP entry {fqn!r} needs arbitrary objects to load, refused (weights_only=True): {str(error)[:200]}"
            ) from None


class LazySavePlanner(DefaultSavePlanner):
    """Produces each tensor only when the writer asks for it (the state dict holds meta-tensor placeholders).

    torch 2.13's FileSystemWriter keeps a reference to every tensor it has written to a file until the
    file is complete (for its safetensors option), which would hold the whole output in memory. With
    the serial loader (per_thread_copy_ahead=0) each tensor is written before the next is asked for,
    so the previous one's storage is released here; producers return compact tensors, so the writer
    shares that storage rather than a copy.
    """

    def __init__(self, producers: dict[str, Callable[[], torch.Tensor]]) -> None:
        super().__init__()
        self.producers = producers
        self.written: torch.Tensor | None = None

    def lookup_object(self, index: MetadataIndex) -> Any:
        producer = self.producers.get(index.fqn)
        if producer is None:
            return super().lookup_object(index)
        self.release()
        value = producer().detach()
        if value.untyped_storage().nbytes() != value.nbytes or not value.is_contiguous():
            value = value.clone(memory_format=torch.contiguous_format)
        self.written = value
        return value

    def release(self) -> None:
        if self.written is not None:
            self.written.untyped_storage().resize_(0)
            self.written = None
            _trim_heap()


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc).

    After the first multi-MB tensor is freed, glibc serves allocations of that size from the heap
    instead of mmap, and a heap fragmented by small live objects keeps every freed tensor's pages:
    measured, peak memory then grew with the checkpoint (447 MiB above the interpreter for an
    864 MiB checkpoint); trimming after each tensor keeps it flat.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


@dataclass
class Source:
    """An open DCP checkpoint: its metadata and the path of every flat key in the nested state dict."""

    directory: Path
    reader: _SafeReader
    metadata: Metadata
    paths: dict[str, tuple]

    def entry(self, key: str) -> Any:
        return self.metadata.state_dict_metadata[key]

    def nbytes(self, key: str) -> int:
        meta = self.entry(key)
        if isinstance(meta, TensorStorageMetadata):
            return math.prod(meta.size) * torch.empty((), dtype=meta.properties.dtype).element_size()
        return 0

    def load(self, keys: Iterable[str]) -> dict[str, Any]:
        """Whole (global-shape) tensors and non-tensor values of these keys."""
        request: dict[str, Any] = {}
        for key in keys:
            meta = self.entry(key)
            if isinstance(meta, TensorStorageMetadata):
                request[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
            else:
                request[key] = None
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(request, storage_reader=self.reader, planner=_SafeLoadPlanner(), no_dist=True)
        except (Exception, CheckpointException) as error:  # DCP wraps read failures (missing shard files, short reads)
            reraise_ours(error)
            raise CheckpointError(
                f"{self.directory}: reading {', '.join(list(request)[:3])} failed; a shard file is missing or truncated "
                f"({type(error).__name__}: {str(error)[:300]})"
            ) from None
        return request

    def tensor(self, key: str) -> torch.Tensor:
        return self.load([key])[key]


def reraise_ours(error: BaseException) -> None:
    """DCP wraps exceptions raised inside it (by our producers, too); give ours back unwrapped."""
    if isinstance(error, CheckpointError):
        raise error
    for failure in getattr(error, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CheckpointError):
            raise inner from None


def open_source(directory: Path) -> Source:
    reader = _SafeReader(directory)
    metadata = reader.read_metadata()
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else None
    if not paths or set(paths) != set(metadata.state_dict_metadata):
        raise CheckpointError(
            f"{directory}: the DCP metadata has no key paths (planner_data); it was not written by dcp.save with the "
            "default planner, which is the only layout this converter reads"
        )
    return Source(directory, reader, metadata, {key: tuple(path) for key, path in paths.items()})
