"""The kernel contract: torch operator schemas every compiled backend implements.

The schemas live here, in one place, and the C++ (CPU) and CUDA extensions
only register implementations for them (TORCH_LIBRARY_IMPL). Arguments are
already validated by dist8bit.functional; the kernels re-check cheap
invariants with TORCH_CHECK as a second line of defence.

quantize_blockwise(x, code, thresholds, encoder, blocksize, seed, codes!, absmax!)
    x: contiguous float32/float16/bfloat16, n elements (flat view).
    codes: uint8, n elements; absmax: float32, ceil(n / blocksize) elements.
    Rounding rule: dist8bit.quant.codebook; encoder table (empty: binary
    search only): dist8bit.quant.encoder_table. Stochastic
    rounding (seed given): dist8bit.quant.stochastic.

dequantize_blockwise(codes, code, absmax, blocksize, out!)
    out[i] = code[codes[i]] * absmax[i // blocksize], computed in float32 and
    rounded to out's dtype (float32/float16/bfloat16, round-to-nearest-even).

fused_step(rule, wd_mode, hyper, params!, grads, state1!, absmax1!, state2!, absmax2!,
           state3!, absmax3!, codebooks, grad_scale, update_scale, norm_out!,
           nonfinite_count!, errors!, segment_offsets, blocksize, seed)
    dist8bit.backends.contract.FusedStepCall flattened (compiled.py does it,
    in one place): its meaning and argument rules are documented there.
    hyper is FusedStepCall.constants; stateS/absmaxS are states[S-1] and
    absmaxes[S-1]; codebooks is empty (32-bit) or [code, thresholds, encoder]
    for each of the 3 slots (unused slots repeat a used one's).
"""

from __future__ import annotations

import torch

NAMESPACE = "dist8bit"

_library = torch.library.Library(NAMESPACE, "DEF")
_library.define(
    "quantize_blockwise(Tensor x, Tensor code, Tensor thresholds, Tensor encoder, int blocksize, int? seed, "
    "Tensor(a!) codes, Tensor(b!) absmax) -> ()"
)
_library.define("dequantize_blockwise(Tensor codes, Tensor code, Tensor absmax, int blocksize, Tensor(a!) out) -> ()")
_library.define(
    "fused_step(int rule, int wd_mode, float[] hyper, Tensor(a!)[] params, Tensor[] grads, "
    "Tensor(b!)[] state1, Tensor(c!)[] absmax1, Tensor(d!)[] state2, Tensor(e!)[] absmax2, "
    "Tensor(f!)[] state3, Tensor(g!)[] absmax3, Tensor[] codebooks, "
    "Tensor? grad_scale, Tensor? update_scale, Tensor(h!)? norm_out, Tensor(i!)? nonfinite_count, "
    "Tensor(j!)[] errors, int[] segment_offsets, int blocksize, int? seed) -> ()"
)


def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether a compiled implementation of `op_name` is registered for the device type."""
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op_name}", dispatch_key)
