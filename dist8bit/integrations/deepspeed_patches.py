"""Class-level patches that teach DeepSpeed 0.19 about dist8bit optimizers.

Each patch wraps one DeepSpeed method, acts only when the optimizer involved is
a dist8bit one (or the config names one) and otherwise calls DeepSpeed's
original unchanged, so registering dist8bit never alters a run that does not
use it. Wrappers remember the original (`__dist8bit_original__`), which makes
`apply()` idempotent.

DeepSpeedEngine
  _is_supported_optimizer     config "type" names a dist8bit optimizer (or a bad one: clear error)
  _configure_basic_optimizer  builds it from "params" (unknown keys: clear error)
  is_zero_supported_optimizer (engine module) no zero_allow_untested_optimizer needed
  _do_optimizer_sanity_check  refuses configs whose checkpoints would corrupt packed state
  _configure_optimizer        links whole parameters when ZeRO is off (fp32)
  _configure_fp16_optimizer   bf16/fp16 without ZeRO: fp32 master copies keep the overrides
  _configure_zero_optimizer   ZeRO 1/2/3 partitions -> segments
  _configure_bf16_optimizer   BF16_Optimizer partitions -> segments
  _load_zero_checkpoint       another world size or a universal checkpoint: clear error
DeepSpeedZeroOptimizer / BF16_Optimizer
  _link_all_hp_params         DeepSpeed's fragment getters read dist8bit state
  _load_legacy_checkpoint     (ZeRO 1/2) only rigid checkpoints with the same layout
DeepSpeedZeroOptimizer_Stage3
  get_full_hp_param, set_full_hp_param, get_local_fp32_param, set_local_hp_param
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..optim import Optimizer8bit
from . import deepspeed_segments as segments
from .deepspeed_config import check_params, resolve

ORIGINAL = "__dist8bit_original__"
CONVERT_HINT = "dist8bit convert <checkpoint dir> <output dir> --to 8bit --world-size {world}"


class DeepSpeedCheckpointError(RuntimeError):
    """A DeepSpeed checkpoint cannot be loaded into (or saved from) a dist8bit optimizer as asked."""


def _targets() -> list[tuple[Any, str, Callable[[Callable], Callable]]]:
    from deepspeed.runtime import bf16_optimizer, engine
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    Engine = engine.DeepSpeedEngine
    Zero12 = stage_1_and_2.DeepSpeedZeroOptimizer
    Zero3 = stage3.DeepSpeedZeroOptimizer_Stage3
    BF16 = bf16_optimizer.BF16_Optimizer
    return [
        (Engine, "_is_supported_optimizer", _is_supported_optimizer),
        (Engine, "_configure_basic_optimizer", _configure_basic_optimizer),
        (engine, "is_zero_supported_optimizer", _is_zero_supported_optimizer),
        (Engine, "_do_optimizer_sanity_check", _do_optimizer_sanity_check),
        (Engine, "_configure_optimizer", _configure_optimizer),
        (Engine, "_configure_fp16_optimizer", _configure_fp16_optimizer),
        (Engine, "_configure_zero_optimizer", _configure_zero_optimizer),
        (Engine, "_configure_bf16_optimizer", _configure_bf16_optimizer),
        (Engine, "_load_zero_checkpoint", _load_zero_checkpoint),
        (Zero12, "_link_all_hp_params", _link_all_hp_params),
        (BF16, "_link_all_hp_params", _link_all_hp_params),
        (Zero12, "_load_legacy_checkpoint", _load_legacy_checkpoint),
        (Zero3, "get_full_hp_param", _zero3_get_full_hp_param),
        (Zero3, "get_local_fp32_param", _zero3_refuse_state_key("get_local_fp32_param")),
        (Zero3, "set_full_hp_param", _zero3_refuse_state_key("set_full_hp_param")),
        (Zero3, "set_local_hp_param", _zero3_refuse_state_key("set_local_hp_param")),
    ]


def missing_targets() -> list[str]:
    """DeepSpeed attributes the patches need but the installed version lacks."""
    return [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name, _ in _targets() if not hasattr(owner, name)]


def apply() -> None:
    """Install every patch (once)."""
    for owner, name, make in _targets():
        current = getattr(owner, name)
        if getattr(current, ORIGINAL, None) is not None:
            continue
        wrapper = functools.wraps(current)(make(current))
        setattr(wrapper, ORIGINAL, current)
        setattr(owner, name, wrapper)


def is_applied() -> bool:
    from deepspeed.runtime import engine

    return getattr(engine.DeepSpeedEngine._configure_basic_optimizer, ORIGINAL, None) is not None


def _ours(optimizer: Any) -> bool:
    return isinstance(optimizer, Optimizer8bit)


def _basic(engine: Any) -> Any:
    return getattr(engine, "basic_optimizer", None)


# ------------------------------------------------------------------- config
def _is_supported_optimizer(original: Callable) -> Callable:
    def patched(self, optimizer_name):
        if resolve(optimizer_name, lambda name: original(self, name)) is not None:
            return True
        return original(self, optimizer_name)

    return patched


def _configure_basic_optimizer(original: Callable) -> Callable:
    def patched(self, model_parameters):
        cls = resolve(self.optimizer_name(), lambda name: original_supported(self, name))
        if cls is None:
            return original(self, model_parameters)
        return cls(model_parameters, **check_params(cls, self.optimizer_params() or {}))

    return patched


def original_supported(engine: Any, name: str) -> bool:
    method = type(engine)._is_supported_optimizer
    return getattr(method, ORIGINAL, method)(engine, name)


def _is_zero_supported_optimizer(original: Callable) -> Callable:
    def patched(optimizer):
        return _ours(optimizer) or original(optimizer)

    return patched


def _do_optimizer_sanity_check(original: Callable) -> Callable:
    def patched(self, basic_optimizer):
        if _ours(basic_optimizer) and self.zero_optimization():
            if self.zero_optimization_stage() in (1, 2) and self.zero_elastic_checkpoint():
                raise DeepSpeedCheckpointError(
                    "zero_optimization.elastic_checkpoint=true cannot be used with dist8bit optimizers: elastic "
                    "checkpoints cut and re-pad every state tensor by the partition padding, which corrupts packed "
                    "8-bit state. Set it to false; to resume on another world size convert the checkpoint with "
                    + CONVERT_HINT.format(world="M")
                )
            if self.zenflow or self.super_offload():
                raise NotImplementedError("ZenFlow and SuperOffload run their own CPU optimizers; use them without dist8bit")
        return original(self, basic_optimizer)

    return patched


# --------------------------------------------------------- partitions -> segments
def _configure_optimizer(original: Callable) -> Callable:
    def patched(self, client_optimizer, model_parameters):
        original(self, client_optimizer, model_parameters)
        basic = _basic(self)
        if _ours(basic) and self.optimizer is basic:
            for index, group in enumerate(basic.param_groups):
                segments.link_whole(basic, group["params"], group["params"], index)

    return patched


def _configure_fp16_optimizer(original: Callable) -> Callable:
    def patched(self, optimizer, low_precision_dtype):
        if not _ours(optimizer):
            return original(self, optimizer, low_precision_dtype)
        # FP16_UnfusedOptimizer steps the optimizer once with zero gradients while
        # it is built, to create state. For dist8bit that step would create the
        # state before the fp32 copies carry their parameters' overrides, count a
        # step and apply weight decay; state is created by the first real step.
        with _no_step(optimizer):
            wrapper = original(self, optimizer, low_precision_dtype)
        if not (hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_groups")):
            raise segments.DeepSpeedLayoutError(f"unexpected DeepSpeed mixed-precision optimizer {type(wrapper).__name__}")
        for index, (params, copies) in enumerate(zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True)):
            segments.carry_overrides(params, copies)
            segments.link_whole(optimizer, params, copies, index)
        return wrapper

    return patched


@contextlib.contextmanager
def _no_step(optimizer: Optimizer8bit) -> Iterator[None]:
    optimizer.step = types.MethodType(lambda self, closure=None: None, optimizer)
    try:
        yield
    finally:
        del optimizer.step


def _configure_zero_optimizer(original: Callable) -> Callable:
    def patched(self, optimizer):
        zero = original(self, optimizer)
        if _ours(optimizer):
            if hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO 1/2
                segments.attach_flat_groups(
                    optimizer, zero.single_partition_of_fp32_groups, zero.bit16_groups, zero.real_dp_process_group
                )
            elif hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
                segments.attach_zero3(optimizer, zero)
            else:
                raise segments.DeepSpeedLayoutError(f"unexpected DeepSpeed ZeRO optimizer {type(zero).__name__}")
        return zero

    return patched


def _configure_bf16_optimizer(original: Callable) -> Callable:
    def patched(self, optimizer):
        wrapper = original(self, optimizer)
        if _ours(optimizer):
            segments.attach_flat_groups(
                optimizer, wrapper.fp32_groups_flat_partition, wrapper.bf16_groups, wrapper.real_dp_process_group
            )
        return wrapper

    return patched


# ------------------------------------------------------------- fragment API
def _link_all_hp_params(original: Callable) -> Callable:
    def patched(self):
        original(self)
        if _ours(self.optimizer):
            groups = getattr(self, "bit16_groups", None) or self.bf16_groups
            for lp in (p for group in groups for p in group):
                _route_fragment_api(lp)

    return patched


def _route_fragment_api(lp: torch.Tensor) -> None:
    """Make DeepSpeed's per-parameter fragment methods (what `safe_get_full_optimizer_state`
    calls) read dist8bit's state; writing packed 8-bit state through them is refused."""
    get_param, set_param = lp.get_full_hp_param, lp.set_full_hp_param

    def get_full_hp_param(self, optim_state_key=None):
        if optim_state_key is None:
            return get_param()
        return _full_state(self, optim_state_key)

    def set_full_hp_param(self, value, optim_state_key=None):
        if optim_state_key is None:
            return set_param(value)
        raise NotImplementedError(_SET_STATE_MESSAGE)

    lp.get_full_hp_param = types.MethodType(get_full_hp_param, lp)
    lp.set_full_hp_param = types.MethodType(set_full_hp_param, lp)


