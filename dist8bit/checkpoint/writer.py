"""Write a torch.save file tensor by tensor, without ever holding all of it.

torch.save pickles the whole object at once, so a converter that built its
output first would need memory for all of it (four times the input for
8-bit -> fp32). Instead:

1. the output tree holds `Slot`s (shape + dtype) where tensors will go; it is
   saved under `torch.serialization.skip_data`, with fake tensors in the
   slots, which writes the pickle and reserves each tensor's bytes;
2. the reserved file is loaded back memory-mapped (nothing is read but the
   pickle) to find each slot's byte offset, checked against the zip directory;
3. conversion jobs then stream each slot's bytes into place, front to back;
4. the zip CRC-32 of every tensor record is patched in, so the file is an
   ordinary, valid torch.save archive (`unzip -t` passes).

Peak memory is one chunk of one tensor, whatever the checkpoint size.
"""

from __future__ import annotations

import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .archive import Record, data_records


class Slot:
    """Placeholder for an output tensor; a job fills it front to back."""

    __slots__ = ("dtype", "label", "shape")

    def __init__(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, label: str = "") -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.label = label

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def __repr__(self) -> str:
        return f"Slot({self.label or '?'}, {self.shape}, {self.dtype})"


def walk(tree: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, leaf) for every leaf of nested dicts, lists and tuples (namedtuples too; a torch.Size is a leaf), in order."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from walk(value, (*path, key))
    elif isinstance(tree, (list, tuple)) and not isinstance(tree, torch.Size):
        for index, value in enumerate(tree):
            yield from walk(value, (*path, index))
    else:
        yield path, tree


def map_leaves(tree: Any, fn: Callable[[tuple, Any], Any], path: tuple = ()) -> Any:
    """The same nesting with every leaf replaced by fn(path, leaf)."""
    if isinstance(tree, dict):
        items = [(k, map_leaves(v, fn, (*path, k))) for k, v in tree.items()]
        return OrderedDict(items) if isinstance(tree, OrderedDict) else dict(items)
    if isinstance(tree, (list, tuple)) and not isinstance(tree, torch.Size):
        values = [map_leaves(v, fn, (*path, i)) for i, v in enumerate(tree)]
        if isinstance(tree, list):
            return values
        return type(tree)(*values) if hasattr(tree, "_fields") else tuple(values)  # namedtuples keep their type
    return fn(path, tree)


class Sink:
    """Where jobs put slot data; counts input progress for the bar."""

    def __init__(self, file: Any, records: dict[int, Record], on_progress: Callable[[int], None]) -> None:
        self._file = file
        self._records = records
        self._on_progress = on_progress
        self.bytes_out = 0

    def write(self, slot: Slot, data: torch.Tensor) -> None:
        """Append `data` (any shape, slot's dtype) to the slot's bytes."""
        if data.dtype != slot.dtype:
            raise RuntimeError(f"internal error: {slot} received {data.dtype} data")
        raw = data.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        record = self._records[id(slot)]
        if record.written + raw.nbytes > record.size:
            raise RuntimeError(f"internal error: {slot} overflows its {record.size} bytes")
        self._file.seek(record.offset + record.written)
        self._file.write(memoryview(raw))
        record.crc = zlib.crc32(memoryview(raw), record.crc)
        record.written += raw.nbytes
        self.bytes_out += raw.nbytes

    def progress(self, bytes_in: int) -> None:
        self._on_progress(bytes_in)


def save_streaming(path: Path, tree: Any, fill: Callable[[Sink], None], on_progress: Callable[[int], None]) -> int:
    """torch.save `tree` to `path`, its Slots filled by `fill(sink)`; returns bytes of tensor data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    slots = [leaf for _, leaf in walk(tree) if isinstance(leaf, Slot)]
    if len({id(s) for s in slots}) != len(slots):
        raise RuntimeError("internal error: a Slot appears twice in the output tree")
    for where, leaf in walk(tree):
        if isinstance(leaf, torch.Tensor):  # skip_data would silently write zeros for it
            raise RuntimeError(f"internal error: a tensor at {where} is not a Slot")
    with FakeTensorMode():  # shapes and dtypes only: no memory
        fakes = {id(s): torch.empty(s.shape, dtype=s.dtype) for s in slots}
    skeleton = map_leaves(tree, lambda _, leaf: fakes[id(leaf)] if isinstance(leaf, Slot) else leaf)
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(skeleton, path)
    records = _locate(path, tree, slots)
    with open(path, "r+b") as file:
        sink = Sink(file, records, on_progress)
        fill(sink)
        for slot in slots:
            record = records[id(slot)]
            if record.written != record.size:
                raise RuntimeError(f"internal error: {slot} got {record.written} of {record.size} bytes")
        for record in {id(r): r for r in records.values()}.values():
            for position in record.crc_positions:
                file.seek(position)
                file.write(struct.pack("<I", record.crc))
    return sink.bytes_out


def _locate(path: Path, tree: Any, slots: list[Slot]) -> dict[int, Record]:
    """Byte range of every slot in the reserved file."""
    zip_records = data_records(path)
    loaded = torch.load(path, mmap=True, weights_only=True)
    pointers: dict[int, int] = {}
    for (where, leaf), (_, twin) in zip(walk(tree), walk(loaded), strict=True):
        if isinstance(leaf, Slot):
            if not isinstance(twin, torch.Tensor) or tuple(twin.shape) != leaf.shape:
                raise RuntimeError(f"internal error: the reserved file has {type(twin).__name__} at {where}, expected {leaf}")
            if leaf.numel:
                pointers[id(leaf)] = twin.data_ptr()
    del loaded
    by_offset = {r.offset: r for r in zip_records if r.size}
    records: dict[int, Record] = {}
    if pointers:
        # All storages of a memory-mapped load are views of one mapping of the
        # file, so pointer differences are file offset differences.
        base = min(pointers.values()) - min(by_offset)
        for slot in slots:
            if not slot.numel:
                continue
            record = by_offset.get(pointers[id(slot)] - base)
            if record is None or record.size != slot.nbytes:
                raise RuntimeError(
                    "torch.save's file layout is not what dist8bit's streaming writer expects "
                    f"(slot {slot} has no matching record); please report this with your torch version ({torch.__version__})"
                )
            records[id(slot)] = record
    empty = Record(0, 0, ())
    for slot in slots:
        records.setdefault(id(slot), empty)
    return records
