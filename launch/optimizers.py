"""The optimizers the launcher offers, by name, and how much state they hold.

One table serves every strategy: none/ddp/fsdp construct the optimizer from it
directly; under DeepSpeed the same names map to the optimizer types that
`import dist8bit` registers with DeepSpeed, so `--optim` means the same thing
whichever strategy runs it.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import dist8bit


class LaunchError(Exception):
    """A configuration or resume problem that ends the run with a one-line message."""


# name -> (constructor, default lr, default weight decay). Lion's sign update is
# larger per element than Adam's, so it takes a smaller lr and a larger decay
# (the Lion paper's advice: lr 3-10x smaller, lr * wd kept the same). Lion's lr
# was picked from 4e-4 / 1e-3 on 150 steps of the default model.
OPTIMIZERS: dict[str, tuple[Any, float, float]] = {
    "adamw4bit": (dist8bit.optim.AdamW4bit, 2e-3, 0.1),
    "adamw8bit": (dist8bit.optim.AdamW8bit, 2e-3, 0.1),
    "adamw32bit": (dist8bit.optim.AdamW32bit, 2e-3, 0.1),
    "lion4bit": (dist8bit.optim.Lion4bit, 1e-3, 0.2),
    "lion8bit": (dist8bit.optim.Lion8bit, 1e-3, 0.2),
    "lion32bit": (dist8bit.optim.Lion32bit, 1e-3, 0.2),
    "torch-adamw": (torch.optim.AdamW, 2e-3, 0.1),
}

# --optim -> the DeepSpeed config's "optimizer.type" (registered by `import dist8bit`).
# torch-adamw has no entry: DeepSpeed's own "AdamW" is its fused/CPU Adam, not torch's.
DEEPSPEED_TYPES: dict[str, str] = {
    "adamw4bit": "AdamW4bit",
    "adamw8bit": "AdamW8bit",
    "adamw32bit": "AdamW32bit",
    "lion4bit": "Lion4bit",
    "lion8bit": "Lion8bit",
    "lion32bit": "Lion32bit",
}


def register_optimizer(name: str, constructor: Any, lr: float, weight_decay: float, replace: bool = False) -> None:
    """Offer one more --optim (e.g. launch/quantization_study.py's emulated optimizers) to runs started in this
    process; `constructor(groups, lr=..., betas=...)` builds it. A name already offered is replaced only
    with `replace` (the study re-registers its own names; the launcher's own stay fixed)."""
    if name in OPTIMIZERS and not replace:
        raise ValueError(f"--optim {name!r} is already offered")
    OPTIMIZERS[name] = (constructor, lr, weight_decay)


def optimizer_family(name: str) -> str:
    """adamw4bit, adamw8bit, adamw32bit and torch-adamw are one algorithm at different state precisions."""
    return name.removeprefix("torch-").removesuffix("4bit").removesuffix("8bit").removesuffix("32bit")


def is_dist8bit(name: str) -> bool:
    """Whether --optim `name` builds a dist8bit optimizer (which takes master_weights and error_bits)."""
    constructor = OPTIMIZERS[name][0]
    return isinstance(constructor, type) and issubclass(constructor, dist8bit.optim.Optimizer8bit)


def master_kwargs(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The master-weights arguments the run adds to a dist8bit optimizer (launch/precision.py settles them).
    None for --dtype fp32, so fp32 runs build the optimizer (and save checkpoints) exactly as before
    these flags existed, and none for other optimizers, which take no such option."""
    if getattr(args, "dtype", "fp32") == "fp32" or not is_dist8bit(name):
        return {}
    kwargs: dict[str, Any] = {"master_weights": args.master_weights}
    if args.error_bits is not None:
        kwargs["error_bits"] = args.error_bits
    return kwargs


def build_optimizer(name: str, groups: list[dict], args: argparse.Namespace) -> torch.optim.Optimizer:
    """The optimizer `name` over `groups` (which carry their own weight decay), with the run's lr, betas and
    master-weights mode."""
    if name not in OPTIMIZERS:
        raise LaunchError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    constructor = OPTIMIZERS[name][0]
    return constructor(groups, lr=args.lr, betas=(args.beta1, args.beta2), **master_kwargs(name, args))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state on this rank: dist8bit's own count (`state_bytes()`, which sees
    only this rank's shard or partition), or for other optimizers every non-scalar state tensor
    (a DTensor counts its local shard)."""
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total
