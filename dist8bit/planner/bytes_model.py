"""Bytes per GPU and per host of a training run: which copies exist, in which dtype, sharded how, and where.

Per parameter element (P elements, N = GPUs, owned = the fullest rank's share of a
sharded component, ~P/N plus partition padding):

    component   mixed precision (bf16/fp16)       fp32 training                 bf16, no master
    params      2 B (16-bit working weights)      4 B                           2 B
    grads       2 B (+ 4 B fp32 partition, ZeRO)  4 B                           2 B (+ 2 B partition, ZeRO)
    master      4 B fp32                          -- (the params are the master) -- (ZeRO-1/2: 2 B partition copy)
    states      counted exactly (state_bytes.py): AdamW 8 B fp32, ~2.03 B 8-bit, ~1.03 B 4-bit
    error       --                                --                            1 or 2 B, compensated only
    gathered    (params + grads bytes) x the largest module, ZeRO-3 / FSDP2 only

A strategy divides some components by N (`Strategy.shards`). Optimizer offload
(DeepSpeed ZeRO-Offload semantics) moves master, states and the fp32 gradient
copy the host step reads to the host: fp32 training then gains a host master.
Without a master (`Option.master_weights` none / stochastic / compensated, bf16
weights that the optimizer writes itself) ZeRO follows DeepSpeed's bf16 mode with
`bf16_master_weights_and_grads`: the partition the optimizer steps and its
gradient partition are bf16, a copy under ZeRO-1/2 and the parameter partition
itself under ZeRO-3. The compensated error buffer is optimizer state: sharded and
placed like the states. Offload keeps an fp32 host master by design, so it is
refused without one (`check_master`).
Not modelled: activations, communication buckets, allocator fragmentation,
CUDA context (pass --reserve for them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from ..optim.master_weights import MODES, check_error_bits
from ..quant.weight_error import error_dtype
from .model_shapes import ModelShape
from .state_bytes import STATE_PRECISIONS, StateCounter, StatePrecision, owned_numel

COMPONENTS = ("params", "grads", "master", "states", "error", "gathered")
FP32 = 4
KEEPS_MASTER = "fp32"  # the master_weights mode with an fp32 master (every other mode writes bf16 weights directly)
DEFAULT_ERROR_BITS = 8


@dataclass(frozen=True)
class Strategy:
    name: str
    shards: frozenset[str]  # components divided over the ranks
    layout: str  # how the optimizer state is laid out per rank (state_bytes.StateCounter.per_rank)
    # DeepSpeed ZeRO keeps a copy of its gradient partition (mixed precision): fp32 with a master, bf16 without
    grad_partition: bool = False
    gathers: bool = False  # all-gathers one module's params (and reduce-scatters its grads) at a time
    master_is_param: bool = False  # FSDP2 with a master: the sharded parameter stays fp32 and is itself the master copy
    offload_streams_grads: bool = False  # with offload, 16-bit grads leave the GPU bucket by bucket
    # Without a master, DeepSpeed ZeRO-1/2 still steps its own bf16 clone of the rank's partition
    # (stage_1_and_2 clones it to the master dtype); ZeRO-3 steps the bf16 parameter partition in place.
    copies_partition: bool = False


STRATEGIES = {
    "ddp": Strategy("ddp", frozenset(), "whole"),
    "zero1": Strategy("zero1", frozenset({"master", "states"}), "zero12", grad_partition=True, copies_partition=True),
    "zero2": Strategy(
        "zero2",
        frozenset({"grads", "master", "states"}),
        "zero12",
        grad_partition=True,
        offload_streams_grads=True,
        copies_partition=True,
    ),
    "zero3": Strategy(
        "zero3",
        frozenset({"params", "grads", "master", "states"}),
        "zero3",
        grad_partition=True,
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
    master_weights: str = KEEPS_MASTER  # dist8bit.optim.master_weights.MODES
    error_bits: int = DEFAULT_ERROR_BITS  # of the compensated error buffer (ignored by the other modes)

    def __post_init__(self) -> None:
        for value, known in (
            (self.strategy, STRATEGIES),
            (self.states, STATE_PRECISIONS),
            (self.mixed_precision, MIXED_PRECISION),
            (self.offload, OFFLOADS),
            (self.master_weights, MODES),
        ):
            if value not in known:
                raise ValueError(f"unknown setting {value!r}; choose one of {', '.join(known)}")
        check_error_bits(self.error_bits)
        check_master(self.master_weights, self.mixed_precision, self.offload)

    @property
    def precision(self) -> StatePrecision:
        return STATE_PRECISIONS[self.states]

    @property
    def keeps_master(self) -> bool:
        return self.master_weights == KEEPS_MASTER

    @property
    def error_bytes(self) -> int:
        """Bytes per owned element of the compensated error buffer (the optimizer's own dtype for error_bits)."""
        return error_dtype(self.error_bits).itemsize if self.master_weights == "compensated" else 0

    @property
    def master_label(self) -> str:
        """How the weights are written: 'fp32' (a master), 'none', 'stochastic' or 'compensated-8bit'/'-16bit'."""
        return f"compensated-{self.error_bits}bit" if self.error_bytes else self.master_weights

    @property
    def label(self) -> str:
        offload = " +offload" if self.offload != "none" else ""
        master = "" if self.keeps_master else f" {self.master_label}"
        return f"{self.strategy} {self.optimizer}-{self.states} {self.mixed_precision}{master}{offload}"


def check_master(master_weights: str, mixed_precision: str, offload: str) -> None:
    """Refuse the combinations without a master that no dist8bit setup trains, saying why."""
    if master_weights == KEEPS_MASTER:
        return
    if mixed_precision == "none":
        raise ValueError(
            f"--master-weights {master_weights} plans bf16 weights written without a float32 master, but "
            "--mixed-precision none trains float32 parameters, which are their own master: add --mixed-precision bf16"
        )
    if mixed_precision != "bf16":
        raise ValueError(
            f"--master-weights {master_weights} is planned for bf16 weights only: {mixed_precision} weights need a "
            "float32 master (the optimizers write float16 stochastically or compensated nowhere, and float16 without a "
            "master also needs loss scaling); use --mixed-precision bf16 or --master-weights fp32"
        )
    if offload != "none":
        raise ValueError(
            f"--offload {offload} steps on the host against an fp32 master copy by design (dist8bit's "
            "CPUOffloadOptimizer keeps one per parameter; DeepSpeed's ZeRO-Offload takes bf16 master weights only with "
            "DeepSpeedCPUAdam), so --master-weights must be fp32 there; drop --offload to train bf16 weights without a "
            f"master ({master_weights}) on the GPU"
        )


# The memory choices compared in one table, per strategy x state precision: with the fp32 master on the GPU or
# offloaded to the host, and without a master (bf16 weights only; report.option_rows picks the mode).
MEMORY_CHOICES = (("none", True), ("optimizer", True), ("none", False))
OPTIONS_ORDER = tuple((s, p, o, m) for s in STRATEGIES for p in STATE_PRECISIONS for o, m in MEMORY_CHOICES)


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
    master = option.keeps_master
    # the dtype the optimizer steps in, and of the gradient partition it reads (ZeRO): fp32 with a master, else bf16
    stepped = FP32 if master else low

    def elements(component: str) -> int:
        return owned if component in strategy.shards else total

    gpu: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    host: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    optimizer_side = host if offload else gpu
    # FSDP2 with a master keeps the fp32 sharded parameter (the master) and all-gathers it in `low` precision;
    # without one the sharded parameter is bf16.
    param_bytes = FP32 if strategy.master_is_param and master else low
    grad_bytes = param_bytes
    gpu["params"] = param_bytes * elements("params")
    if not (offload and strategy.offload_streams_grads):
        gpu["grads"] = grad_bytes * elements("grads")
    # gradients the optimizer step reads: ZeRO's partition copy, or the host copy offload steps on
    if offload:
        host["grads"] = FP32 * elements("master")
    elif mixed and strategy.grad_partition:
        gpu["grads"] += stepped * elements("master")
    if master and (offload or (mixed and not strategy.master_is_param)):
        optimizer_side["master"] = FP32 * elements("master")
    elif not master and strategy.copies_partition:
        gpu["master"] = low * elements("master")
    optimizer_side["states"] = _state_bytes(model, option.optimizer, option.states, strategy.layout, world)
    optimizer_side["error"] = option.error_bytes * elements("states")
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