_SET_STATE_MESSAGE = (
    "setting optimizer state through DeepSpeed's fragment API is not supported for dist8bit optimizers (their state "
    "is packed 8-bit codes and scales); read it with dist8bit.integrations.deepspeed.get_full_optimizer_state"
)


def _full_state(param: torch.Tensor, key: str) -> torch.Tensor:
    from deepspeed.accelerator import get_accelerator

    return segments.full_optimizer_state(param, key, torch.device(get_accelerator().current_device_name()))


def _zero3_get_full_hp_param(original: Callable) -> Callable:
    def patched(self, param, optim_state_key=None):
        if optim_state_key is None or not _ours(self.optimizer):
            return original(self, param, optim_state_key)
        if not param.requires_grad:
            return None
        return _full_state(param, optim_state_key)

    return patched


def _zero3_refuse_state_key(name: str) -> Callable[[Callable], Callable]:
    """ZeRO-3 accessors that would read or write one rank's raw state partition by key."""
    message = _SET_STATE_MESSAGE if name.startswith("set") else _LOCAL_STATE_MESSAGE

    def make(original: Callable) -> Callable:
        signature = inspect.signature(original)

        def patched(self, *args, **kwargs):
            key = signature.bind(self, *args, **kwargs).arguments.get("optim_state_key")
            if key is not None and _ours(self.optimizer):
                raise NotImplementedError(message)
            return original(self, *args, **kwargs)

        return patched

    return make


