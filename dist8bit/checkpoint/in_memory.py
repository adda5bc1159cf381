"""Run a conversion plan into tensors instead of a file.

`dist8bit convert` streams a plan's jobs into a torch.save file (writer.py);
an optimizer loading a foreign state dict runs the very same plan and jobs,
with each slot's chunks collected in memory and joined into its tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from .plan import Plan
from .writer import Slot, map_leaves


class MemorySink:
    """The Sink interface (write, progress) over per-slot lists of chunks."""

    def __init__(self) -> None:
        self.chunks: dict[int, list[torch.Tensor]] = {}

    def write(self, slot: Slot, data: torch.Tensor) -> None:
        if data.dtype != slot.dtype:
            raise RuntimeError(f"internal error: {slot} received {data.dtype} data")
        self.chunks.setdefault(id(slot), []).append(data.detach().reshape(-1))

    def progress(self, bytes_in: int) -> None:
        pass

    def tensor(self, slot: Slot) -> torch.Tensor:
        """The slot's tensor: a fresh copy, never a view of the source."""
        chunks = self.chunks.get(id(slot), [])
        values = torch.cat(chunks) if chunks else torch.empty(0, dtype=slot.dtype)
        if values.numel() != slot.numel:
            raise RuntimeError(f"internal error: {slot} got {values.numel()} of {slot.numel} elements")
        return values.reshape(slot.shape)


def materialize(plan: Plan) -> Any:
    """The plan's output tree with every slot filled by its jobs."""
    sink = MemorySink()
    for job in plan.jobs:
        job.run(sink)
    return map_leaves(plan.tree, lambda _, leaf: sink.tensor(leaf) if isinstance(leaf, Slot) else leaf)
