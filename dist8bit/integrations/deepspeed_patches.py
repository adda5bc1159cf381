"""Class-level patches that teach DeepSpeed 0.19 about dist8bit optimizers.

Each patch wraps one DeepSpeed function, acts only when the optimizer involved is
a dist8bit one (or the config names one) and otherwise calls DeepSpeed's
original unchanged, so registering dist8bit never alters a run that does not
use it.

Wrappers take and forward `*args, **kwargs` and read the arguments they need by
name (patching.py); what they rely on is each function's signature, recorded
below next to its patch for the supported DeepSpeed (0.19.x). `apply()` compares
every recorded signature with the installed DeepSpeed's before patching anything
and refuses, naming each function that changed, rather than patch a function
whose arguments no longer mean what the wrapper expects. It is idempotent.

DeepSpeedEngine
  _is_supported_optimizer     config "type" names a dist8bit optimizer (or a bad one: clear error)
  _configure_basic_optimizer  builds it from "params" (unknown keys: clear error)
  is_zero_supported_optimizer (engine module) no zero_allow_untested_optimizer needed
  _do_optimizer_sanity_check  refuses configs whose checkpoints would corrupt packed state, ZeRO-3 NVMe/partial offload,
                              and master_weights modes the config leaves without effect (deepspeed_masters.py)
  _configure_optimizer        links whole parameters when ZeRO is off (fp32); lets a dist8bit client
                              optimizer through ZeRO-Offload's zero_force_ds_cpu_optimizer check
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
import types
from collections.abc import Iterator
from typing import Any

import torch

from ..optim import Optimizer8bit
from . import deepspeed_masters as masters
from . import deepspeed_segments as segments
from .deepspeed import TESTED_VERSION, DeepSpeedVersionError
from .deepspeed_config import check_params, resolve
from .patching import ORIGINAL, Call, Registry, wrap

CONVERT_HINT = "dist8bit convert <checkpoint dir> <output dir> --to 8bit --world-size {world}"


class DeepSpeedCheckpointError(RuntimeError):
    """A DeepSpeed checkpoint cannot be loaded into (or saved from) a dist8bit optimizer as asked."""


class DeepSpeedSignatureError(DeepSpeedVersionError):
    """A DeepSpeed function that dist8bit patches (or calls) does not have the signature recorded for it."""


PATCHES = Registry(
    "deepspeed", "0.19.x", DeepSpeedSignatureError, f"Install a supported DeepSpeed: pip install deepspeed=={TESTED_VERSION}."
)
patch = PATCHES.patch


def missing_targets() -> list[str]:
    """DeepSpeed functions the patches need but the installed version lacks."""
    return PATCHES.missing()


def signature_mismatches() -> list[str]:
    """One line per patched (or called) DeepSpeed function whose signature differs from the recorded one."""
    return PATCHES.mismatches()


def apply() -> None:
    """Check every recorded signature, then install every patch (once). Patches nothing on a mismatch."""
    PATCHES.apply()


def is_applied() -> bool:
    from deepspeed.runtime import engine

    return getattr(engine.DeepSpeedEngine._configure_basic_optimizer, ORIGINAL, None) is not None


def _ours(optimizer: Any) -> bool:
    return isinstance(optimizer, Optimizer8bit)


def _basic(engine: Any) -> Any:
    return getattr(engine, "basic_optimizer", None)


# ------------------------------------------------------------------- config
ENGINE = "runtime.engine:DeepSpeedEngine."


@patch(ENGINE + "_is_supported_optimizer", signature="(self, optimizer_name)")
def _is_supported_optimizer(call: Call) -> Any:
    engine = call["self"]
    if resolve(call["optimizer_name"], lambda name: call.original(engine, name)) is not None:
        return True
    return call.proceed()


@patch(ENGINE + "_configure_basic_optimizer", signature="(self, model_parameters)")
def _configure_basic_optimizer(call: Call) -> Any:
    engine = call["self"]
    cls = resolve(engine.optimizer_name(), lambda name: original_supported(engine, name))
    if cls is None:
        return call.proceed()
    return cls(call["model_parameters"], **check_params(cls, engine.optimizer_params() or {}))


def original_supported(engine: Any, name: str) -> bool:
    method = type(engine)._is_supported_optimizer
    return getattr(method, ORIGINAL, method)(engine, name)


@patch("runtime.engine:is_zero_supported_optimizer", signature="(optimizer)")
def _is_zero_supported_optimizer(call: Call) -> Any:
    return _ours(call["optimizer"]) or call.proceed()


@patch(ENGINE + "_do_optimizer_sanity_check", signature="(self, basic_optimizer)")
def _do_optimizer_sanity_check(call: Call) -> Any:
    engine = call["self"]
    if _ours(call["basic_optimizer"]) and engine.zero_optimization():
        if engine.zero_optimization_stage() in (1, 2) and engine.zero_elastic_checkpoint():
            raise DeepSpeedCheckpointError(
                "zero_optimization.elastic_checkpoint=true cannot be used with dist8bit optimizers: elastic "
                "checkpoints cut and re-pad every state tensor by the partition padding, which corrupts packed "
                "8-bit state. Set it to false; to resume on another world size convert the checkpoint with "
                + CONVERT_HINT.format(world="M")
            )
        if engine.zenflow or engine.super_offload():
            raise NotImplementedError("ZenFlow and SuperOffload run their own CPU optimizers; use them without dist8bit")
        offload = engine.zero_offload_optimizer()
        if engine.zero_optimization_stage() == 3 and offload is not None and (offload.device == "nvme" or offload.ratio < 1):
            # Refused here, from the config: DeepSpeed's own ZeRO-3 set-up fails first, and less clearly, on both.
            raise segments.DeepSpeedLayoutError(segments.OFFLOAD_MESSAGE)
    kind = call.proceed()
    if _ours(call["basic_optimizer"]):
        _check_master_weights(engine, call["basic_optimizer"], kind)
    return kind


# Engine settings _check_master_weights reads.
for _name in (
    "bfloat16_enabled",
    "fp16_enabled",
    "bf16_master_weights_and_gradients",
    "fp16_master_weights_and_gradients",
    "bf16_optimizer_states",
    "zero_offload_optimizer",
    "zero_optimization_stage",
):
    PATCHES.record(ENGINE + _name, "(self)")


def _check_master_weights(engine: Any, optimizer: Optimizer8bit, kind: str | None) -> None:
    """Refuse a master_weights mode that cannot act under this config (see deepspeed_masters.py), before
    DeepSpeed allocates its partitions. `kind` is DeepSpeed's choice of optimizer wrapper."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if engine.bfloat16_enabled():
        weights = torch.bfloat16
    elif engine.fp16_enabled():
        weights = torch.float16
    else:  # no mixed precision: the model's own dtype (a bf16 model may be trained as is)
        weights = next((p.dtype for p in params if p.dtype != torch.float32), torch.float32)
    bf16_master = bool(engine.bf16_master_weights_and_gradients())
    offload = engine.zero_offload_optimizer()
    setup = masters.Setup(
        weights=weights,
        master=masters.master_dtype(kind, bf16_master, bool(engine.fp16_master_weights_and_gradients())),
        wrapper=masters.describe(kind, engine.zero_optimization_stage()),
        bf16_master=bf16_master,
        bf16_optimizer_states=bool(engine.bf16_optimizer_states()),
        offload=offload is not None and offload.device in ("cpu", "nvme"),
    )
    masters.check((group["master_weights"] for group in optimizer.param_groups), setup)