_LOCAL_STATE_MESSAGE = (
    "reading one rank's local optimizer-state partition by key is not supported for dist8bit optimizers (packed "
    "8-bit state); use dist8bit.integrations.deepspeed.get_full_optimizer_state"
)


# -------------------------------------------------------------- checkpoints
def _load_zero_checkpoint(original: Callable) -> Callable:
    def patched(self, load_dir, tag, load_optimizer_states=True):
        if _ours(_basic(self)):
            if self.load_universal_checkpoint():
                raise DeepSpeedCheckpointError(
                    "DeepSpeed universal checkpoints cannot hold dist8bit's packed 8-bit state (ds_to_universal reads "
                    "only exp_avg/exp_avg_sq). Load the ZeRO checkpoint directly, or convert it with "
                    + CONVERT_HINT.format(world=self.seq_dp_world_size)
                )
            saved = self.loaded_checkpoint_dp_world_size
            if load_optimizer_states and saved != self.seq_dp_world_size:
                raise DeepSpeedCheckpointError(
                    f"the checkpoint in {load_dir} (tag {tag}) was saved with data-parallel world size {saved}, this run "
                    f"has {self.seq_dp_world_size}. dist8bit's optimizer state is packed per ZeRO partition, so it "
                    f"cannot be re-partitioned on load; convert it first: "
                    + CONVERT_HINT.format(world=self.seq_dp_world_size)
                    + " (or load with load_optimizer_states=False to keep only the weights)"
                )
        return original(self, load_dir, tag, load_optimizer_states)

    return patched


def _load_legacy_checkpoint(original: Callable) -> Callable:
    def patched(self, state_dict_list, load_optimizer_states=True, load_from_fp32_weights=False):
        if _ours(self.optimizer) and load_optimizer_states:
            from deepspeed import comm as dist
            from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, PARAM_ALIGNMENT_PADDINGS

            saved = state_dict_list[dist.get_rank(group=self.dp_process_group)]
            if not isinstance(saved[BASE_OPTIMIZER_STATE], dict):
                raise DeepSpeedCheckpointError(
                    "this ZeRO checkpoint is elastic (saved with elastic_checkpoint=true or by another optimizer); "
                    "dist8bit optimizers load only the rigid ZeRO checkpoints they save"
                )
            if saved.get(PARAM_ALIGNMENT_PADDINGS) != self.round_robin_bit16_padding:
                raise DeepSpeedCheckpointError(
                    "the ZeRO checkpoint's parameter layout (alignment padding) differs from this run's; keep "
                    "zero_optimization.parameter_alignment and the DeepSpeed version used to save it"
                )
        return original(self, state_dict_list, load_optimizer_states, load_from_fp32_weights)

    return patched
