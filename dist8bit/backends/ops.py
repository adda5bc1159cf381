"""The kernel contract: torch operator schemas every compiled backend implements.

The schemas live here, in one place, and the C++ (CPU) and CUDA extensions
only register implementations for them (TORCH_LIBRARY_IMPL). Arguments are
already validated by dist8bit.functional; the kernels re-check cheap
invariants with TORCH_CHECK as a second line of defence.

quantize_blockwise(x, code, thresholds, lut, lut_mantissa_bits, lut_min_exponent,
                   refine_steps, blocksize, seed, codes!, absmax!)
    x: contiguous float32/float16/bfloat16, n elements (flat view).
    codes: uint8, n elements; absmax: float32, ceil(n / blocksize) elements.
    Rounding rule and lookup table: dist8bit.quant.codebook. Stochastic
    rounding (seed given): dist8bit.quant.stochastic.

dequantize_blockwise(codes, code, absmax, blocksize, out!)
    out[i] = code[codes[i]] * absmax[i // blocksize], computed in float32 and
    rounded to out's dtype (float32/float16/bfloat16, round-to-nearest-even).
"""

from __future__ import annotations

import torch

NAMESPACE = "dist8bit"

_library = torch.library.Library(NAMESPACE, "DEF")
_library.define(
    "quantize_blockwise(Tensor x, Tensor code, Tensor thresholds, Tensor lut, int lut_mantissa_bits, "
    "int lut_min_exponent, int refine_steps, int blocksize, int? seed, Tensor(a!) codes, Tensor(b!) absmax) -> ()"
)
_library.define("dequantize_blockwise(Tensor codes, Tensor code, Tensor absmax, int blocksize, Tensor(a!) out) -> ()")


def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether a compiled implementation of `op_name` is registered for the device type."""
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op_name}", dispatch_key)
