"""Compensated bfloat16 parameters: the rounding error of each write, per element.

A bfloat16 is the top half of a float32, so writing the float32 result `x` of
an update as the bfloat16 `p` (round to nearest even) drops x's low 16 bits.
With |.| the float32 bit pattern without its sign, delta = |x| - |p| is an
integer in [-2^15, 2^15]. The error buffer keeps q = delta >> shift (rounded
half up, clamped to [-max, max] of the dtype, which keeps the restored value
off the rounding ties so that it rounds back to p): int8 with shift 8 (the
8-bit buffer: x to within 2^-8 of a bfloat16 ulp) or int16 with shift 0 (the
16-bit buffer: x itself, but for exact ties). The next step starts from the float32 with magnitude bits |p| + q << shift
(floored at 0) and p's sign, which is Kahan-style compensation without any ulp
arithmetic: the same integer step at every exponent, across binade boundaries
and for subnormals. A non-finite p carries no error.

Why this encoding and not a block-wise absmax one: docs/master_weights.md.
The kernels implement the same integers (csrc/common/weight_error.h).
"""

from __future__ import annotations

import torch

ERROR_DTYPES = {8: torch.int8, 16: torch.int16}
_SHIFT = {torch.int8: 8, torch.int16: 0}
_MAGNITUDE = 0x7FFFFFFF
_SIGN = 0x80000000
_INFINITY = 0x7F800000


def fits_error_codes(dtype: torch.dtype, numel: int, expected: int | None) -> bool:
    """Whether a buffer of `dtype` with `numel` elements can be the error codes of a parameter
    of `expected` elements (None: any count): int8 or int16, one code per element. The
    optimizer's load_state_dict and the checkpoint tools refuse anything else."""
    return dtype in ERROR_DTYPES.values() and (expected is None or numel == expected)


def error_dtype(bits: int) -> torch.dtype:
    """The integer dtype of an error buffer of `bits` (8 or 16) per element."""
    if bits not in ERROR_DTYPES:
        raise ValueError(f"error_bits must be 8 or 16, got {bits!r}")
    return ERROR_DTYPES[bits]


def _bf16_bits(p: torch.Tensor) -> torch.Tensor:
    """A bfloat16 tensor's patterns as float32 bits in int64 (low 16 bits zero)."""
    return (p.reshape(-1).view(torch.int16).to(torch.int64) & 0xFFFF) << 16


def _as_float(bits: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) as the float32 with those bits."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    return signed.to(torch.int32).view(torch.float32)


def compensated_values(param: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """The float32 values a bfloat16 `param` and its error buffer stand for (1-D)."""
    bits = _bf16_bits(param)
    magnitude = bits & _MAGNITUDE
    widened = (magnitude + error.reshape(-1).to(torch.int64) * (1 << _SHIFT[error.dtype])).clamp(min=0)
    restored = (bits & _SIGN) | widened
    return _as_float(torch.where(magnitude >= _INFINITY, bits, restored))


def weight_errors(x: torch.Tensor, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The error codes of writing float32 `x` as the bfloat16 `param` (its rounded value), 1-D."""
    shift = _SHIFT[dtype]
    info = torch.iinfo(dtype)
    p_magnitude = _bf16_bits(param) & _MAGNITUDE
    x_magnitude = x.reshape(-1).contiguous().view(torch.int32).to(torch.int64) & _MAGNITUDE
    half = (1 << shift) >> 1
    q = ((x_magnitude - p_magnitude + half) >> shift).clamp(-info.max, info.max)
    return torch.where(p_magnitude >= _INFINITY, torch.zeros_like(q), q).to(dtype)