# --------------------------------------------------------- partitions -> segments
@patch(ENGINE + "_configure_optimizer", signature="(self, client_optimizer, model_parameters)")
def _configure_optimizer(call: Call) -> Any:
    engine = call["self"]
    with _host_step_allowed(engine, call["client_optimizer"]):
        result = call.proceed()
    basic = _basic(engine)
    if _ours(basic) and engine.optimizer is basic:
        for index, group in enumerate(basic.param_groups):
            segments.link_whole(basic, group["params"], group["params"], index)
    return result


# Read by _configure_optimizer's ZeRO-Offload check; shadowed per engine by _host_step_allowed.
PATCHES.record(ENGINE + "zero_force_ds_cpu_optimizer", "(self)")


@contextlib.contextmanager
def _host_step_allowed(engine: Any, client_optimizer: Any) -> Iterator[None]:
    """Let a dist8bit optimizer object (or class) passed to deepspeed.initialize run under ZeRO-Offload.

    DeepSpeed refuses a client optimizer other than DeepSpeedCPUAdam / DeepSpeedCPULion under
    ZeRO-Offload unless the config sets zero_force_ds_cpu_optimizer=false, because a generic
    optimizer steps slowly on the host. A dist8bit optimizer steps the host partitions with its
    fused CPU kernel, so the guard does not apply: while the optimizer is configured, this
    engine's zero_force_ds_cpu_optimizer() answers False. (An optimizer named in the config
    never meets that check.)
    """
    ours = _ours(client_optimizer) or (isinstance(client_optimizer, type) and issubclass(client_optimizer, Optimizer8bit))
    if not ours:
        yield
        return
    with _shadowed(engine, "zero_force_ds_cpu_optimizer", lambda: False):
        yield


