"""A bitsandbytes optimizer state dict, converted in memory for a dist8bit optimizer's load_state_dict.

The conversion is `dist8bit convert`'s own: bnb_format reads the dict into
the canonical form, plan.py plans the target layout and in_memory.py runs the
plan's jobs into tensors. What the offline command takes as options comes
from the optimizer being loaded into: the kind from its class, each
parameter's precision and each group's block size from its settings, so the
result is exactly the dist8bit state dict that optimizer would load.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..optim import GlobalOptimManager, Optimizer8bit, sharded
from . import bnb_format, optimizers
from .in_memory import materialize
from .plan import PRECISION_NAMES, Target, plan_optimizer

WHERE = "bitsandbytes state dict"


def is_bitsandbytes(state_dict: dict[str, Any]) -> bool:
    return (
        isinstance(state_dict.get("state"), dict)
        and isinstance(state_dict.get("param_groups"), list)
        and (bnb_format.is_bnb(state_dict))
    )


def target_kind(optimizer: Optimizer8bit) -> str | None:
    """The optimizer kind of this class: the nearest of dist8bit's optimizer classes it derives from
    (the compat classes derive from them too: bitsandbytes' Adam and LAMB from AdamW, LARS from SGD)."""
    kinds = {cls: kind for kind, cls in optimizers.KINDS.items()}
    return next((kinds[cls] for cls in type(optimizer).__mro__ if cls in kinds), None)


def to_dist8bit(optimizer: Optimizer8bit, state_dict: dict[str, Any]) -> dict[str, Any]:
    """`state_dict` (bitsandbytes') as the dist8bit state dict `optimizer` loads."""
    name = type(optimizer).__name__
    kind = target_kind(optimizer)
    fits = bnb_format.candidate_kinds(state_dict)
    if kind not in fits:
        raise ValueError(_mismatch(optimizer, kind, fits))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(sharded.is_dtensor(p) or p in optimizer._segments for p in params):
        raise ValueError(
            f"{name} holds sharded parameters (FSDP2 DTensors or ZeRO partitions); a bitsandbytes state dict "
            "loads into an optimizer over whole parameters: load it there, save, and reshard as usual"
        )
    state = bnb_format.read(state_dict, kind, WHERE)
    overrides = GlobalOptimManager.get_instance().overrides()
    quantized, bits = set(), 32
    for saved, current, group in zip(state_dict["param_groups"], optimizer.param_groups, state.param_groups, strict=False):
        group["blocksize"] = current["blocksize"]
        group["optim_bits"] = current["optim_bits"]  # the blocksize above is this precision's
        for key, param in zip(saved["params"], current["params"], strict=False):
            param_bits = optimizer.state_bits(param, optimizer.resolved_config(param, current, overrides))
            if param_bits < 32:
                quantized.add(key)
                bits = param_bits
    if kind == "adam" and any(g.get("weight_decay", 0) for g in state.param_groups):
        warnings.warn(
            f"{name} applies L2 weight decay (torch.optim.Adam); bitsandbytes' Adam and AdamW decay decoupled. "
            "The states load unchanged, but to continue the same training use AdamW (or "
            "dist8bit.compat.bitsandbytes.optim.Adam)",
            UserWarning,
            stacklevel=3,
        )
    target = Target(PRECISION_NAMES[bits], quantized_keys=frozenset(quantized))
    return materialize(plan_optimizer(state, target, WHERE))


def _mismatch(optimizer: Optimizer8bit, kind: str | None, fits: tuple[str, ...]) -> str:
    name = type(optimizer).__name__
    to = PRECISION_NAMES[optimizer.defaults["optim_bits"]]
    found = f"this bitsandbytes state dict's layout fits {bnb_format.describe(fits)}"
    offline = f"dist8bit convert SRC DST --to {to} --optimizer KIND (KIND: {', '.join(fits or bnb_format.SUPPORTED_KINDS)})"
    if kind is None:
        return (
            f"{name} derives from none of dist8bit's optimizer kinds, so the kind of a bitsandbytes state dict "
            f"cannot be told from it; {found}. Convert it offline with the kind named and load the result: {offline}"
        )
    keeps = ", ".join(spec.name for spec in optimizers.specs_for(kind, optimizer.param_groups[0]))
    if not fits:
        return f"{name} cannot load it: {found} (mixed one- and two-state parameters?)"
    return (
        f"{name} cannot load it: {found}, but {name} keeps the state of {kind} ({keeps}). Load it into the "
        f"matching dist8bit optimizer ({', '.join(fits)}), or convert it offline with the kind named: {offline}"
    )
