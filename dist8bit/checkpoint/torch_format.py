"""torch-convention optimizer state dicts: torch.optim and dist8bit 32-, 8- and 4-bit.

    {"state": {index: {"step": tensor, <name>: values}  or  {"step", <name>_codes, <name>_absmax}},
     "param_groups": [{hyper-parameters..., "params": [index, ...]}]}

dist8bit's 32-bit state uses torch's names, so one reader serves all of them;
quantized buffers are recognised by their `_codes` / `_absmax` pair (the block
size is the param group's `blocksize`). 8-bit codes are shaped like the
parameter; 4-bit codes are 1-D, ceil(numel / 2) packed bytes, in groups with
`optim_bits` 4 (without it, the sizes of codes and scales tell the two apart).
Packed codes do not say the parameter's shape: it comes from a full-precision
buffer of the same parameter, or from `shapes` (the caller's parameter shapes),
or from `param_names` in the group and a model state dict in the same
checkpoint; without any of these, 4-bit state is refused rather than guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..optim import state as state_layout
from ..optim.master_weights import ERROR_KEY
from ..quant.layout import DEFAULT_BLOCKSIZE, num_blocks
from . import optimizers, weight_errors
from .canonical import Buffer, Dense, OptimizerState, ParamState, Quantized
from .errors import CheckpointError

CODES, ABSMAX = state_layout.CODES_SUFFIX, state_layout.ABSMAX_SUFFIX


def is_optimizer_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("state"), dict) and isinstance(obj.get("param_groups"), list)


def is_quantized(sd: dict[str, Any]) -> bool:
    return any(isinstance(entry, dict) and any(str(k).endswith(CODES) for k in entry) for entry in sd["state"].values())


def format_name(sd: dict[str, Any]) -> str:
    if is_quantized(sd):
        bits = {int(g.get("optim_bits", 8)) for g in sd["param_groups"] if isinstance(g, dict)} - {32}
        return "dist8bit-" + "/".join(f"{b}bit" for b in sorted(bits or {8}, reverse=True))
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


def read(
    sd: dict[str, Any],
    kind: str | None,
    where: str,
    shapes: Mapping[Any, tuple[int, ...]] | None = None,
    drop_errors: bool = False,
) -> OptimizerState:
    """The canonical form of a torch-convention state dict; `shapes` (parameter key -> shape) is
    needed only for 4-bit state whose parameter shape nothing else in the checkpoint says. With
    `drop_errors` (the conversion drops weight_error) a weight_error tensor is taken unchecked, so a
    stale or cast one (torch.optim casts it to the parameter's dtype) does not stop the conversion."""
    group_of = check_groups(sd, where)
    known = set(optimizers.state_names())
    params: dict[Any, ParamState] = {}
    for key, entry in sd["state"].items():
        shape = (shapes or {}).get(key)
        params[key] = _read_param(entry, group_of[key], known, shape, f"{where}: parameter {key!r}", drop_errors)
    names = {name for p in params.values() for name in p.buffers}
    groups = [dict(g) for g in sd["param_groups"]]
    if kind is None:
        kind = optimizers.infer_kind(names, groups)
    else:
        for key, param in params.items():
            optimizers.check_buffers(kind, group_of[key], param.buffers, f"{where}: parameter {key!r}")
    return OptimizerState(format_name(sd), kind, groups, params)


def _read_param(
    entry: dict[str, Any],
    group: dict[str, Any],
    known: set[str],
    shape_hint: tuple[int, ...] | None,
    where: str,
    drop_errors: bool = False,
) -> ParamState:
    error_codes = entry.get(ERROR_KEY)
    checked = not drop_errors
    if error_codes is not None:
        if checked or not isinstance(error_codes, torch.Tensor):
            error_codes = weight_errors.check(error_codes, None, where, weight_errors.DROP_REMEDY)
        entry = {k: v for k, v in entry.items() if k != ERROR_KEY}
    pairs = _pairs(entry, where)
    buffers: dict[str, Buffer] = {
        name: Dense(value) for name, value in entry.items() if name in known and _is_float(value) and name not in pairs
    }
    shapes = {name: tuple(codes.shape) for name, (codes, _) in pairs.items() if _bits(group, codes, _[1]) == 8}
    shapes |= {name: tuple(b.values.shape) for name, b in buffers.items()}
    if len(set(shapes.values())) > 1:
        raise CheckpointError(f"{where}: state buffers disagree on the parameter's shape: {shapes}")
    shape = next(iter(shapes.values()), None)
    if shape_hint is not None:
        if shape is not None and tuple(shape_hint) != shape:
            precision = f" (is optim_bits={group.get('optim_bits')!r} the precision it was saved at?)" if pairs else ""
            raise CheckpointError(f"{where}: the state is shaped {shape} but the parameter is {tuple(shape_hint)}{precision}")
        shape = tuple(shape_hint)
    if shape is None and error_codes is not None and checked:
        shape = tuple(error_codes.shape)  # saved shaped like the parameter: what packed 4-bit codes do not say
    for base, (codes, absmax) in pairs.items():
        bits = _bits(group, codes, absmax)
        if bits == 4 and shape is None:
            raise CheckpointError(
                f"{where}: 4-bit state ({codes.numel()} packed bytes of {base}) does not say the parameter's shape; "
                "pass the parameter shapes (convert(..., shapes={index: shape})), or save the optimizer with "
                "param_names beside the model's state dict"
            )
        length = None if bits == 8 else int(torch.Size(shape).numel())
        try:
            buffer = Quantized(
                codes, absmax, int(group.get("blocksize", DEFAULT_BLOCKSIZE)), optimizers.state_map(base, bits, where), length
            )
            buffer.check(f"{where}: {base}")
        except ValueError as error:
            raise CheckpointError(f"{error} ({bits}-bit state: param group optim_bits={group.get('optim_bits')!r})") from None
        buffers[base] = buffer
    shape = shape if shape is not None else ()
    extras = {}
    for name, value in entry.items():
        if (
            name == "step"
            or name in buffers
            or (isinstance(name, str) and name.endswith((CODES, ABSMAX)) and _is_pair(name, buffers))
        ):
            continue
        if _is_float(value) and tuple(value.shape) == shape and shape:
            buffers[name] = Dense(value)  # state dist8bit has no quantized form for (amsgrad's max_exp_avg_sq, ...)
        else:
            extras[name] = value
    numel = int(torch.Size(shape).numel())
    if error_codes is not None and checked:
        weight_errors.check_dtype(error_codes.dtype, error_codes.numel(), numel, where, weight_errors.DROP_REMEDY)
    error = None if error_codes is None else Dense(error_codes)
    return ParamState(shape, scalar_step(entry.get("step"), where), buffers, extras, error)


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _pairs(entry: dict[str, Any], where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """State name -> (codes, absmax) for every quantized buffer of one parameter."""
    pairs = {}
    for name, value in entry.items():
        if isinstance(name, str) and name.endswith(CODES):
            base = name[: -len(CODES)]
            absmax = entry.get(base + ABSMAX)
            if not isinstance(value, torch.Tensor) or not isinstance(absmax, torch.Tensor):
                raise CheckpointError(f"{where}: {name} needs a tensor {base + ABSMAX} beside it (truncated state?)")
            pairs[base] = (value, absmax)
    return pairs


def _bits(group: dict[str, Any], codes: torch.Tensor, absmax: torch.Tensor) -> int:
    """8 or 4: the group's optim_bits when it says; else whichever precision the sizes fit
    (8-bit: one scale per blocksize codes; 4-bit: one per blocksize / 2 bytes)."""
    saved = group.get("optim_bits")
    if saved in (8, 4):
        return int(saved)
    blocksize = int(group.get("blocksize", DEFAULT_BLOCKSIZE))
    fits_8bit = num_blocks(codes.numel(), blocksize) == absmax.numel()
    fits_4bit = codes.dim() == 1 and absmax.numel() in {
        num_blocks(n, blocksize) for n in (2 * codes.numel() - 1, 2 * codes.numel())
    }
    return 4 if fits_4bit and not fits_8bit else 8


def _is_pair(name: str, buffers: dict[str, Buffer]) -> bool:
    base = name.removesuffix(CODES).removesuffix(ABSMAX)
    return isinstance(buffers.get(base), Quantized)
