"""bitsandbytes optimizer state dicts, 8-bit and 32-bit (read only: the migration path is into dist8bit).

bitsandbytes 0.45+ nests each parameter's tensors under
`__bnb_optimizer_quant_state__` (older releases keep them at the top):

    state1 / state2   uint8 codes shaped like the parameter (float32 for tensors
                      under min_8bit_size, or with optim_bits=32); AdEMAMix
                      stacks its two first moments in state1 as (2, *shape)
    absmax1 / absmax2 float32, one per block (256 elements in 0.44+, 2048 before)
    qmap1 / qmap2     the 256-value maps (bit-identical to dist8bit's dynamic maps;
                      one-state optimizers use the signed map even for the
                      non-negative RMSprop and Adagrad states)
    unorm_vec         LAMB / LARS scratch (the last update norm), recomputed every step
    step              a Python int

Param groups hold `lr, betas, eps, weight_decay` (two-state optimizers add
`alpha, t_alpha, t_beta3`); `betas` carries SGD's (momentum, dampening) and
RMSprop's (alpha, momentum). Nothing records the optimizer class: the caller
names the kind (`--optimizer`, or the class of the optimizer being loaded
into), and `candidate_kinds` says which kinds the dict's layout admits.
"""

from __future__ import annotations

from typing import Any

import torch

from ..quant.layout import SUPPORTED_BLOCKSIZES, num_blocks
from ..quant.maps import create_dynamic_map
from . import optimizers
from .canonical import Buffer, Dense, OptimizerState, ParamState, Quantized
from .errors import CheckpointError
from .torch_format import check_groups, scalar_step

NESTED = "__bnb_optimizer_quant_state__"
PREFERRED_BLOCKSIZES = (256, 2048)  # bitsandbytes' choices, tried before other powers of two
SUPPORTED_KINDS = ("adam", "adamw", "lamb", "ademamix", "lion", "sgd", "lars", "rmsprop", "adagrad")
# One-state kinds whose non-negative state bitsandbytes stores with the signed map.
SIGNED_MAP_KINDS = ("rmsprop", "adagrad")
SCRATCH = ("unorm_vec",)  # recomputed by every step: not state
# bitsandbytes' param group keys (one-state; two-state adds the AdEMAMix keys); a scheduler may add initial_lr.
GROUP_KEYS = frozenset({"lr", "betas", "eps", "weight_decay", "params"})
TWO_STATE_KEYS = frozenset({"alpha", "t_alpha", "t_beta3"})
# bitsandbytes' class names per dist8bit kind, for messages.
BNB_NAMES = {
    "adam": "Adam",
    "adamw": "AdamW",
    "lamb": "LAMB",
    "ademamix": "AdEMAMix",
    "lion": "Lion",
    "sgd": "SGD",
    "lars": "LARS",
    "rmsprop": "RMSprop",
    "adagrad": "Adagrad",
}


def is_bnb(sd: dict[str, Any]) -> bool:
    """bitsandbytes' per-parameter keys; before the first step (no state) its exact group keys."""
    if sd["state"]:
        return any(isinstance(e, dict) and (NESTED in e or "state1" in e) for e in sd["state"].values())
    groups = sd["param_groups"]
    return bool(groups) and all(
        isinstance(g, dict) and GROUP_KEYS <= set(g) <= GROUP_KEYS | TWO_STATE_KEYS | {"initial_lr"} for g in groups
    )


