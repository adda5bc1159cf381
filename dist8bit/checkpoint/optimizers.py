"""What each optimizer keeps as state, taken from dist8bit's optimizer classes.

The converters need two facts per state buffer: its torch name and whether its
map is signed (first moments) or unsigned (second moments, sums). Both come
from the `StateSpec`s the optimizer classes themselves use, and `state_map`
gives the map the optimizer quantizes that buffer with at 8 or 4 bits, so a
conversion quantizes exactly as the optimizer's own step would.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from functools import cache
from typing import Any

import torch

from .. import optim
from ..backends.rules import StateSpec
from ..optim import state as state_layout
from ..optim.optimizer import TORCH_ONLY_FLAGS
from .errors import CheckpointError

KINDS: dict[str, type[optim.Optimizer8bit]] = {
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "sgd": optim.SGD,
    "rmsprop": optim.RMSprop,
    "adagrad": optim.Adagrad,
    "lion": optim.Lion,
    "lamb": optim.LAMB,
    "lars": optim.LARS,
    "ademamix": optim.AdEMAMix,
}


@cache
def _instance(kind: str) -> optim.Optimizer8bit:
    """An uninitialised optimizer of this kind, to ask for its specs and implied flags.

    state_specs and implied_torch_flags read only the config and class attributes;
    skipping __init__ avoids torch.optim's one-off import of torch._dynamo (~1.3 s).
    """
    return KINDS[kind].__new__(KINDS[kind])


@cache
def _hyper_defaults(kind: str) -> dict[str, Any]:
    signature = inspect.signature(KINDS[kind].__init__)
    return {name: p.default for name, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}


def check_kind(kind: str | None) -> str | None:
    if kind is None:
        return None
    name = kind.lower().removesuffix("8bit").removesuffix("4bit").removesuffix("32bit")
    if name not in KINDS:
        raise CheckpointError(f"--optimizer {kind!r} is not known; choose one of {', '.join(KINDS)}")
    return name


def specs_for(kind: str, group: dict[str, Any]) -> tuple[StateSpec, ...]:
    """The state buffers `kind` keeps for a parameter of this group."""
    return _instance(kind).state_specs({**_hyper_defaults(kind), **group})


@cache
def _signedness() -> dict[str, bool]:
    """Torch state name -> signed map, over every dist8bit optimizer (the names agree)."""
    table: dict[str, bool] = {}
    for kind in KINDS:
        for group in ({}, {"momentum": 0.9}):
            for spec in specs_for(kind, group):
                table[spec.name] = spec.signed
    return table


def state_names() -> tuple[str, ...]:
    """Every state buffer name some dist8bit optimizer keeps."""
    return tuple(_signedness())


def spec_of(name: str, where: str) -> StateSpec:
    signed = _signedness().get(name)
    if signed is None:
        raise CheckpointError(
            f"{where}: state {name!r} has no 8-bit form in dist8bit (it quantizes {', '.join(sorted(_signedness()))}); "
            "convert this checkpoint with --to fp32 only, or train with an optimizer dist8bit implements"
        )
    return StateSpec(name, signed)


def state_map(name: str, bits: int, where: str) -> torch.Tensor:
    """The map state `name` is quantized with at `bits` (8 or 4), as the optimizers quantize it."""
    return state_layout.state_map(spec_of(name, where).signed, bits)


def infer_kind(state_names: Iterable[str], groups: list[dict[str, Any]]) -> str | None:
    """Best guess of the optimizer from torch-named state and group keys (None when ambiguous)."""
    names = set(state_names)
    keys = set().union(*(g.keys() for g in groups)) if groups else set()
    if names == {"exp_avg", "exp_avg_sq"} or (not names and "betas" in keys and "eps" in keys and "alpha" not in keys):
        if "adam_w_mode" in keys:
            return "lamb"
        flags = {g.get("decoupled_weight_decay") for g in groups}
        if flags == {True}:
            return "adamw"
        if flags == {False}:
            return "adam"
        return None
    if names == {"exp_avg", "exp_avg_slow", "exp_avg_sq"} or "t_beta3" in keys:
        return "ademamix"
    if "trust_coefficient" in keys:
        return "lars"
    if "nesterov" in keys and "dampening" in keys:
        return "sgd"
    if "centered" in keys or "square_avg" in names:
        return "rmsprop"
    if "lr_decay" in keys or names == {"sum"}:
        return "adagrad"
    if names == {"exp_avg"}:
        return "lion"
    return None


def check_buffers(kind: str, group: dict[str, Any], names: Iterable[str], where: str) -> None:
    """The state a checkpoint holds must be what `kind` keeps (catches a wrong --optimizer)."""
    expected = [spec.name for spec in specs_for(kind, group)]
    found = sorted(names)
    if found != sorted(expected):
        raise CheckpointError(
            f"{where}: the checkpoint holds state {found} but --optimizer {kind} keeps {sorted(expected)}; "
            "is --optimizer right for this checkpoint?"
        )


def check_torch_flags(kind: str | None, groups: list[dict[str, Any]], where: str) -> None:
    """Refuse now what dist8bit's load_state_dict would refuse later (amsgrad, maximize, ...)."""
    # Without a known kind, a flag some dist8bit optimizer implies (AdamW's
    # decoupled_weight_decay) is left for load_state_dict to judge.
    implied = _instance(kind).implied_torch_flags() if kind else {}
    open_flags = set() if kind else {f for k in KINDS for f in _instance(k).implied_torch_flags()}
    for index, group in enumerate(groups):
        for flag in TORCH_ONLY_FLAGS:
            value = group.get(flag)
            if flag in open_flags or (kind and flag in _hyper_defaults(kind)):  # the optimizer's own setting (LAMB)
                continue
            if flag in implied:
                if value is not None and value != implied[flag]:
                    raise CheckpointError(
                        f"{where}: param group {index} has {flag}={value!r} but --optimizer {kind} implies {implied[flag]!r}"
                    )
            elif value not in (None, False):
                raise CheckpointError(
                    f"{where}: param group {index} has {flag}={value!r}, which dist8bit optimizers do not implement; "
                    "its 8-bit form could not be resumed"
                )
