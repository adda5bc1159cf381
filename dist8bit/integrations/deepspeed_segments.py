"""DeepSpeed's flat fp32 partitions described as dist8bit segments.

DeepSpeed hands the optimizer one flat fp32 buffer per param group (ZeRO 1/2
and the BF16 optimizer) or per sub-group (ZeRO-3) instead of the parameters.
Each buffer is the concatenation of pieces of original parameters, plus
alignment padding. Example: ZeRO-2, 2 ranks, one group [emb 4800 | w 5328 | b 111]
(10239 elements, padded to 10240):

    flat lp buffer   |emb..............|w.....................|b..|pad|
    rank 0 partition |emb..............|w....|                 (5120)
    rank 1 partition                        |w................|b..|pad|

    rank 0 segments: (start 0,    len 4800, emb[0:4800]),  (start 4800, len 320,  w[0:320])
    rank 1 segments: (start 0,    len 5008, w[320:5328]),  (start 5008, len 111,  b[0:111])

`optimizer.set_segments(flat, segments)` tells the dist8bit optimizer this
layout, so each piece keeps its parameter's precision (decided from the full
numel and the overrides registered on the original parameter, e.g.
StableEmbedding's 32-bit state), quantization blocks start at each piece's
first element and padding is never touched.

ZeRO-3 partitions every parameter separately (`ds_tensor`, ceil(numel/world)
elements per rank, the last ranks padded), and a sub-group's flat buffer is its
parameters' partitions one after another:

    sub-group flat on rank r  |p0[r*s0 : r*s0+s0]|p1[r*s1 : ...]|...   (tail padding excluded)

(The partition formulas are in zero_partition.py, shared with the checkpoint converter.)

The links recorded here (original parameter -> optimizer, flat buffers, process
group) serve `get_full_optimizer_state`, the equivalent of DeepSpeed's
`safe_get_full_optimizer_state` for packed 8-bit state.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..functional import dequantize_blockwise
from ..optim import Optimizer8bit
from ..optim import state as state_layout
from ..optim.identity_map import WeakIdentityMap
from ..optim.overrides import GlobalOptimManager
from ..optim.segments import Segment
from . import zero_partition


class DeepSpeedLayoutError(RuntimeError):
    """DeepSpeed's partition layout is not the one this integration understands."""


@dataclass
class ParamLink:
    """Where the optimizer state of one original parameter lives on this rank."""

    optimizer: weakref.ref  # the dist8bit optimizer
    holders: list[weakref.ref]  # flat buffers (or the whole tensor) that may hold pieces of it
    group_index: int  # param group of the holders in the optimizer
    process_group: Any  # data-parallel group to gather over; None: nothing to gather
    shape: torch.Size
    flat: bool  # holders are flat buffers with segments (else one whole tensor)
    visible: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)


_LINKS: WeakIdentityMap = WeakIdentityMap()


def link_of(param: torch.Tensor) -> ParamLink | None:
    return _LINKS.get(param)


# ---------------------------------------------------------------- ZeRO 1/2, BF16
def mapped_segments(lp_params: Sequence[torch.Tensor]) -> list[Segment]:
    """Segments from DeepSpeed's own fragment mapping (`_hp_mapping`, set by `link_hp_params`)."""
    segments = []
    for lp in lp_params:
        mapping = getattr(lp, "_hp_mapping", None)
        if mapping is None:
            continue  # no piece of this parameter on this rank
        hp, lp_address = mapping.hp_fragment_address, mapping.lp_fragment_address
        if hp.numel != lp_address.numel:
            raise DeepSpeedLayoutError(f"fragment of {hp.numel} fp32 elements maps to {lp_address.numel} parameter elements")
        segments.append(
            Segment(source=lp, start=hp.start, length=hp.numel, param_offset=lp_address.start, logical_numel=lp.numel())
        )
    return segments