def candidate_kinds(sd: dict[str, Any]) -> tuple[str, ...]:
    """The kinds (SUPPORTED_KINDS order) whose state this bitsandbytes dict can be, from its layout alone.

    What tells them apart in bitsandbytes 0.50.2: two states (Adam, AdamW, LAMB: identical layouts;
    AdEMAMix: three betas) or one; the one-state classes pass eps=0 (SGD, LARS, Lion), betas=(0, 0)
    (Adagrad), momentum > 0 as betas[0] (SGD, LARS) and alpha > 0 as betas[0] (RMSprop); RMSprop and
    Adagrad states are never negative. SGD, LARS and Lion (and Adam, AdamW, LAMB) stay indistinguishable.
    """
    entries = [_raw(e) for e in sd["state"].values() if isinstance(e, dict)]
    groups = [g for g in sd["param_groups"] if isinstance(g, dict)]
    counts = {sum(f"state{i}" in e for i in (1, 2)) for e in entries}
    two_state = counts == {2} or (not entries and any(TWO_STATE_KEYS & set(g) for g in groups))
    if two_state:
        ademamix = any(len(tuple(g.get("betas", ()))) == 3 for g in groups)
        return ("ademamix",) if ademamix else ("adam", "adamw", "lamb")
    if counts not in ({1}, set()):
        return ()
    kinds = set(SUPPORTED_KINDS) - {"adam", "adamw", "lamb", "ademamix"}
    for group in groups:
        betas, eps = tuple(group.get("betas", (0.0, 0.0))), group.get("eps", 0.0)
        if eps != 0:
            kinds -= {"sgd", "lars", "lion"}
        if not betas or betas[0] <= 0:
            kinds -= {"sgd", "lars", "rmsprop"}
        if tuple(betas) != (0.0, 0.0):
            kinds.discard("adagrad")
    if kinds & {"sgd", "lars", "lion"} and kinds & set(SIGNED_MAP_KINDS) and _has_negative(entries):
        kinds -= set(SIGNED_MAP_KINDS)
    return tuple(k for k in SUPPORTED_KINDS if k in kinds)


def _raw(entry: dict[str, Any]) -> dict[str, Any]:
    """A parameter's entries with bitsandbytes' nested quantization state flattened in."""
    return {**{k: v for k, v in entry.items() if k != NESTED}, **entry.get(NESTED, {})}


def _has_negative(entries: list[dict[str, Any]]) -> bool:
    """Whether any state1 value is negative (8-bit: decoded through its own map); stops at the first."""
    for raw in entries:
        values = raw.get("state1")
        if not isinstance(values, torch.Tensor):
            continue
        if values.dtype == torch.uint8:
            qmap = raw.get("qmap1")
            if isinstance(qmap, torch.Tensor) and bool((qmap.float()[values.long()] < 0).any()):
                return True
        elif values.is_floating_point() and bool((values < 0).any()):
            return True
    return False


def describe(kinds: tuple[str, ...]) -> str:
    """'bitsandbytes' SGD, LARS or Lion' for messages."""
    names = [BNB_NAMES[k] for k in kinds]
    if not names:
        return "no bitsandbytes optimizer dist8bit knows"
    return "bitsandbytes' " + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1])


def translate_group(kind: str, group: dict[str, Any]) -> dict[str, Any]:
    """bitsandbytes' group keys -> the dist8bit/torch keys of `kind` (others, e.g. initial_lr, are kept)."""
    own = {"betas", "eps", "alpha", "t_alpha", "t_beta3", "weight_decay", "lr", "params"}
    kept = {k: v for k, v in group.items() if k not in own}
    betas = tuple(group.get("betas", (0.0, 0.0)))
    hyper: dict[str, Any] = {"lr": group["lr"], "weight_decay": group.get("weight_decay", 0.0)}
    if kind in ("adam", "adamw", "lamb"):
        hyper |= {"betas": betas[:2], "eps": group["eps"]}
    elif kind == "ademamix":
        hyper |= {
            "betas": betas,
            "eps": group["eps"],
            "alpha": group["alpha"],
            "t_alpha": group["t_alpha"],
            "t_beta3": group["t_beta3"],
        }
    elif kind == "lion":
        hyper |= {"betas": betas[:2]}
    elif kind in ("sgd", "lars"):  # bitsandbytes keeps the momentum in betas[0]; it has no dampening or nesterov
        hyper |= {"momentum": betas[0], "dampening": 0.0, "nesterov": False}
    elif kind == "rmsprop":  # alpha in betas[0]; bitsandbytes' RMSprop has no momentum or centered form
        hyper |= {"alpha": betas[0], "eps": group["eps"], "momentum": 0.0, "centered": False}
    elif kind == "adagrad":
        hyper |= {"eps": group["eps"], "lr_decay": 0.0, "initial_accumulator_value": 0.0}
    return {**hyper, **kept, "params": group["params"]}