@patch(ENGINE + "_configure_fp16_optimizer", signature="(self, optimizer, low_precision_dtype)")
def _configure_fp16_optimizer(call: Call) -> Any:
    optimizer = call["optimizer"]
    if not _ours(optimizer):
        return call.proceed()
    # FP16_UnfusedOptimizer steps the optimizer once with zero gradients while
    # it is built, to create state. For dist8bit that step would create the
    # state before the fp32 copies carry their parameters' overrides, count a
    # step and apply weight decay; state is created by the first real step.
    with _shadowed(optimizer, "step", types.MethodType(lambda self, closure=None: None, optimizer)):
        wrapper = call.proceed()
    if not (hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_groups")):
        raise segments.DeepSpeedLayoutError(f"unexpected DeepSpeed mixed-precision optimizer {type(wrapper).__name__}")
    for index, (params, copies) in enumerate(zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True)):
        segments.carry_overrides(params, copies)
        segments.link_whole(optimizer, params, copies, index)
    return wrapper


@contextlib.contextmanager
def _shadowed(instance: Any, name: str, value: Any) -> Iterator[None]:
    """Shadow a class attribute on one instance for the duration; the class (and other instances) keep theirs."""
    setattr(instance, name, value)
    try:
        yield
    finally:
        delattr(instance, name)


@patch(ENGINE + "_configure_zero_optimizer", signature="(self, optimizer)")
def _configure_zero_optimizer(call: Call) -> Any:
    zero, optimizer = call.proceed(), call["optimizer"]
    if not _ours(optimizer):
        return zero
    if hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO 1/2
        segments.attach_flat_groups(
            optimizer, zero.single_partition_of_fp32_groups, zero.bit16_groups, zero.real_dp_process_group
        )
    elif hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
        segments.attach_zero3(optimizer, zero)
    else:
        raise segments.DeepSpeedLayoutError(f"unexpected DeepSpeed ZeRO optimizer {type(zero).__name__}")
    return zero


@patch(ENGINE + "_configure_bf16_optimizer", signature="(self, optimizer)")
def _configure_bf16_optimizer(call: Call) -> Any:
    wrapper, optimizer = call.proceed(), call["optimizer"]
    if _ours(optimizer):
        groups = wrapper.fp32_groups_flat_partition, wrapper.bf16_groups, wrapper.real_dp_process_group
        segments.attach_flat_groups(optimizer, *groups)
    return wrapper


# ------------------------------------------------------------- fragment API
@patch(
    "runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer._link_all_hp_params",
    "runtime.bf16_optimizer:BF16_Optimizer._link_all_hp_params",
    signature="(self)",
)
def _link_all_hp_params(call: Call) -> Any:
    result = call.proceed()
    zero = call["self"]
    if _ours(zero.optimizer):
        groups = getattr(zero, "bit16_groups", None) or zero.bf16_groups
        for lp in (p for group in groups for p in group):
            _route_fragment_api(lp)
    return result


# DeepSpeed's per-parameter fragment methods (what `safe_get_full_optimizer_state` calls), which
# link_hp_params binds to each parameter: called through the wrappers below, not patched.
PATCHES.record("utils.tensor_fragment:get_full_hp_param", "(self, optim_state_key=None)")
PATCHES.record("utils.tensor_fragment:set_full_hp_param", "(self, value, optim_state_key=None)")


def _route_fragment_api(lp: torch.Tensor) -> None:
    """Reading state through `lp`'s fragment methods reads dist8bit's; writing packed 8-bit state is refused."""
    if getattr(lp.get_full_hp_param, ORIGINAL, None) is None:
        lp.get_full_hp_param = wrap(lp.get_full_hp_param, functools.partial(_fragment_get, lp))
        lp.set_full_hp_param = wrap(lp.set_full_hp_param, _fragment_set)


def _fragment_get(lp: torch.Tensor, call: Call) -> Any:
    key = call["optim_state_key"]
    return call.proceed() if key is None else _full_state(lp, key)


def _fragment_set(call: Call) -> Any:
    if call["optim_state_key"] is None:
        return call.proceed()
    raise NotImplementedError(_SET_STATE_MESSAGE)


