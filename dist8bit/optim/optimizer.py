"""The optimizer loop shared by every dist8bit optimizer.

A step groups the parameters that can share one kernel launch (same device,
dtypes, precision and constants), turns each group into a list of segments
and calls the backend's fused multi-tensor step once per group: no per-
parameter launches and no host synchronisation. Subclasses only say which
states their rule keeps and which constants it needs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch

from .. import paging
from ..backends import backend_for
from ..backends.contract import NUM_SLOTS, FusedStepCall
from ..backends.rules import Rule, StateSpec, StepConstants, WeightDecay
from ..functional import codebook_for, dequantize_blockwise
from ..quant.codebook import Codebook
from ..quant.layout import DEFAULT_BLOCKSIZE, check_blocksize, num_blocks
from . import master_weights as masters
from . import sharded
from . import state as state_layout
from .identity_map import WeakIdentityMap
from .norms import HISTORY, SegmentNorms, clip_update_norm, percentile_clip
from .overrides import GlobalOptimManager
from .segments import (
    PADDED_VERSION,
    TABLE_COLUMNS,
    Segment,
    check_segments,
    packed_layout,
    repack,
    segment_table,
    table_bits,
    upgraded_table,
)
from .state import is_quantized, precision_name

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SEGMENT_STRIDE = 1 << 40  # random-number counter range reserved per parameter
# Flags torch.optim groups carry that dist8bit optimizers do not implement; a
# torch state dict loads only when they are off.
# (bias_correction: DeepSpeed's FusedAdam / DeepSpeedCPUAdam groups carry it.)
TORCH_ONLY_FLAGS = (
    "foreach",
    "maximize",
    "capturable",
    "differentiable",
    "fused",
    "amsgrad",
    "decoupled_weight_decay",
    "bias_correction",
)
# Group keys that are this optimizer's choice, never the checkpoint's (a
# paged checkpoint loads into an unpaged optimizer and vice versa).
PRECISION_KEYS = ("optim_bits", "min_8bit_size", "blocksize", "is_paged", "master_weights", "error_bits")
# Parameters smaller than this keep 32-bit state unless min_8bit_size / min_quantized_size says otherwise.
DEFAULT_MIN_QUANTIZED_SIZE = 4096
# The block size an optimizer uses when none is given, by optim_bits: 4-bit states use Li, Chen, Zhu
# (2023)'s 128-element blocks (16 values per map need smaller blocks for the same error), the others 256.
DEFAULT_BLOCKSIZES = {4: 128, 8: DEFAULT_BLOCKSIZE, 32: DEFAULT_BLOCKSIZE}


class _UnsetBlocksize(int):
    """The `blocksize` argument's default: 256 wherever it is read as a number (signatures, docs), and
    recognised by identity in the constructor, so that optim_bits=4 without a blocksize gets 128."""


UNSET_BLOCKSIZE = _UnsetBlocksize(DEFAULT_BLOCKSIZE)


def default_blocksize(optim_bits: int) -> int:
    """The block size an optimizer constructed with `optim_bits` and no blocksize argument uses."""
    return DEFAULT_BLOCKSIZES[optim_bits]


def resolve_min_quantized_size(min_8bit_size: int, alias: int | None) -> int:
    """The smallest parameter (in elements) that gets quantized state: `min_8bit_size`
    (bitsandbytes' name, for every quantized precision) or its alias `min_quantized_size`;
    both given with different values (min_8bit_size other than its default) is an error."""
    if alias is None:
        return min_8bit_size
    if min_8bit_size not in (alias, DEFAULT_MIN_QUANTIZED_SIZE):
        raise ValueError(
            f"min_8bit_size={min_8bit_size!r} and min_quantized_size={alias!r} name the same setting; pass one of them"
        )
    return alias


def _check_common(optim_bits: int, min_8bit_size: int, percentile_clipping: int, max_unorm: float, block_wise: bool) -> None:
    if isinstance(optim_bits, bool) or optim_bits not in state_layout.PRECISIONS:
        raise ValueError(f"optim_bits must be one of {state_layout.PRECISIONS}, got {optim_bits!r}")
    if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size (min_quantized_size) must be a non-negative int, got {min_8bit_size!r}")
    if not isinstance(percentile_clipping, int) or not 1 <= percentile_clipping <= 100:
        raise ValueError(f"percentile_clipping must be an int in [1, 100] (100 = off), got {percentile_clipping!r}")
    if not max_unorm >= 0.0:
        raise ValueError(f"max_unorm must be >= 0 (0 = off), got {max_unorm!r}")
    if not block_wise:
        raise ValueError("block_wise=False is not supported: dist8bit always quantizes block-wise (see `blocksize`)")


def check_lr(lr: float) -> None:
    if not isinstance(lr, (float, int)) or not lr >= 0.0:
        raise ValueError(f"lr must be a non-negative number, got {lr!r}")


def check_betas(betas: Iterable[float], count: int) -> tuple[float, ...]:
    betas = tuple(betas)
    if len(betas) != count:
        raise ValueError(f"betas must hold {count} values, got {betas!r}")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{index}] must be in [0, 1), got {beta!r}")
    return betas


def check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0.0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


# Hyper-parameters every optimizer that has them checks the same way.
NON_NEGATIVE = ("lr_decay", "initial_accumulator_value", "alpha", "momentum", "eps", "weight_decay")


def hyper_parameters(**values: Any) -> dict[str, Any]:
    """An optimizer's group defaults, after the checks shared by name (NON_NEGATIVE ones must be >= 0;
    lr is checked by Optimizer8bit). Rule-specific checks (betas, RMSprop's alpha < 1) stay with the rule."""
    check_non_negative(**{name: values[name] for name in NON_NEGATIVE if name in values})
    return values


_NORMS_UNDER_SHARDING = (
    "percentile_clipping, max_unorm and the LAMB/LARS trust ratio need whole-parameter norms, which a rank holding a "
    "shard (DeepSpeed ZeRO, FSDP) does not have; turn them off (percentile_clipping=100, max_unorm=0) or use "
    "gradient clipping from the framework (DeepSpeed 'gradient_clipping', torch.nn.utils.clip_grad_norm_)"
)


@dataclass
class _Unit:
    """One segment ready for the kernel: contiguous views of a parameter (or its
    piece of a flat buffer or local shard), its gradient and its state."""

    param: torch.Tensor
    write_back: torch.Tensor | None  # the non-contiguous original to copy the result into
    grad: torch.Tensor
    state: dict[str, torch.Tensor]
    history: torch.Tensor | None
    config: dict[str, Any]
    specs: tuple[StateSpec, ...]
    bits: int  # of the state: 32, 8 or 4
    blocksize: int
    step: int
    rounding_offset: int
    error: torch.Tensor | None  # compensated bf16 parameter: its weight_error (see master_weights.py)


class Optimizer8bit(torch.optim.Optimizer):
    """Base class: state layout, grouping into fused launches, state dicts."""

    rule: Rule
    uses_parameter_norms = False  # LAMB / LARS: the update needs ||p|| of the whole parameter
    weight_decay_kind = WeightDecay.L2  # where a setting decides it (Adam/AdamW, LAMB), weight_decay_mode says

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = DEFAULT_MIN_QUANTIZED_SIZE,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        max_unorm: float = 0.0,
        is_paged: bool = False,
        blocksize: int = UNSET_BLOCKSIZE,
        stochastic_rounding: bool = False,
        min_quantized_size: int | None = None,
        master_weights: str | None = None,
        error_bits: int = 8,
    ) -> None:
        """Options every optimizer takes as keywords (bitsandbytes' names, plus
        `blocksize`, `stochastic_rounding`, `min_quantized_size`, `master_weights` and
        `error_bits`); subclasses pass them through.

        optim_bits: 32, 8 or 4 bits per state element. min_8bit_size (alias min_quantized_size,
        default 4096): parameters with fewer elements keep 32-bit state, at any optim_bits.
        blocksize: elements per quantization block; when not given, 128 for optim_bits=4 and 256
        otherwise. A per-parameter override of optim_bits keeps the group's blocksize.
        master_weights ("fp32", "none", "stochastic", "compensated"; None: "none", or "stochastic"
        with stochastic_rounding=True) and error_bits (8 or 16): how bfloat16 parameters are
        written without an fp32 master (master_weights.py, docs/master_weights.md).
        """
        if args is not None:
            raise ValueError("args= (bitsandbytes' argument namespace) is not supported; pass keyword arguments")
        check_lr(defaults["lr"])
        min_8bit_size = resolve_min_quantized_size(min_8bit_size, min_quantized_size)
        _check_common(optim_bits, min_8bit_size, percentile_clipping, max_unorm, block_wise)
        blocksize = check_blocksize(default_blocksize(optim_bits) if blocksize is UNSET_BLOCKSIZE else blocksize)
        if is_paged:
            paging.warn_if_unavailable()  # one warning per process where states cannot be paged
        defaults = {
            **defaults,
            "optim_bits": optim_bits,
            "min_8bit_size": min_8bit_size,
            "percentile_clipping": percentile_clipping,
            "max_unorm": float(max_unorm),
            "block_wise": True,
            "is_paged": bool(is_paged),
            "blocksize": blocksize,
            "master_weights": masters.resolve_mode(master_weights, stochastic_rounding),
            "error_bits": masters.check_error_bits(error_bits),
        }
        self._logical_numel: WeakIdentityMap = WeakIdentityMap()
        self._param_uid: WeakIdentityMap = WeakIdentityMap()
        self._segments: WeakIdentityMap = WeakIdentityMap()
        self._rounding_seed = torch.initial_seed() % (1 << 62)
        self.nonfinite_counts: dict[torch.device, torch.Tensor] = {}
        super().__init__(params, defaults)

    # torch.optim.Optimizer pickles and deep-copies only defaults, state and param_groups; the
    # per-parameter records below must travel with them, or a copied optimizer cannot step.
    _COPIED_ATTRIBUTES = ("_logical_numel", "_param_uid", "_segments", "_rounding_seed", "nonfinite_counts")

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), **{name: getattr(self, name) for name in self._COPIED_ATTRIBUTES}}

    @property
    def stochastic_rounding(self) -> bool:
        """The older flag, read back: whether the defaults write bf16 parameters stochastically."""
        return self.defaults["master_weights"] == "stochastic"

    # ----------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        seen: set[int] = set()
        for param in params:
            if not isinstance(param, torch.Tensor):
                raise TypeError(f"optimizer params must be tensors, got {type(param).__name__}")
            if id(param) in seen:
                raise ValueError(f"a parameter of shape {tuple(param.shape)} is listed twice in one param group")
            seen.add(id(param))
            if param.is_complex() or param.dtype not in FLOAT_DTYPES:
                raise ValueError(
                    f"parameter of shape {tuple(param.shape)} has dtype {param.dtype}; dist8bit optimizers "
                    "support float32, float16 and bfloat16 parameters (view complex tensors with torch.view_as_real)"
                )
            # Precision is decided by the full parameter's size, recorded now so
            # that later sharding (ZeRO, FSDP) cannot change it.
            self._logical_numel.setdefault(param, param.numel())
            self._param_uid.setdefault(param, len(self._param_uid))
        for key in ("optim_bits", "min_8bit_size", "percentile_clipping", "max_unorm", "block_wise"):
            if key in param_group:
                _check_common(
                    param_group.get("optim_bits", self.defaults["optim_bits"]),
                    param_group.get("min_8bit_size", self.defaults["min_8bit_size"]),
                    param_group.get("percentile_clipping", self.defaults["percentile_clipping"]),
                    param_group.get("max_unorm", self.defaults["max_unorm"]),
                    param_group.get("block_wise", True),
                )
                break
        if "lr" in param_group:
            check_lr(param_group["lr"])
        if "master_weights" in param_group:
            param_group["master_weights"] = masters.resolve_mode(param_group["master_weights"], False)
        if "error_bits" in param_group:
            masters.check_error_bits(param_group["error_bits"])
        super().add_param_group({**param_group, "params": params})

    # ------------------------------------------------------ subclass contract
    def state_specs(self, config: dict[str, Any]) -> tuple[StateSpec, ...]:
        raise NotImplementedError

    def step_constants(self, config: dict[str, Any], step: int) -> StepConstants:
        raise NotImplementedError

    def kernel_rule(self, config: dict[str, Any]) -> Rule:
        """The kernel's rule for a group; a class attribute except where a setting picks it (LARS)."""
        return self.rule

    def weight_decay_mode(self, config: dict[str, Any]) -> WeightDecay:
        return self.weight_decay_kind

    def implied_torch_flags(self) -> dict[str, Any]:
        """torch.optim group flags this optimizer's semantics fix (accepted when equal)."""
        return {}

    def initial_state_value(self, config: dict[str, Any]) -> float:
        return 0.0

    def trust_ratio(self, config: dict[str, Any], norms: SegmentNorms) -> torch.Tensor | None:
        """Per-segment trust ratio of a layer-wise adaptive rule (LAMB, LARS); None (1) for the others."""
        return None

    def update_scale(self, config: dict[str, Any], norms: SegmentNorms, step: int, bits: int) -> torch.Tensor | None:
        """Per-segment multiplier of the step: the trust ratio, then max_unorm on the scaled update; None when 1.

        `step` and `bits` (the states' precision: 32, 8 or 4) describe the batch: dist8bit's rules do not need them, bitsandbytes'
        clipping does (dist8bit.compat.bitsandbytes.optim)."""
        scale = self.trust_ratio(config, norms)
        if config["max_unorm"] <= 0.0:
            return scale
        if scale is None:
            return clip_update_norm(config["max_unorm"], norms.params, norms.directions)
        return scale * clip_update_norm(config["max_unorm"], norms.params, norms.directions * scale)

    # ----------------------------------------------------------- the config
    def resolved_config(self, param: torch.Tensor, group: dict[str, Any], overrides: WeakIdentityMap) -> dict[str, Any]:
        """The group's settings with this parameter's overrides on top."""
        override = overrides.get(param)
        if not override:
            return group
        unknown = sorted(set(override) - set(group))
        if unknown:
            raise ValueError(
                f"override for parameter of shape {tuple(param.shape)} has unknown keys {unknown}; "
                f"{type(self).__name__} understands {sorted(k for k in group if k != 'params')}"
            )
        return {**group, **override}

    def state_bits(self, param: torch.Tensor, config: dict[str, Any]) -> int:
        """The precision of this parameter's state (32, 8 or 4), decided by its full size
        (recorded before any sharding) and, for a DTensor, by whether a row-aligned block exists."""
        numel = self._logical_numel.get(param, param.numel())
        bits = _precision(numel, config)
        if is_quantized(bits) and self._state_blocksize(param, config) is None:
            return 32
        return bits

    # ------------------------------------------------------------- segments
    def set_segments(self, flat: torch.Tensor, segments: Sequence[Segment]) -> None:
        """Declare which parameter each element range of a flat buffer belongs to.

        For wrappers that hand the optimizer flat buffers instead of the
        parameters (DeepSpeed ZeRO partitions): each segment keeps the
        precision, overrides and rounding stream of its original parameter.
        Call before the buffer's first step; the layout is then fixed.
        """
        ordered = check_segments(flat, segments)
        known = self._segments.get(flat)
        if known is not None and self.state.get(flat) and _spans(known) != _spans(ordered):
            raise ValueError("set_segments: this buffer already has state laid out for other segments")
        for segment in ordered:
            self._param_uid.setdefault(segment.source, len(self._param_uid))
        self._segments[flat] = ordered

    def segment_states(
        self, flat: torch.Tensor, source: torch.Tensor | None = None
    ) -> list[tuple[Segment, int, dict[str, torch.Tensor]]]:
        """Each segment of a flat buffer (only `source`'s, when given), its state's
        bits (32, 8 or 4), and its state as float32 values.

        The equivalent of DeepSpeed's per-parameter state fragments for packed
        quantized state (which DeepSpeed's own fragment API cannot read); `source`
        keeps gathering every parameter's state linear in the partition size.
        """
        segments = self._segments.get(flat)
        if segments is None:
            raise KeyError("segment_states: no segments were set for this tensor (see set_segments)")
        state = self.state.get(flat)
        if not state:
            return []
        group = self._group_of(flat)
        overrides = GlobalOptimManager.get_instance().overrides()
        result = []
        for segment, bits, views in self._segment_views(flat, segments, state, group):
            if source is not None and segment.source is not source:
                continue
            config = self.resolved_config(segment.source, group, overrides)
            values = {}
            for spec in self.state_specs(config):
                if is_quantized(bits):
                    values[spec.name] = dequantize_blockwise(
                        views[spec.name + state_layout.CODES_SUFFIX],
                        absmax=views[spec.name + state_layout.ABSMAX_SUFFIX],
                        code=_state_codebook(spec.signed, bits, flat.device).code,
                        out=torch.empty(segment.length, dtype=torch.float32, device=flat.device),
                        blocksize=config["blocksize"],
                    )
                else:
                    values[spec.name] = views[spec.name].clone()
            result.append((segment, bits, values))
        return result

    def _group_of(self, param: torch.Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise KeyError("the tensor is not in any param group of this optimizer")

    def _segment_views(
        self, flat: torch.Tensor, segments: list[Segment], state: dict[str, Any], group: dict[str, Any]
    ) -> list[tuple[Segment, int, dict[str, torch.Tensor]]]:
        """Per-segment views into a flat buffer's packed state (see segments.py), with each segment's bits."""
        bits = table_bits(state["segment_table"])
        blocksize = group["blocksize"]
        layout = packed_layout(segments, bits, blocksize)
        specs = self.state_specs(group)
        views = []
        for index, segment in enumerate(segments):
            entry: dict[str, torch.Tensor] = {}
            offset = layout.value_offsets[index]
            for spec in specs:
                if layout.quantized[index]:
                    entry[spec.name + state_layout.CODES_SUFFIX] = state[spec.name + state_layout.CODES_SUFFIX].narrow(
                        0, offset, layout.code_bytes(index)
                    )
                    entry[spec.name + state_layout.ABSMAX_SUFFIX] = state[spec.name + state_layout.ABSMAX_SUFFIX].narrow(
                        0, layout.block_offsets[index], num_blocks(segment.length, blocksize)
                    )
                else:
                    entry[spec.name] = state[spec.name].narrow(0, offset, segment.length)
            views.append((segment, bits[index], entry))
        return views

    def _init_flat_state(
        self, flat: torch.Tensor, segments: list[Segment], state: dict[str, Any], configs: list[dict[str, Any]], group
    ) -> None:
        specs = self.state_specs(group)
        masters.check_parameter(group["master_weights"], flat)
        for segment, config in zip(segments, configs, strict=True):
            if self.state_specs(config) != specs or any(
                config[key] != group[key] for key in ("blocksize", "master_weights", "error_bits")
            ):
                raise ValueError(
                    f"parameter of {segment.logical_numel} elements overrides settings that change its state layout "
                    "(state slots, blocksize, master_weights or error_bits); that is not supported inside a flat "
                    "(ZeRO) partition"
                )
            if self._needs_whole_parameter_norms(config):
                raise ValueError(_NORMS_UNDER_SHARDING)
        bits = [_precision(s.logical_numel, c) for s, c in zip(segments, configs, strict=True)]
        layout = packed_layout(segments, bits, group["blocksize"])
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state.update(
            state_layout.allocate_packed(
                flat.device,
                specs,
                layout.codes_numel,
                layout.blocks,
                layout.values_numel,
                self.initial_state_value(group),
                paged=self.defaults["is_paged"],
            )
        )
        state["segment_table"] = segment_table(segments, bits)

    def _needs_whole_parameter_norms(self, config: dict[str, Any]) -> bool:
        return self.uses_parameter_norms or config["percentile_clipping"] < 100 or config["max_unorm"] > 0

    def _state_blocksize(self, param: torch.Tensor, config: dict[str, Any]) -> int | None:
        """Block size of this parameter's quantized state; None when it must stay 32-bit."""
        if sharded.is_dtensor(param):
            return sharded.row_aligned_blocksize(param.shape, config["blocksize"])
        return config["blocksize"]

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        paging.refuse_graph_capture(self)  # a replay would read stale segment tables
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_selected(None)
        return loss

    @torch.no_grad()
    def step_params(self, params: Iterable[torch.Tensor]) -> None:
        """Step only `params` (those with a gradient), with their groups' current hyper-parameters.

        For wrappers that step parameters as their gradients become ready (the
        offload optimizer's overlapped step). Each parameter's update equals its
        update in a full step() whatever the subset: the kernel is elementwise,
        and every norm-based scale dist8bit computes (trust ratios, max_unorm,
        percentile clipping) is per parameter.
        """
        paging.refuse_graph_capture(self)
        selected = {id(param) for param in params}
        listed = {id(param) for group in self.param_groups for param in group["params"]}
        if not selected <= listed:
            raise ValueError(f"step_params: {len(selected - listed)} of the tensors are in no param group of this optimizer")
        self._step_selected(selected)

    def _step_selected(self, selected: set[int] | None) -> None:
        """One step of the parameters whose id is in `selected` (all when None) that have a gradient."""
        overrides = GlobalOptimManager.get_instance().overrides()
        batches: dict[tuple, list[_Unit]] = defaultdict(list)
        # (id(config), step) -> (constant vector, batch key): computed once per group and step, not per
        # parameter. The units hold their configs until the launches, so no id is reused within this call.
        settings: dict[tuple[int, int], tuple[tuple[float, ...], tuple]] = {}
        step_counters: list[torch.Tensor] = []  # advanced together by one foreach add, not one op per parameter
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None or (selected is not None and id(param) not in selected):
                    continue
                self._check_grad(param)
                state = self.state[param]
                segments = self._segments.get(param)
                if segments is None:
                    units = self._whole_parameter_unit(param, state, group, overrides)
                else:
                    units = self._flat_units(param, segments, state, group, overrides)
                step_counters.append(state["step"])
                for unit in units:
                    known = settings.get((id(unit.config), unit.step))
                    if known is None:
                        known = self.step_constants(unit.config, unit.step).vector(), _batch_key(unit.config)
                        settings[id(unit.config), unit.step] = known
                    hyper, launch_settings = known
                    key = (
                        unit.param.device,
                        unit.param.dtype,
                        unit.grad.dtype,
                        unit.bits,
                        unit.blocksize,
                        hyper,
                        unit.step,
                        launch_settings,
                    )
                    batches[key].append(unit)
        if step_counters:
            torch._foreach_add_(step_counters, 1.0)
        for (device, _, _, bits, blocksize, hyper, step, _), units in batches.items():
            self._launch(device, bits, blocksize, hyper, step, units)

    def _whole_parameter_unit(self, param: torch.Tensor, state: dict[str, Any], group, overrides) -> list[_Unit]:
        config = self.resolved_config(param, group, overrides)
        if not state:
            self._init_state(param, state, config)
        step = int(state["step"].item()) + 1  # a CPU tensor (no device sync), advanced by _step_selected
        specs = self.state_specs(config)
        local_param = sharded.local(param)
        if local_param.numel() == 0:
            return []
        bits = state_layout.stored_bits(state, specs, local_param.shape, self.state_bits(param, config))
        names = [name for spec in specs for name in state_layout.expected_entries(spec, bits)]
        blocksize = config["blocksize"]
        if is_quantized(bits):
            blocksize = self._state_blocksize(param, config) or blocksize
        target = local_param
        updated = local_param if local_param.is_contiguous() else local_param.contiguous()
        error = masters.error_buffer(state, config, local_param)
        return [
            _Unit(
                param=updated,
                write_back=target if updated is not target else None,
                grad=sharded.local(param.grad).contiguous(),
                state={name: state[name] for name in names},
                history=state.get("grad_norm_history"),
                config=config,
                specs=specs,
                bits=bits,
                blocksize=blocksize,
                step=step,
                rounding_offset=self._param_uid.get(param, 0) * SEGMENT_STRIDE,
                error=error,
            )
        ]

    def _flat_units(self, flat: torch.Tensor, segments: list[Segment], state, group, overrides) -> list[_Unit]:
        configs = [self.resolved_config(s.source, group, overrides) for s in segments]
        if not state:
            self._init_flat_state(flat, segments, state, configs, group)
        step = int(state["step"].item()) + 1  # advanced by _step_selected
        grad = flat.grad
        units = []
        views = self._segment_views(flat, segments, state, group)
        errors = masters.error_buffer(state, group, flat)
        for (segment, bits, entry), config in zip(views, configs, strict=True):
            units.append(
                _Unit(
                    param=flat.narrow(0, segment.start, segment.length),
                    write_back=None,
                    grad=grad.narrow(0, segment.start, segment.length),
                    state=entry,
                    history=None,
                    config=config,
                    specs=self.state_specs(config),
                    bits=bits,
                    blocksize=config["blocksize"],
                    step=step,
                    rounding_offset=self._param_uid.get(segment.source, 0) * SEGMENT_STRIDE + segment.param_offset,
                    error=None if errors is None else errors.narrow(0, segment.start, segment.length),
                )
            )
        return units

    def _check_grad(self, param: torch.Tensor) -> None:
        grad = param.grad
        if grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients (parameter of shape {tuple(param.shape)}); "
                "use torch.nn.Embedding(sparse=False) or torch.optim.SparseAdam"
            )
        if grad.dtype not in FLOAT_DTYPES or grad.shape != param.shape or grad.device != param.device:
            raise RuntimeError(
                f"gradient of parameter of shape {tuple(param.shape)} has dtype {grad.dtype}, shape {tuple(grad.shape)} "
                f"and device {grad.device}; it must be a float tensor shaped like the parameter on {param.device}"
            )
        if sharded.is_dtensor(param) != sharded.is_dtensor(grad):
            raise RuntimeError(
                f"parameter of shape {tuple(param.shape)}: the parameter and its gradient must both be DTensors or both "
                "plain tensors (mixed torch.Tensor and DTensor)"
            )

    def _init_state(self, param: torch.Tensor, state: dict[str, Any], config: dict[str, Any]) -> None:
        masters.check_parameter(config["master_weights"], param)
        specs = self.state_specs(config)
        if sharded.is_dtensor(param):
            sharded.check_placements(param)
            if sharded.is_sharded(param) and self._needs_whole_parameter_norms(config):
                raise ValueError(_NORMS_UNDER_SHARDING)
        bits = self.state_bits(param, config)
        local_param = sharded.local(param)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        blocksize = self._state_blocksize(param, config) if is_quantized(bits) else config["blocksize"]
        state.update(
            state_layout.allocate(
                local_param, specs, bits, blocksize, self.initial_state_value(config), paged=self.defaults["is_paged"]
            )
        )
        if config["percentile_clipping"] < 100:
            state["grad_norm_history"] = torch.full((HISTORY,), math.inf, dtype=torch.float32, device=local_param.device)

    def _launch(
        self, device: torch.device, bits: int, blocksize: int, hyper: Sequence[float], step: int, units: list[_Unit]
    ) -> None:
        config = units[0].config
        call = self._fused_step_call(device, bits, blocksize, hyper, step, units)
        backend = backend_for(device)
        if config["percentile_clipping"] < 100:
            grad_scale = percentile_clip([u.history for u in units], call.grads, step, config["percentile_clipping"])
            call = replace(call, grad_scale=grad_scale)

        def direction_sums() -> torch.Tensor:
            sums = torch.zeros(len(units), dtype=torch.float64, device=device)
            backend.fused_step(replace(call, norm_out=sums))
            return sums

        norms = SegmentNorms(list(call.params), list(call.grads), direction_sums)
        update_scale = self.update_scale(config, norms, step, bits)
        counter = self.nonfinite_counts.get(device)
        if counter is None:  # allocated once per device, not per step
            counter = self.nonfinite_counts[device] = torch.zeros(1, dtype=torch.int64, device=device)
        backend.fused_step(replace(call, update_scale=update_scale, nonfinite_count=counter))
        for unit in units:
            if unit.write_back is not None:
                unit.write_back.copy_(unit.param)

    def _fused_step_call(
        self, device: torch.device, bits: int, blocksize: int, hyper: Sequence[float], step: int, units: list[_Unit]
    ) -> FusedStepCall:
        """The kernel call for one batch of units (scales and outputs are added per pass)."""
        config, specs = units[0].config, units[0].specs
        states: list[list[torch.Tensor]] = [[] for _ in range(NUM_SLOTS)]
        absmaxes: list[list[torch.Tensor]] = [[] for _ in range(NUM_SLOTS)]
        codebooks: list[Codebook | None] = [None] * NUM_SLOTS
        for slot, spec in enumerate(specs):
            if is_quantized(bits):
                states[slot] = [u.state[spec.name + state_layout.CODES_SUFFIX] for u in units]
                absmaxes[slot] = [u.state[spec.name + state_layout.ABSMAX_SUFFIX] for u in units]
                codebooks[slot] = _state_codebook(spec.signed, bits, device)
            else:
                states[slot] = [u.state[spec.name] for u in units]
        seed = None
        if config["master_weights"] == "stochastic" and units[0].param.dtype == torch.bfloat16:
            seed = (self._rounding_seed ^ (step * 0x9E3779B97F4A7C15)) & ((1 << 62) - 1)
        errors = [u.error for u in units] if units[0].error is not None else []
        return FusedStepCall(
            rule=self.kernel_rule(config),
            wd_mode=self.weight_decay_mode(config),
            constants=hyper,
            params=[u.param for u in units],
            grads=[u.grad for u in units],
            states=states,
            absmaxes=absmaxes,
            codebooks=codebooks,
            segment_offsets=[u.rounding_offset for u in units],
            blocksize=blocksize,
            seed=seed,
            errors=errors,
        )

    # ------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            group["dist8bit_state_version"] = state_layout.STATE_FORMAT_VERSION
        overrides = GlobalOptimManager.get_instance().overrides()
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                if sharded.is_dtensor(param) and index in state_dict["state"]:
                    config = self.resolved_config(param, group, overrides)
                    state_dict["state"][index] = self._dtensor_state(param, state_dict["state"][index], config)
                index += 1
        return state_dict

    def _dtensor_state(self, param: torch.Tensor, state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        """A DTensor parameter's local state as DTensors laid out like it (see sharded.py)."""
        blocksize = self._state_blocksize(param, config)
        specs = self.state_specs(config)
        bits = state_layout.stored_bits(state, specs, sharded.local(param).shape, self.state_bits(param, config))
        exported = {}
        for key, value in state.items():
            if key == "step" or not isinstance(value, torch.Tensor) or key == "grad_norm_history":
                exported[key] = value
            else:
                exported[key] = sharded.state_to_dtensor(param, value, sharded.elements_per_entry(key, bits, blocksize))
        return exported

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or "state" not in state_dict:
            raise ValueError("not an optimizer state dict: expected keys 'state' and 'param_groups'")
        # Imported here: the converter sits above the optimizers and imports them.
        from ..checkpoint import bnb_loading

        if bnb_loading.is_bitsandbytes(state_dict):  # converted in memory by dist8bit convert's own code
            state_dict = bnb_loading.to_dist8bit(self, state_dict)
            saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} param groups but {type(self).__name__} has {len(self.param_groups)}"
            )
        for group in saved_groups:
            version = group.get("dist8bit_state_version", state_layout.STATE_FORMAT_VERSION)
            if version > state_layout.STATE_FORMAT_VERSION:
                raise ValueError(
                    f"state dict format version {version} is newer than this dist8bit supports "
                    f"({state_layout.STATE_FORMAT_VERSION}); upgrade dist8bit"
                )
        merged_groups = [
            self._merge_saved_group(saved, current) for saved, current in zip(saved_groups, self.param_groups, strict=True)
        ]
        id_to_param = {}
        for saved, current in zip(saved_groups, self.param_groups, strict=True):
            if len(saved["params"]) != len(current["params"]):
                raise ValueError(
                    f"a saved param group has {len(saved['params'])} parameters but the optimizer's has {len(current['params'])}"
                )
            id_to_param.update(zip(saved["params"], current["params"], strict=True))
        overrides = GlobalOptimManager.get_instance().overrides()
        group_of = {id(p): merged for merged, g in zip(merged_groups, self.param_groups, strict=True) for p in g["params"]}
        version_of = {
            id(p): saved.get("dist8bit_state_version", state_layout.STATE_FORMAT_VERSION)
            for saved, g in zip(saved_groups, self.param_groups, strict=True)
            for p in g["params"]
        }
        saved_states = dict(state_dict["state"])
        for saved_id, saved_state in saved_states.items():
            param = id_to_param.get(saved_id)
            if param is None:
                raise ValueError(f"the state dict holds state for parameter id {saved_id}, which no param group lists")
            config = self.resolved_config(param, group_of[id(param)], overrides)
            saved_state = saved_states[saved_id] = masters.adapt_saved_error(saved_state, config, param, param.numel())
            if param in self._segments and saved_state:
                saved_state = saved_states[saved_id] = self._upgrade_flat_state(param, saved_state, config, version_of[id(param)])
            self._check_saved_state(param, saved_state, config)
        state_dict = {**state_dict, "state": saved_states, "param_groups": merged_groups}
        originals = {key: dict(value) for key, value in state_dict["state"].items()}
        for saved_id, entries in originals.items():
            param = id_to_param[saved_id]
            if sharded.is_dtensor(param):
                config = self.resolved_config(param, group_of[id(param)], overrides)
                blocksize, bits = self._state_blocksize(param, config), self.state_bits(param, config)
                for key, value in entries.items():
                    if isinstance(value, torch.Tensor) and key not in ("step", "grad_norm_history"):
                        per_entry = sharded.elements_per_entry(key, bits, blocksize)
                        entries[key] = sharded.local_state(param, value, per_entry, key)
        super().load_state_dict(state_dict)
        # torch casts floating-point state to the parameter's dtype; dist8bit keeps
        # float32 states and scales whatever the parameter dtype is.
        for saved_id, entries in originals.items():
            param = id_to_param[saved_id]
            for key, value in entries.items():
                if key == "step":
                    # A fresh CPU tensor: torch would share the loaded one, so two
                    # optimizers loaded from one dict would count each other's steps.
                    self.state[param][key] = torch.tensor(float(value), dtype=torch.float32)
                elif isinstance(value, torch.Tensor):
                    self.state[param][key] = value.to(device=param.device, copy=True)

    def _merge_saved_group(self, saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
        """Saved hyper-parameters over current defaults; torch-only flags must be off."""
        merged = {**{k: v for k, v in current.items() if k != "params"}, **saved}
        # Precision and paging are this optimizer's choice, not the checkpoint's: a
        # precision mismatch must surface as an error below, never silently switch.
        for key in PRECISION_KEYS:
            merged[key] = current[key]
        implied = self.implied_torch_flags()
        for key in set(saved) - set(current):
            if key in implied and saved[key] != implied[key]:
                raise ValueError(
                    f"the state dict's param group sets {key}={saved[key]!r}, but {type(self).__name__} implies {implied[key]!r}"
                )
            if key in TORCH_ONLY_FLAGS and key not in implied and saved[key] not in (False, None):
                raise ValueError(
                    f"the state dict's param group sets {key}={saved[key]!r}, which {type(self).__name__} does not support"
                )
            if key not in TORCH_ONLY_FLAGS and key not in ("params", "param_names", "dist8bit_state_version", "initial_lr"):
                raise ValueError(
                    f"the state dict's param group has key {key!r}, which {type(self).__name__} does not have: "
                    "was it saved by another optimizer?"
                )
            if key in TORCH_ONLY_FLAGS:
                del merged[key]
        return merged

    def _check_saved_state(self, param: torch.Tensor, saved: dict[str, Any], config: dict[str, Any]) -> None:
        where = f"parameter of shape {tuple(param.shape)}"
        if not saved:
            return
        if param in self._segments:
            self._check_saved_flat_state(param, saved, config)
            return
        specs = self.state_specs(config)
        bits = self.state_bits(param, config)
        expected = {name for spec in specs for name in state_layout.expected_entries(spec, bits)}
        other = {name for spec in specs for name in state_layout.expected_entries(spec, 8 if bits == 32 else 32)}
        present = {
            k
            for k, v in saved.items()
            if isinstance(v, torch.Tensor) and k not in ("step", "grad_norm_history", masters.ERROR_KEY)
        }
        if present & other and specs:
            self._refuse_precision(where, _saved_bits(param, saved, specs), bits, config)
        if present != expected:
            raise ValueError(
                f"{where}: the state dict holds {sorted(present)} but {type(self).__name__} expects {sorted(expected)}; "
                "was it saved by another optimizer or with other settings (momentum, centered, ...)?"
            )
        if "step" not in saved:
            raise ValueError(f"{where}: the state dict has no 'step'")
        for spec in specs:
            if is_quantized(bits):
                codes = saved[spec.name + state_layout.CODES_SUFFIX]
                absmax = saved[spec.name + state_layout.ABSMAX_SUFFIX]
                blocksize = self._state_blocksize(param, config)
                blocks = num_blocks(param.numel(), blocksize)
                shape = state_layout.codes_shape(param.shape, bits)
                if codes.dtype == torch.uint8 and not sharded.is_dtensor(param) and tuple(codes.shape) != shape:
                    saved_bits = _saved_bits(param, saved, specs)
                    if tuple(codes.shape) == state_layout.codes_shape(param.shape, saved_bits):
                        self._refuse_precision(where, saved_bits, bits, config)
                if sharded.is_dtensor(param) and bits == 4:  # exported as [rows, row_elems / 2] (sharded.py)
                    shape = (param.shape[0], sharded.row_elems(param.shape) // 2)
                if codes.dtype != torch.uint8 or tuple(codes.shape) != shape:
                    raise ValueError(
                        f"{where}: {spec.name}_codes must be uint8 of shape {shape} ({precision_name(bits)} codes), "
                        f"got {codes.dtype} {tuple(codes.shape)}"
                    )
                if absmax.dtype != torch.float32 or absmax.numel() != blocks:
                    raise ValueError(
                        f"{where}: {spec.name}_absmax must be float32 with {blocks} scales (blocksize {blocksize}), "
                        f"got {absmax.dtype} with {absmax.numel()}"
                    )
            else:
                value = saved[spec.name]
                if not value.is_floating_point() or value.shape != param.shape:
                    raise ValueError(
                        f"{where}: {spec.name} must be a float tensor of shape {tuple(param.shape)}, got {value.dtype} {tuple(value.shape)}"
                    )

    def _refuse_precision(self, where: str, have: int, bits: int, config: dict[str, Any]) -> None:
        """A saved state of another precision than this optimizer keeps for the parameter: an error naming the fix."""
        target = {32: "fp32", 8: "8bit", 4: "4bit"}[bits]
        raise ValueError(
            f"{where}: the state dict holds {precision_name(have)} state but {type(self).__name__} keeps {precision_name(bits)} state "
            f"for it (optim_bits={config['optim_bits']}, min_8bit_size={config['min_8bit_size']}); convert the "
            f"checkpoint (dist8bit convert --to {target}) or construct the optimizer with matching optim_bits"
        )

    def _flat_bits(self, segments: list[Segment], group: dict[str, Any]) -> list[int]:
        overrides = GlobalOptimManager.get_instance().overrides()
        configs = [self.resolved_config(s.source, group, overrides) for s in segments]
        return [_precision(s.logical_numel, c) for s, c in zip(segments, configs, strict=True)]

    def _upgrade_flat_state(self, flat: torch.Tensor, saved: dict[str, Any], group: dict[str, Any], version: int) -> dict:
        """A flat buffer's saved state moved to the current format: formats 1-2
        stored 0/1 for 32/8-bit in the segment_table (now bits), format 1 packed
        segments back to back where later ones pad each to 16 bytes (see
        segments.py). A table for other segments is left for the check."""
        table = saved.get("segment_table")
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != len(TABLE_COLUMNS):
            return saved
        try:
            saved = {**saved, "segment_table": upgraded_table(table, version)}
        except ValueError:
            return saved
        if version >= PADDED_VERSION:
            return saved
        segments = self._segments[flat]
        bits = self._flat_bits(segments, group)
        table, expected = saved["segment_table"], segment_table(segments, bits)
        if table.shape != expected.shape or not torch.equal(table.cpu(), expected):
            return saved
        names = [spec.name for spec in self.state_specs(group)]
        old = packed_layout(segments, bits, group["blocksize"], version=version)
        return repack(saved, names, old, packed_layout(segments, bits, group["blocksize"]))

    def _check_saved_flat_state(self, flat: torch.Tensor, saved: dict[str, Any], group: dict[str, Any]) -> None:
        """A flat buffer's saved state must have been laid out for exactly these segments."""
        segments = self._segments[flat]
        bits = self._flat_bits(segments, group)
        expected = segment_table(segments, bits)
        table = saved.get("segment_table")
        if (
            not isinstance(table, torch.Tensor)
            or tuple(table.shape) != tuple(expected.shape)
            or not torch.equal(table.cpu(), expected)
        ):
            raise ValueError(
                "the checkpoint's state for a flat (ZeRO) partition was laid out for other segments: it was saved with "
                "another world size, other parameters or other precision settings; load it with the same world size "
                "and model, or reshard it first (dist8bit convert SRC DST --world-size M)"
            )
        layout = packed_layout(segments, bits, group["blocksize"])
        for spec in self.state_specs(group):
            sizes = {}
            if layout.codes_numel:
                sizes[spec.name + state_layout.CODES_SUFFIX] = (torch.uint8, layout.codes_numel)
                sizes[spec.name + state_layout.ABSMAX_SUFFIX] = (torch.float32, layout.blocks)
            if layout.values_numel:
                sizes[spec.name] = (torch.float32, layout.values_numel)
            for name, (dtype, numel) in sizes.items():
                value = saved.get(name)
                if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.numel() != numel:
                    raise ValueError(
                        f"the checkpoint's flat-partition state {name!r} must be {dtype} with {numel} elements, got "
                        f"{getattr(value, 'dtype', type(value).__name__)} with {getattr(value, 'numel', lambda: '?')()}"
                    )
        if "step" not in saved:
            raise ValueError("the checkpoint's flat-partition state has no 'step'")

    # ---------------------------------------------------------- reporting
    def state_bytes(self) -> int:
        """Bytes held by all optimizer state tensors (excluding the scalar steps)."""
        return sum(state_layout.state_bytes(s) for s in self.state.values())


def _spans(segments: list[Segment]) -> list[tuple[int, int, int]]:
    return [(s.start, s.length, s.param_offset) for s in segments]


def _batch_key(config: dict[str, Any]) -> tuple:
    """Settings that change the launch itself (beyond the constant vector)."""
    return tuple((k, repr(config[k])) for k in sorted(config) if k != "params")


def _saved_bits(param: torch.Tensor, saved: dict[str, Any], specs: tuple[StateSpec, ...]) -> int:
    """The precision a saved per-parameter state has, from its entries and code sizes (for messages)."""
    codes = saved.get(specs[0].name + state_layout.CODES_SUFFIX)
    if not isinstance(codes, torch.Tensor):
        return 32
    return 8 if codes.numel() == param.numel() else 4


def _precision(numel: int, config: dict[str, Any]) -> int:
    """A parameter's state precision from its full size and config: optim_bits, except that
    parameters smaller than min_8bit_size (any quantized precision) keep 32-bit state."""
    bits = config["optim_bits"]
    if isinstance(bits, bool) or bits not in state_layout.PRECISIONS:
        raise ValueError(f"optim_bits must be one of {state_layout.PRECISIONS}, got {bits!r} (from a param group or override)")
    return 32 if numel < config["min_8bit_size"] else bits


@lru_cache(maxsize=16)
def _state_codebook(signed: bool, bits: int, device: torch.device) -> Codebook:
    """The codebook of a quantized state slot (state.state_map), built once per device (not per step)."""
    return codebook_for(state_layout.state_map(signed, bits), device)
