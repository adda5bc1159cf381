"""Optimizer-state bytes per rank, counted with the optimizer's own layout code.

No bytes-per-parameter constant is restated here: a real dist8bit optimizer
decides each tensor's precision (`state_bits`: optim_bits, min_8bit_size,
overrides such as StableEmbedding's 32-bit state) and the state is allocated on
the meta device by the same functions a step uses (`state.allocate` for whole
tensors, `segments.packed_layout` + `state.allocate_packed` for ZeRO's flat
partitions, `sharded.row_aligned_blocksize` for FSDP2's row-sharded DTensors),
then summed by `state.state_bytes`, the count behind `optimizer.state_bytes()`.
Partition arithmetic comes from `integrations.zero_partition` (DeepSpeed's rules).
For 4-bit states that gives, per quantized tensor of n elements and per slot,
ceil(n / 2) code bytes + 4 * ceil(n / 128) scale bytes (AdamW: two slots,
~1.03 B/param), and 4 B per element per slot below min_8bit_size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import optim
from ..integrations import zero_partition
from ..optim import state as state_layout
from ..optim.segments import Segment, packed_layout
from ..optim.sharded import row_aligned_blocksize
from .model_shapes import ModelShape, Tensor

META = torch.device("meta")


@dataclass(frozen=True)
class StatePrecision:
    """A state precision the planner offers; `bits` is the optimizer's optim_bits."""

    name: str
    bits: int
    available: bool = True
    note: str = ""


# Adding a precision is one entry here (once the optimizers accept its optim_bits).
STATE_PRECISIONS = {
    "fp32": StatePrecision("fp32", 32),
    "8bit": StatePrecision("8bit", 8),
    "4bit": StatePrecision("4bit", 4),
}
SUFFIX = {"fp32": "32bit", "8bit": "8bit", "4bit": "4bit"}

# Optimizer families: the dist8bit class taking optim_bits, and the arguments that give it its usual state.
FAMILIES: dict[str, tuple[type, dict[str, Any]]] = {
    "adamw": (optim.AdamW, {}),
    "adam": (optim.Adam, {}),
    "lion": (optim.Lion, {}),
    "ademamix": (optim.AdEMAMix, {}),
    "lamb": (optim.LAMB, {}),
    "sgd": (optim.SGD, {"momentum": 0.9}),
    "lars": (optim.LARS, {}),
    "rmsprop": (optim.RMSprop, {}),
    "adagrad": (optim.Adagrad, {}),
}


def parse_optimizer(name: str) -> tuple[str, StatePrecision]:
    """'adamw8bit' -> ('adamw', 8bit); a bare family ('adamw') means fp32 states."""
    key = name.lower()
    for precision, suffix in SUFFIX.items():
        if key.endswith(suffix) and key[: -len(suffix)] in FAMILIES:
            return key[: -len(suffix)], STATE_PRECISIONS[precision]
    if key in FAMILIES:
        return key, STATE_PRECISIONS["fp32"]
    names = ", ".join(f"{f}{s}" for f in FAMILIES for s in ("8bit", "4bit", "32bit"))
    raise ValueError(f"unknown optimizer {name!r}; choose one of {names} (or a family name for fp32 states)")


