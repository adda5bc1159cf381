"""How low-precision parameters are written: the `master_weights` option.

Mixed-precision training keeps an fp32 master copy (4 B/param) so that small
updates are not lost when bf16 weights round. With 8-bit states the master
is the largest item left, so dist8bit can train bf16 weights without it:

    "fp32"         the parameters ARE the master (float32; DeepSpeed's bf16
                   mode and torch.autocast keep such a copy): low-precision
                   parameters are refused, so a missing master never goes unnoticed
    "none"         each parameter is written in its own dtype, rounding to
                   nearest even (the baseline that loses small updates)
    "stochastic"   bf16 parameters round up or down at random, unbiased
                   (keyed per element, reproducible; see quant/stochastic.py)
    "compensated"  bf16 parameters keep each write's rounding error in an
                   int8 (error_bits=8) or int16 (16) buffer, the state entry
                   `weight_error`, and add it back at the next step
                   (Kahan-style; encoding: quant/weight_error.py)

float32 parameters are their own master in every mode, so one optimizer can
hold bf16 matrices and fp32 norms. float16 parameters take "fp32" or "none"
only: their errors do not sit in the low bits of a float32, and stochastic
rounding is implemented for bf16. The default (None) is "none", or
"stochastic" with the older `stochastic_rounding=True`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..quant.weight_error import ERROR_DTYPES, error_dtype, fits_error_codes

MODES = ("fp32", "none", "stochastic", "compensated")
ERROR_KEY = "weight_error"  # the state entry of a compensated parameter


def resolve_mode(master_weights: str | None, stochastic_rounding: bool) -> str:
    """The mode an optimizer runs: master_weights, or what the older flag implies when it is None."""
    if master_weights is None:
        return "stochastic" if stochastic_rounding else "none"
    if master_weights not in MODES:
        raise ValueError(f"master_weights must be one of {MODES} (or None), got {master_weights!r}")
    if stochastic_rounding and master_weights != "stochastic":
        raise ValueError(
            f"stochastic_rounding=True asks for master_weights='stochastic' but master_weights={master_weights!r}; "
            "pass only master_weights"
        )
    return master_weights


def check_error_bits(error_bits: Any) -> int:
    if isinstance(error_bits, bool) or error_bits not in ERROR_DTYPES:
        raise ValueError(f"error_bits must be 8 or 16 (bits per element of the compensated-weight buffer), got {error_bits!r}")
    return int(error_bits)


def check_parameter(mode: str, param: torch.Tensor) -> None:
    """Refuse a parameter the mode cannot write faithfully, naming it and the fix."""
    where = f"parameter of shape {tuple(param.shape)} has dtype {param.dtype}"
    if mode == "fp32" and param.dtype != torch.float32:
        raise ValueError(
            f"{where}, but master_weights='fp32' updates float32 master weights (keep the model in float32 under "
            "torch.autocast, or let DeepSpeed's bf16 mode keep the master); to train bfloat16 weights without a "
            "master use master_weights='compensated' (or 'stochastic' / 'none')"
        )
    if mode in ("stochastic", "compensated") and param.dtype == torch.float16:
        raise ValueError(
            f"{where}, but master_weights={mode!r} is implemented for bfloat16 parameters; train float16 weights "
            "with a float32 master (master_weights='fp32') or use bfloat16"
        )


def uses_error(config: dict[str, Any], dtype: torch.dtype) -> bool:
    """Whether parameters of `dtype` in a group with `config` keep a weight_error buffer."""
    return config["master_weights"] == "compensated" and dtype == torch.bfloat16


def error_buffer(state: dict[str, Any], config: dict[str, Any], param: torch.Tensor) -> torch.Tensor | None:
    """The weight_error of a parameter (or flat buffer) `param` whose state is `state`, None when its
    group keeps none; created as zeros on first use (a weight starts exactly at its bf16 value), so a
    state resumed from a checkpoint saved without compensation starts compensating from there."""
    if not uses_error(config, param.dtype):
        return None
    if ERROR_KEY not in state:
        state[ERROR_KEY] = torch.zeros(param.shape, dtype=error_dtype(config["error_bits"]), device=param.device)
    return state[ERROR_KEY]


def converted_error(error: torch.Tensor, bits: int) -> torch.Tensor:
    """A saved error buffer at `bits` per element: int8 codes count 256 units of int16's."""
    target = error_dtype(bits)
    if error.dtype == target:
        return error
    wide = error.to(torch.int32)
    if target == torch.int16:
        return (wide * 256).to(torch.int16)
    return ((wide + 128) >> 8).clamp(-127, 127).to(torch.int8)


def adapt_saved_error(saved: dict[str, Any], config: dict[str, Any], param: torch.Tensor, numel: int) -> dict[str, Any]:
    """A saved state's weight_error made fit for this optimizer: checked, converted to its
    error_bits, or dropped with a warning when the optimizer keeps none for the parameter."""
    error = saved.get(ERROR_KEY)
    if error is None:
        return saved
    where = f"parameter of shape {tuple(param.shape)}"
    if not isinstance(error, torch.Tensor) or not fits_error_codes(error.dtype, error.numel(), numel):
        raise ValueError(
            f"{where}: the state dict's {ERROR_KEY} must be an int8 or int16 tensor of {numel} elements, got "
            f"{getattr(error, 'dtype', type(error).__name__)} with {getattr(error, 'numel', lambda: '?')()}"
        )
    if not uses_error(config, param.dtype):
        warnings.warn(
            f"{where}: the checkpoint holds compensated-weight errors ({ERROR_KEY}) but this optimizer runs "
            f"master_weights={config['master_weights']!r} for {param.dtype} parameters; they are dropped (each weight "
            "loses less than half a bfloat16 ulp)",
            stacklevel=3,
        )
        return {k: v for k, v in saved.items() if k != ERROR_KEY}
    return {**saved, ERROR_KEY: converted_error(error, config["error_bits"])}
