"""Bytes per GPU and per host of a training run: which copies exist, in which dtype, sharded how, and where.

Per parameter element (P elements, N = GPUs, owned = the fullest rank's share of a
sharded component, ~P/N plus partition padding):

    component   mixed precision (bf16/fp16)       fp32 training
    params      2 B (16-bit working weights)      4 B
    grads       2 B (+ 4 B fp32 partition, ZeRO)  4 B
    master      4 B fp32                          -- (the params are the master)
    states      counted exactly (state_bytes.py): AdamW 8 B fp32, ~2.03 B 8-bit, ~1.03 B 4-bit
    gathered    (params + grads bytes) x the largest module, ZeRO-3 / FSDP2 only

A strategy divides some components by N (`Strategy.shards`). Optimizer offload
(DeepSpeed ZeRO-Offload semantics) moves master, states and the fp32 gradient
copy the host step reads to the host: fp32 training then gains a host master.
Not modelled: activations, communication buckets, allocator fragmentation,
CUDA context (pass --reserve for them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from .model_shapes import ModelShape
from .state_bytes import STATE_PRECISIONS, StateCounter, StatePrecision, owned_numel

COMPONENTS = ("params", "grads", "master", "states", "gathered")
FP32 = 4


@dataclass(frozen=True)
class Strategy:
    name: str
    shards: frozenset[str]  # components divided over the ranks
    layout: str  # how the optimizer state is laid out per rank (state_bytes.StateCounter.per_rank)
    fp32_grad_partition: bool = False  # DeepSpeed ZeRO keeps an fp32 copy of its gradient partition (mixed precision)
    gathers: bool = False  # all-gathers one module's params (and reduce-scatters its grads) at a time
    master_is_param: bool = False  # FSDP2: the sharded parameter stays fp32 and is itself the master copy
    offload_streams_grads: bool = False  # with offload, 16-bit grads leave the GPU bucket by bucket


STRATEGIES = {
    "ddp": Strategy("ddp", frozenset(), "whole"),
    "zero1": Strategy("zero1", frozenset({"master", "states"}), "zero12", fp32_grad_partition=True),
    "zero2": Strategy(
        "zero2", frozenset({"grads", "master", "states"}), "zero12", fp32_grad_partition=True, offload_streams_grads=True
    ),
    "zero3": Strategy(
        "zero3",
        frozenset({"params", "grads", "master", "states"}),
        "zero3",
        fp32_grad_partition=True,
        gathers=True,
        offload_streams_grads=True,
    ),
    "fsdp2": Strategy("fsdp2", frozenset({"params", "grads", "master", "states"}), "fsdp2", gathers=True, master_is_param=True),
}
MIXED_PRECISION = {"bf16": 2, "fp16": 2, "none": 4}  # bytes of the working weights and gradients
OFFLOADS = ("none", "optimizer")


@dataclass(frozen=True)
class Cluster:
    gpus: int  # in all
    nodes: int = 1

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.nodes < 1 or self.gpus % self.nodes:
            raise ValueError(f"need gpus >= 1 spread evenly over nodes >= 1, got {self.gpus} GPUs on {self.nodes} nodes")

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes


@dataclass(frozen=True)
class Option:
    strategy: str = "zero3"
    optimizer: str = "adamw"  # family (state_bytes.FAMILIES)
    states: str = "8bit"  # state precision (state_bytes.STATE_PRECISIONS)
    mixed_precision: str = "bf16"
    offload: str = "none"

    def __post_init__(self) -> None:
        for value, known in (
            (self.strategy, STRATEGIES),
            (self.states, STATE_PRECISIONS),
            (self.mixed_precision, MIXED_PRECISION),
            (self.offload, OFFLOADS),
        ):
            if value not in known:
                raise ValueError(f"unknown setting {value!r}; choose one of {', '.join(known)}")

    @property
    def precision(self) -> StatePrecision:
        return STATE_PRECISIONS[self.states]

    @property
    def label(self) -> str:
        offload = " +offload" if self.offload != "none" else ""
        return f"{self.strategy} {self.optimizer}-{self.states} {self.mixed_precision}{offload}"


# The options compared in one table: every strategy x state precision x offload (for one optimizer and mixed precision).
OPTIONS_ORDER = tuple((s, p, o) for s in STRATEGIES for p in STATE_PRECISIONS for o in OFFLOADS)


@dataclass
class Plan:
    model: ModelShape
    cluster: Cluster
    option: Option
    gpu: dict[str, int] = field(default_factory=dict)  # bytes on each GPU (the fullest rank)
    host: dict[str, int] = field(default_factory=dict)  # host bytes each rank keeps

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def host_per_node(self) -> dict[str, int]:
        return {k: v * self.cluster.gpus_per_node for k, v in self.host.items()}


@cache
def _state_bytes(model: ModelShape, optimizer: str, states: str, layout: str, world: int) -> int:
    return StateCounter(optimizer, STATE_PRECISIONS[states], model).per_rank(layout, world)


def plan(model: ModelShape, cluster: Cluster, option: Option) -> Plan:
    """Per-GPU and per-host bytes of `option` training `model` on `cluster`.

    Raises ValueError for a state precision the optimizers do not offer (StatePrecision.available)."""
    strategy = STRATEGIES[option.strategy]
    if not option.precision.available:
        raise ValueError(option.precision.note)
    world, total = cluster.gpus, model.num_params
    owned = owned_numel(model, strategy.layout, world)
    low = MIXED_PRECISION[option.mixed_precision]  # working weights and gradients
    mixed = low < FP32
    offload = option.offload != "none"

    def elements(component: str) -> int:
        return owned if component in strategy.shards else total

    gpu: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    host: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    # FSDP2 keeps the fp32 sharded parameter (the master) and all-gathers it in `low` precision.
    param_bytes = FP32 if strategy.master_is_param else low
    grad_bytes = FP32 if strategy.master_is_param else low
    gpu["params"] = param_bytes * elements("params")
    if not (offload and strategy.offload_streams_grads):
        gpu["grads"] = grad_bytes * elements("grads")
    # fp32 gradients the optimizer step reads: ZeRO's partition copy, or the host copy offload steps on
    if offload:
        host["grads"] = FP32 * elements("master")
    elif mixed and strategy.fp32_grad_partition:
        gpu["grads"] += FP32 * elements("master")
    if offload or (mixed and not strategy.master_is_param):
        (host if offload else gpu)["master"] = FP32 * elements("master")
    (host if offload else gpu)["states"] = _state_bytes(model, option.optimizer, option.states, strategy.layout, world)
    if strategy.gathers:
        gpu["gathered"] = 2 * low * model.largest_module_params
    return Plan(model, cluster, option, gpu, host)


def largest_fitting_params(result: Plan, gpu_memory: int, host_memory: int | None = None) -> int:
    """The largest model of the same architecture that fits: every component here grows in
    proportion to the parameter count, so scale it until the GPU (or the node's host) is full."""
    limits = [gpu_memory / result.gpu_total]
    if host_memory is not None and result.host_total:
        limits.append(host_memory / (result.host_total * result.cluster.gpus_per_node))
    return int(result.model.num_params * min(limits))