def read(sd: dict[str, Any], kind: str | None, where: str) -> OptimizerState:
    if kind is None:
        fits = candidate_kinds(sd) or SUPPORTED_KINDS
        raise CheckpointError(
            f"{where}: bitsandbytes state dicts do not record the optimizer class; its layout fits {describe(fits)}: "
            f"pass --optimizer {' or --optimizer '.join(fits)}. Note bitsandbytes' Adam8bit applies decoupled "
            "weight decay, so its dist8bit equivalent is adamw"
        )
    if kind not in SUPPORTED_KINDS:
        raise CheckpointError(
            f"{where}: converting bitsandbytes {kind} states is not supported; supported: {', '.join(SUPPORTED_KINDS)}"
        )
    check_groups(sd, where)
    groups = [translate_group(kind, g) for g in sd["param_groups"]]
    group_of = {key: g for g in groups for key in g["params"]}
    params = {}
    for key, entry in sd["state"].items():
        params[key] = _read_param(entry, kind, group_of[key], f"{where}: parameter {key!r}")
    return OptimizerState("bitsandbytes-8bit", kind, groups, params)


def _read_param(entry: dict[str, Any], kind: str, group: dict[str, Any], where: str) -> ParamState:
    raw = _raw(entry)
    if "max1" in raw or "new_max1" in raw:
        raise CheckpointError(f"{where}: non-block-wise bitsandbytes states (max1/new_max1) are not supported; only block-wise")
    specs = optimizers.specs_for(kind, group)
    pieces = _pieces(raw, kind, where)
    if len(pieces) != len(specs):
        raise CheckpointError(
            f"{where}: the checkpoint holds {len(pieces)} state buffer(s) but --optimizer {kind} keeps "
            f"{len(specs)} ({', '.join(s.name for s in specs)}); is --optimizer right?"
        )
    buffers: dict[str, Buffer] = {}
    for spec, (values, absmax, qmap) in zip(specs, pieces, strict=True):
        label = f"{where}: {spec.name}"
        if values.dtype != torch.uint8:
            buffers[spec.name] = Dense(values)
            continue
        if absmax is None or qmap is None:
            raise CheckpointError(f"{label}: 8-bit codes without their absmax/qmap (truncated state?)")
        if torch.equal(qmap, create_dynamic_map(not spec.signed)) and not (kind in SIGNED_MAP_KINDS and not spec.signed):
            raise CheckpointError(
                f"{label}: the checkpoint's map is {'unsigned' if spec.signed else 'signed'}, but --optimizer {kind} keeps "
                f"a {'signed' if spec.signed else 'unsigned'} {spec.name}; is --optimizer right?"
            )
        buffers[spec.name] = Quantized(
            values, absmax.reshape(-1), _blocksize(values.numel(), absmax.numel(), label), qmap.float()
        )
    shapes = {tuple(b.codes.shape if isinstance(b, Quantized) else b.values.shape) for b in buffers.values()}
    if len(shapes) > 1:
        raise CheckpointError(f"{where}: state buffers disagree on the parameter's shape: {sorted(shapes)}")
    extras = {k: v for k, v in raw.items() if not k.startswith(("state", "absmax", "qmap")) and k not in ("step", *SCRATCH)}
    return ParamState(next(iter(shapes), ()), scalar_step(raw.get("step"), where), buffers, extras)


def _pieces(raw: dict[str, Any], kind: str, where: str) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    pieces = []
    for index in (1, 2):
        values = raw.get(f"state{index}")
        if values is None:
            continue
        if not isinstance(values, torch.Tensor):
            raise CheckpointError(f"{where}: state{index} is a {type(values).__name__}, not a tensor")
        absmax, qmap = raw.get(f"absmax{index}"), raw.get(f"qmap{index}")
        if kind == "ademamix" and index == 1:  # (2, *shape): the fast and the slow first moment
            if values.shape[0] != 2:
                raise CheckpointError(f"{where}: AdEMAMix state1 must stack two moments, got shape {tuple(values.shape)}")
            for half in (0, 1):
                pieces.append((values[half], None if absmax is None else absmax.reshape(2, -1)[half], qmap))
        else:
            pieces.append((values, absmax, qmap))
    return pieces


def _blocksize(numel: int, scales: int, where: str) -> int:
    """The block size that gives `scales` blocks for `numel` codes (bitsandbytes does not store it)."""
    candidates = [*PREFERRED_BLOCKSIZES, *(b for b in SUPPORTED_BLOCKSIZES if b not in PREFERRED_BLOCKSIZES)]
    for blocksize in candidates:
        if num_blocks(numel, blocksize) == scales:
            return blocksize
    raise CheckpointError(f"{where}: {numel} codes with {scales} absmax scales match no block size in {SUPPORTED_BLOCKSIZES}")