def attach_flat_groups(
    optimizer: Optimizer8bit, flats: Sequence[torch.Tensor], lp_groups: Sequence[Sequence[torch.Tensor]], process_groups
) -> None:
    """ZeRO 1/2 (`single_partition_of_fp32_groups`, `bit16_groups`) and BF16_Optimizer
    (`fp32_groups_flat_partition`, `bf16_groups`): one flat buffer per param group."""
    if len(flats) != len(optimizer.param_groups) or len(lp_groups) != len(flats):
        raise DeepSpeedLayoutError(
            f"expected one flat partition per param group, got {len(flats)} partitions, {len(lp_groups)} parameter "
            f"lists and {len(optimizer.param_groups)} groups"
        )
    for index, (flat, lps) in enumerate(zip(flats, lp_groups, strict=True)):
        if not any(p is flat for p in optimizer.param_groups[index]["params"]):
            raise DeepSpeedLayoutError(f"param group {index} of the optimizer does not hold its flat partition")
        optimizer.set_segments(flat, mapped_segments(lps))
        for lp in lps:
            _LINKS[lp] = ParamLink(weakref.ref(optimizer), [weakref.ref(flat)], index, process_groups[index], lp.shape, flat=True)


# ---------------------------------------------------------------------- ZeRO-3
def zero3_segments(params: Sequence[torch.Tensor], rank_of: Callable[[torch.Tensor], int], flat_numel: int) -> list[Segment]:
    """Segments of one ZeRO-3 sub-group's flat fp32 buffer (its params' `ds_tensor` partitions in order)."""
    spans, size = zero_partition.zero3_spans(
        [int(p.ds_numel) for p in params],
        [int(p.ds_tensor.ds_numel) for p in params],  # DeepSpeed's own partition size: ceil(ds_numel / world)
        [rank_of(p) for p in params],
    )
    if size != flat_numel:
        raise DeepSpeedLayoutError(f"ZeRO-3 sub-group partitions add up to {size} elements but its flat buffer has {flat_numel}")
    return [
        Segment(
            source=params[s.index],
            start=s.start,
            length=s.length,
            param_offset=s.param_offset,
            logical_numel=params[s.index].ds_numel,
        )
        for s in spans
    ]


OFFLOAD_MESSAGE = (
    "ZeRO-3 optimizer-state offload to NVMe (offload_optimizer.device=nvme) or partial offload (offload_optimizer.ratio "
    "< 1) is not supported with dist8bit optimizers; offload the whole optimizer to the CPU (device cpu, ratio 1) or not "
    "at all"
)


def attach_zero3(optimizer: Optimizer8bit, zero_optimizer: Any) -> None:
    """DeepSpeedZeroOptimizer_Stage3: one flat buffer per sub-group, in the param groups only around step()."""
    if getattr(zero_optimizer, "swap_optimizer", False) or getattr(zero_optimizer, "backup_optimizer", None) is not None:
        raise DeepSpeedLayoutError(OFFLOAD_MESSAGE)
    flats = zero_optimizer.fp32_partitioned_groups_flat
    visible = _zero3_visible(zero_optimizer)
    for sub_group, (flat, params) in enumerate(zip(flats, zero_optimizer.fp16_groups, strict=True)):
        group_index = zero_optimizer.sub_group_to_group_id[sub_group]
        segments = zero3_segments(params, zero_optimizer._get_param_partition_rank, flat.numel())
        optimizer.set_segments(flat, segments)
        for param in params:
            _LINKS[param] = ParamLink(
                weakref.ref(optimizer),
                [weakref.ref(flat)],
                group_index,
                zero_optimizer._get_param_partition_group(param),
                param.ds_shape,
                flat=True,
                visible=visible,
            )


def _zero3_visible(zero_optimizer: Any) -> Callable[[], contextlib.AbstractContextManager]:
    """ZeRO-3 keeps its flat buffers out of the param groups between steps; put them back while we read."""
    owner = weakref.ref(zero_optimizer)

    @contextlib.contextmanager
    def visible() -> Iterator[None]:
        zero = owner()
        if zero is None:
            raise RuntimeError("the DeepSpeed ZeRO-3 optimizer of this parameter no longer exists")
        zero._set_fp32_optimizer_param_groups()
        try:
            yield
        finally:
            zero._clear_fp32_optimizer_param_groups()

    return visible


