"""Which dist8bit optimizer a DeepSpeed config's `"optimizer": {"type": ...}` names, and its arguments.

Kept free of DeepSpeed imports so the rules can be tested (and read) alone.

Names dist8bit claims, case-insensitively:
- every dist8bit optimizer whose name DeepSpeed does not resolve itself
  (`Adam8bit`, `AdamW4bit`, `AdamW32bit`, `Lion8bit`, `AdEMAMix8bit`,
  `PagedAdamW8bit`, `LARS`, `AdEMAMix`, ...);
- `dist8bit.<Name>` for any dist8bit optimizer, including the names DeepSpeed
  or torch.optim already use (`dist8bit.AdamW`, `dist8bit.LAMB`).
A plain `Adam`, `AdamW`, `Lion`, `LAMB`, `SGD`, ... stays DeepSpeed's (or
torch's): registering dist8bit must never change what an existing config does.
A name that looks like ours but is not (`AdamW8bitt`: anything containing 8bit,
4bit or 32bit, starting with Paged or with `dist8bit.`) is an error that lists the
known names, instead of DeepSpeed's generic "not a supported DeepSpeed Optimizer".
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import optim

PREFIX = "dist8bit."
FIXED_BY_NAME = (("8bit", "optim_bits"), ("4bit", "optim_bits"), ("32bit", "optim_bits"))
# Name parts that make a type name dist8bit's (the precision suffixes of FIXED_BY_NAME).
PRECISION_SUFFIXES = tuple(suffix for suffix, _ in FIXED_BY_NAME)
INTERNAL_ARGUMENTS = {"self", "params", "defaults", "args"}


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config names a dist8bit optimizer wrongly (name or arguments)."""


def optimizer_classes() -> dict[str, type]:
    """Every dist8bit optimizer class exported by dist8bit.optim, by name."""
    classes = {}
    for name in optim.__all__:
        value = getattr(optim, name)
        if isinstance(value, type) and issubclass(value, optim.Optimizer8bit) and value is not optim.Optimizer8bit:
            classes[name] = value
    return classes


def looks_like_ours(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith((PREFIX, "paged")) or any(suffix in lowered for suffix in PRECISION_SUFFIXES)


def resolve(name: str, deepspeed_resolves: Callable[[str], bool]) -> type | None:
    """The dist8bit class a config type names, None when it is DeepSpeed's or torch's.

    `deepspeed_resolves(name)` says whether DeepSpeed itself (its own optimizers
    or torch.optim) understands the name.
    """
    classes = optimizer_classes()
    by_lower = {key.lower(): cls for key, cls in classes.items()}
    explicit = name.lower().startswith(PREFIX)
    bare = name[len(PREFIX) :] if explicit else name
    cls = by_lower.get(bare.lower())
    if cls is not None and (explicit or looks_like_ours(bare) or not deepspeed_resolves(name)):
        return cls
    if explicit or looks_like_ours(name):
        raise DeepSpeedConfigError(_unknown_name_message(name, classes))
    return None


def _unknown_name_message(name: str, classes: Mapping[str, type]) -> str:
    bare = name[len(PREFIX) :] if name.lower().startswith(PREFIX) else name
    close = difflib.get_close_matches(bare, list(classes), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (
        f'DeepSpeed config "optimizer": {{"type": {name!r}}} is not a dist8bit optimizer.{hint} '
        f"Known dist8bit optimizers: {', '.join(sorted(classes))} "
        f"(names DeepSpeed or torch.optim also use, such as AdamW or LAMB, need the prefix: {PREFIX}AdamW)."
    )


def accepted_arguments(cls: type) -> list[str]:
    """Keyword arguments a dist8bit optimizer class takes (following **kwargs down its bases)."""
    accepted: list[str] = []
    for klass in cls.__mro__:
        if klass is torch.optim.Optimizer:
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        for parameter in parameters:
            named = parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
            if named and parameter.name not in INTERNAL_ARGUMENTS and parameter.name not in accepted:
                accepted.append(parameter.name)
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    fixed = fixed_arguments(cls)
    return [name for name in accepted if name not in fixed]


def fixed_arguments(cls: type) -> set[str]:
    """Arguments an X8bit / X4bit / X32bit / PagedX class pins (passing them is an error)."""
    fixed = {argument for suffix, argument in FIXED_BY_NAME if cls.__name__.endswith(suffix)}
    if cls.__name__.startswith("Paged"):
        fixed.add("is_paged")
    return fixed


def check_params(cls: type, params: Mapping[str, Any]) -> dict[str, Any]:
    """The config's "params" as keyword arguments for `cls`; unknown keys are an error."""
    if not isinstance(params, Mapping):
        raise DeepSpeedConfigError(f'DeepSpeed config "optimizer": "params" must be an object, got {type(params).__name__}')
    if "max_grad_norm" in params:
        raise DeepSpeedConfigError(
            'DeepSpeed config "optimizer": "params" sets max_grad_norm; clip gradients with DeepSpeed\'s top-level '
            '"gradient_clipping" instead'
        )
    accepted = accepted_arguments(cls)
    unknown = [key for key in params if key not in accepted]
    if unknown:
        fixed = sorted(set(unknown) & fixed_arguments(cls))
        note = f" ({', '.join(fixed)} is fixed by the name {cls.__name__})" if fixed else ""
        raise DeepSpeedConfigError(
            f'DeepSpeed config "optimizer": {{"type": "{cls.__name__}"}} has unknown "params" key(s) '
            f"{', '.join(repr(k) for k in unknown)}{note}; {cls.__name__} accepts: {', '.join(accepted)}"
        )
    return dict(params)