class StateCounter:
    """Per-rank state bytes of one optimizer configuration over one model's tensors."""

    def __init__(self, family: str, precision: StatePrecision, model: ModelShape, **options: Any) -> None:
        if not precision.available:
            raise ValueError(precision.note)
        cls, arguments = FAMILIES[family]
        self.optimizer = cls([torch.zeros(1, requires_grad=True)], optim_bits=precision.bits, **arguments, **options)
        self.group = self.optimizer.param_groups[0]
        self.specs = self.optimizer.state_specs(self.group)
        self.initial = self.optimizer.initial_state_value(self.group)
        self.model = model

    def config(self, tensor: Tensor) -> dict[str, Any]:
        """The group's settings with StableEmbedding's override (32-bit state) where it applies."""
        if tensor.module == self.model.stable_embedding:
            return {**self.group, "optim_bits": 32}
        return self.group

    def bits(self, tensor: Tensor) -> int:
        """The tensor's state precision (32, 8 or 4) as the optimizer decides it for an unsharded tensor."""
        return self.optimizer.state_bits(torch.empty(tensor.shape, device=META), self.config(tensor))

    # ------------------------------------------------------------ layouts
    def whole(self) -> int:
        """Every tensor's own state (DDP, or any unsharded optimizer)."""
        total = 0
        for tensor in self.model.tensors:
            param = torch.empty(tensor.shape, device=META)
            state = state_layout.allocate(param, self.specs, self.bits(tensor), self.group["blocksize"], self.initial)
            total += state_layout.state_bytes(state)
        return total

    def flat(self, pieces: Sequence[tuple[Tensor, zero_partition.Span]]) -> int:
        """One flat partition's packed state (ZeRO): its pieces of parameters as segments."""
        if not pieces:
            return 0
        source = torch.empty(0, device=META)
        segments = [Segment(source, s.start, s.length, s.param_offset, t.numel) for t, s in pieces]
        layout = packed_layout(segments, [self.bits(t) for t, _ in pieces], self.group["blocksize"])
        state = state_layout.allocate_packed(
            META, self.specs, layout.codes_numel, layout.blocks, layout.values_numel, self.initial
        )
        return state_layout.state_bytes(state)

    def zero12(self, world: int, rank: int) -> int:
        total = 0
        for group in param_groups(self.model):
            spans = zero_partition.zero12_spans([t.numel for t in group], world, rank)
            total += self.flat([(group[s.index], s) for s in spans])
        return total

    def zero3(self, world: int, rank: int) -> int:
        total = 0
        for group in param_groups(self.model):
            partitions = [zero_partition.zero3_partition_numel(t.numel, world) for t in group]
            for members in zero_partition.zero3_sub_groups(partitions, zero_partition.DEFAULT_SUB_GROUP_SIZE):
                tensors = [group[i] for i in members]
                spans, _ = zero_partition.zero3_spans(
                    [t.numel for t in tensors], [partitions[i] for i in members], [rank] * len(tensors)
                )
                total += self.flat([(tensors[s.index], s) for s in spans])
        return total

    def fsdp2(self, world: int, rank: int) -> int:
        """Row-sharded DTensors: quantized only where a power-of-two block divides a row (1-D tensors keep 32-bit)."""
        total = 0
        for tensor in self.model.tensors:
            rows = local_rows(tensor.shape, world, rank)
            if rows == 0:
                continue
            config = self.config(tensor)
            blocksize = row_aligned_blocksize(torch.Size(tensor.shape), config["blocksize"])
            quantized = config["optim_bits"] < 32 and tensor.numel >= config["min_8bit_size"] and blocksize is not None
            local = torch.empty((rows, *tensor.shape[1:]), device=META)
            bits = config["optim_bits"] if quantized else 32
            state = state_layout.allocate(local, self.specs, bits, blocksize or config["blocksize"], self.initial)
            total += state_layout.state_bytes(state)
        return total

    def per_rank(self, layout: str, world: int) -> int:
        """The largest rank's state bytes under `layout` (whole, zero12, zero3 or fsdp2)."""
        if layout == "whole":
            return self.whole()
        count = {"zero12": self.zero12, "zero3": self.zero3, "fsdp2": self.fsdp2}[layout]
        return max(count(world, rank) for rank in ranks_to_check(world))


def param_groups(model: ModelShape) -> list[list[Tensor]]:
    """launch/model.py's groups (matrices with weight decay, vectors without): one flat each under ZeRO."""
    groups = [[t for t in model.tensors if len(t.shape) >= 2], [t for t in model.tensors if len(t.shape) < 2]]
    return [g for g in groups if g]


def local_rows(shape: tuple[int, ...], world: int, rank: int) -> int:
    """Rows of dim 0 that rank `rank` holds under Shard(0) (torch.chunk: ceil(rows / world) each, the last ones short)."""
    chunk = math.ceil(shape[0] / world)
    return max(0, min(chunk, shape[0] - rank * chunk))


def ranks_to_check(world: int) -> list[int]:
    """Every rank up to 64; beyond, the first, middle and last ranks (rank 0 holds the most elements)."""
    return list(range(world)) if world <= 64 else sorted({0, 1, world // 2, world - 1})


def owned_numel(model: ModelShape, layout: str, world: int) -> int:
    """Elements of parameters (padding included) that rank 0, the fullest rank, holds when sharded."""
    if layout == "whole":
        return model.num_params
    if layout == "zero12":
        return sum(zero_partition.zero12_partition_numel([t.numel for t in g], world) for g in param_groups(model))
    if layout == "zero3":
        return sum(zero_partition.zero3_partition_numel(t.numel, world) for t in model.tensors)
    if layout == "fsdp2":
        return sum(local_rows(t.shape, world, 0) * (t.numel // t.shape[0]) for t in model.tensors)
    raise ValueError(f"unknown layout {layout!r}")
