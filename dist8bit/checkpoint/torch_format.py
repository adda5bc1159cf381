"""torch-convention optimizer state dicts: torch.optim, dist8bit 32-bit and dist8bit 8-bit.

    {"state": {index: {"step": tensor, <name>: values}  or  {"step", <name>_codes, <name>_absmax}},
     "param_groups": [{hyper-parameters..., "params": [index, ...]}]}

dist8bit's 32-bit state uses torch's names, so one reader serves all three;
8-bit buffers are recognised by their `_codes` / `_absmax` pair (the block
size is the param group's `blocksize`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..optim import state as state_layout
from ..quant.layout import DEFAULT_BLOCKSIZE
from ..quant.maps import create_dynamic_map
from . import optimizers
from .canonical import Buffer, Dense, OptimizerState, ParamState, Quantized
from .errors import CheckpointError

CODES, ABSMAX = state_layout.CODES_SUFFIX, state_layout.ABSMAX_SUFFIX


def is_optimizer_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("state"), dict) and isinstance(obj.get("param_groups"), list)


def is_eight_bit(sd: dict[str, Any]) -> bool:
    return any(isinstance(entry, dict) and any(str(k).endswith(CODES) for k in entry) for entry in sd["state"].values())


def format_name(sd: dict[str, Any]) -> str:
    if is_eight_bit(sd):
        return "dist8bit-8bit"
    if any("dist8bit_state_version" in g for g in sd["param_groups"]):
        return "dist8bit-32bit"
    return "torch"


def scalar_step(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise CheckpointError(f"{where}: 'step' must be a scalar, got shape {tuple(value.shape)}")
        return float(value.reshape(-1)[0])
    if isinstance(value, (int, float)):
        return float(value)
    raise CheckpointError(f"{where}: 'step' must be a number or scalar tensor, got {type(value).__name__}")


def check_groups(sd: dict[str, Any], where: str) -> dict[Any, dict[str, Any]]:
    """Param index -> its group; every state entry must belong to one group."""
    group_of: dict[Any, dict[str, Any]] = {}
    for index, group in enumerate(sd["param_groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise CheckpointError(f"{where}: param group {index} is not a dict with a 'params' list")
        for key in group["params"]:
            if key in group_of:
                raise CheckpointError(f"{where}: parameter {key!r} is listed in two param groups")
            group_of[key] = group
    for key, entry in sd["state"].items():
        if key not in group_of:
            raise CheckpointError(f"{where}: the state holds parameter {key!r}, which no param group lists")
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: the state of parameter {key!r} is a {type(entry).__name__}, not a dict")
    return group_of


def read(sd: dict[str, Any], kind: str | None, where: str) -> OptimizerState:
    group_of = check_groups(sd, where)
    known = set(optimizers.state_names())
    params: dict[Any, ParamState] = {}
    for key, entry in sd["state"].items():
        params[key] = _read_param(entry, group_of[key], known, f"{where}: parameter {key!r}")
    names = {name for p in params.values() for name in p.buffers}
    groups = [dict(g) for g in sd["param_groups"]]
    if kind is None:
        kind = optimizers.infer_kind(names, groups)
    else:
        for key, param in params.items():
            optimizers.check_buffers(kind, group_of[key], param.buffers, f"{where}: parameter {key!r}")
    return OptimizerState(format_name(sd), kind, groups, params)


def _read_param(entry: dict[str, Any], group: dict[str, Any], known: set[str], where: str) -> ParamState:
    buffers: dict[str, Buffer] = {}
    for name, value in entry.items():
        if isinstance(name, str) and name.endswith(CODES):
            base = name[: -len(CODES)]
            absmax = entry.get(base + ABSMAX)
            if not isinstance(value, torch.Tensor) or not isinstance(absmax, torch.Tensor):
                raise CheckpointError(f"{where}: {name} needs a tensor {base + ABSMAX} beside it (truncated state?)")
            blocksize = group.get("blocksize", DEFAULT_BLOCKSIZE)
            buffer = Quantized(value, absmax, blocksize, create_dynamic_map(optimizers.spec_of(base, where).signed))
            try:
                buffer.check(f"{where}: {base}")
            except ValueError as error:
                raise CheckpointError(str(error)) from None
            buffers[base] = buffer
        elif name in known and isinstance(value, torch.Tensor) and value.is_floating_point():
            buffers[name] = Dense(value)
    shapes = {name: tuple(b.codes.shape if isinstance(b, Quantized) else b.values.shape) for name, b in buffers.items()}
    if len(set(shapes.values())) > 1:
        raise CheckpointError(f"{where}: state buffers disagree on the parameter's shape: {shapes}")
    shape = next(iter(shapes.values()), ())
    extras = {}
    for name, value in entry.items():
        if (
            name == "step"
            or name in buffers
            or (isinstance(name, str) and name.endswith((CODES, ABSMAX)) and _is_pair(name, buffers))
        ):
            continue
        if isinstance(value, torch.Tensor) and value.is_floating_point() and tuple(value.shape) == shape and shape:
            buffers[name] = Dense(value)  # state dist8bit has no 8-bit form for (amsgrad's max_exp_avg_sq, ...)
        else:
            extras[name] = value
    return ParamState(shape, scalar_step(entry.get("step"), where), buffers, extras)


def _is_pair(name: str, buffers: dict[str, Buffer]) -> bool:
    base = name.removesuffix(CODES).removesuffix(ABSMAX)
    return isinstance(buffers.get(base), Quantized)