_SET_STATE_MESSAGE = (
    "setting optimizer state through DeepSpeed's fragment API is not supported for dist8bit optimizers (their state "
    "is packed 8-bit codes and scales); read it with dist8bit.integrations.deepspeed.get_full_optimizer_state"
)
_LOCAL_STATE_MESSAGE = (
    "reading one rank's local optimizer-state partition by key is not supported for dist8bit optimizers (packed "
    "8-bit state); use dist8bit.integrations.deepspeed.get_full_optimizer_state"
)


def _full_state(param: torch.Tensor, key: str) -> torch.Tensor:
    from deepspeed.accelerator import get_accelerator

    return segments.full_optimizer_state(param, key, torch.device(get_accelerator().current_device_name()))


ZERO3 = "runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3."


@patch(ZERO3 + "get_full_hp_param", signature="(self, param, optim_state_key=None)")
def _zero3_get_full_hp_param(call: Call) -> Any:
    param, key = call["param"], call["optim_state_key"]
    if key is None or not _ours(call["self"].optimizer):
        return call.proceed()
    return _full_state(param, key) if param.requires_grad else None


@patch(ZERO3 + "get_local_fp32_param", signature="(self, param, optim_state_key=None)")
def _zero3_refuse_local_state(call: Call) -> Any:
    """ZeRO-3 accessors that would read (or write) one rank's raw state partition by key."""
    if call["optim_state_key"] is not None and _ours(call["self"].optimizer):
        raise NotImplementedError(_LOCAL_STATE_MESSAGE)
    return call.proceed()


@patch(ZERO3 + "set_full_hp_param", ZERO3 + "set_local_hp_param", signature="(self, value, param, optim_state_key=None)")
def _zero3_refuse_set_state(call: Call) -> Any:
    if call["optim_state_key"] is not None and _ours(call["self"].optimizer):
        raise NotImplementedError(_SET_STATE_MESSAGE)
    return call.proceed()


# -------------------------------------------------------------- checkpoints
@patch(ENGINE + "_load_zero_checkpoint", signature="(self, load_dir, tag, load_optimizer_states=True)")
def _load_zero_checkpoint(call: Call) -> Any:
    engine = call["self"]
    if not _ours(_basic(engine)):
        return call.proceed()
    world = engine.seq_dp_world_size
    if engine.load_universal_checkpoint():
        raise DeepSpeedCheckpointError(
            "DeepSpeed universal checkpoints (checkpoint.load_universal=true) cannot hold dist8bit's packed 8-bit state "
            "(ds_to_universal reads only exp_avg/exp_avg_sq). Set load_universal to false and load the ZeRO checkpoint "
            "directly, or convert it with " + CONVERT_HINT.format(world=world)
        )
    saved = engine.loaded_checkpoint_dp_world_size
    if call["load_optimizer_states"] and saved != world:
        raise DeepSpeedCheckpointError(
            f"the checkpoint in {call['load_dir']} (tag {call['tag']}) was saved with data-parallel world size {saved}, "
            f"this run has {world}. dist8bit's optimizer state is packed per ZeRO partition, so it cannot be "
            f"re-partitioned on load; convert it first: "
            + CONVERT_HINT.format(world=world)
            + " (or load with load_optimizer_states=False to keep only the weights)"
        )
    return call.proceed()


@patch(
    "runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer._load_legacy_checkpoint",
    signature="(self, state_dict_list, load_optimizer_states=True, load_from_fp32_weights=False)",
)
def _load_legacy_checkpoint(call: Call) -> Any:
    zero = call["self"]
    if _ours(zero.optimizer) and call["load_optimizer_states"]:
        from deepspeed import comm as dist
        from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, PARAM_ALIGNMENT_PADDINGS

        saved = call["state_dict_list"][dist.get_rank(group=zero.dp_process_group)]
        if not isinstance(saved[BASE_OPTIMIZER_STATE], dict):
            raise DeepSpeedCheckpointError(
                "this ZeRO checkpoint is elastic (saved with elastic_checkpoint=true or by another optimizer); "
                "dist8bit optimizers load only the rigid ZeRO checkpoints they save"
            )
        if saved.get(PARAM_ALIGNMENT_PADDINGS) != zero.round_robin_bit16_padding:
            raise DeepSpeedCheckpointError(
                "the ZeRO checkpoint's parameter layout (alignment padding) differs from this run's; keep "
                "zero_optimization.parameter_alignment and the DeepSpeed version used to save it"
            )
    return call.proceed()