# -------------------------------------------------------------- whole tensors
def link_whole(
    optimizer: Optimizer8bit, params: Sequence[torch.Tensor], holders: Sequence[torch.Tensor], group_index: int
) -> None:
    """No partitioning (ZeRO disabled): each parameter's state is kept whole, on
    the parameter itself or on DeepSpeed's fp32 master copy of it."""
    for param, holder in zip(params, holders, strict=True):
        _LINKS[param] = ParamLink(weakref.ref(optimizer), [weakref.ref(holder)], group_index, None, param.shape, flat=False)


def carry_overrides(params: Sequence[torch.Tensor], copies: Sequence[torch.Tensor]) -> None:
    """Give DeepSpeed's fp32 master copies the per-parameter overrides of the
    parameters they stand for (StableEmbedding's 32-bit state), which are keyed
    by the original parameter objects."""
    manager = GlobalOptimManager.get_instance()
    overrides = manager.overrides()
    for param, copy in zip(params, copies, strict=True):
        override = overrides.get(param)
        if override:
            manager.override_config(copy, key_value_dict=dict(override))


# ------------------------------------------------------------- full state
def full_optimizer_state(param: torch.Tensor, key: str, device: torch.device) -> torch.Tensor:
    """Float32 state `key` of the whole original parameter, gathered over its
    data-parallel group. Collective: every rank of the group must call it."""
    link = link_of(param)
    if link is None:
        raise ValueError(
            f"parameter of shape {tuple(param.shape)} is not trained by a dist8bit optimizer under DeepSpeed "
            "(deepspeed.initialize with a dist8bit optimizer, after dist8bit.integrations.deepspeed.register())"
        )
    optimizer = link.optimizer()
    holders = [ref() for ref in link.holders]
    if optimizer is None or any(h is None for h in holders):
        raise RuntimeError("the optimizer that trained this parameter no longer exists")
    numel = int(torch.Size(link.shape).numel())
    with link.visible():
        group = optimizer.param_groups[link.group_index]
        names = [spec.name for spec in optimizer.state_specs(group)]
        if key not in names:
            raise KeyError(f"{type(optimizer).__name__} keeps no state {key!r}; its states are {names}")
        if any(not optimizer.state.get(h) for h in holders):
            raise RuntimeError(f"no optimizer state {key!r} yet: call get_full_optimizer_state after the first step")
        if link.flat:
            full = torch.zeros(numel, dtype=torch.float32, device=device)
            for holder in holders:
                for segment, _, values in optimizer.segment_states(holder, source=param):
                    full.narrow(0, segment.param_offset, segment.length).copy_(values[key])
        else:
            full = _whole_state(optimizer, holders[0], group, key).to(device)
    if link.process_group is not None and dist.get_world_size(link.process_group) > 1:
        dist.all_reduce(full, group=link.process_group)  # pieces are disjoint, zeros elsewhere
    return full.view(link.shape)


def _whole_state(optimizer: Optimizer8bit, tensor: torch.Tensor, group: dict[str, Any], key: str) -> torch.Tensor:
    state = optimizer.state[tensor]
    if key in state:
        return state[key].detach().float().reshape(-1).clone()
    config = optimizer.resolved_config(tensor, group, GlobalOptimManager.get_instance().overrides())
    specs = optimizer.state_specs(config)
    spec = next(s for s in specs if s.name == key)
    bits = state_layout.stored_bits(state, specs, tensor.shape, optimizer.state_bits(tensor, config))
    codes = state[key + state_layout.CODES_SUFFIX]
    absmax = state[key + state_layout.ABSMAX_SUFFIX]
    return dequantize_blockwise(
        codes.reshape(-1),
        absmax=absmax,
        code=state_layout.state_map(spec.signed, bits).to(codes.device),
        out=torch.empty(tensor.numel(), dtype=torch.float32, device=codes.device),
        blocksize=config["blocksize"],
    ).float()
