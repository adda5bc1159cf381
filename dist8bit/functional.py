"""Block-wise 8-bit quantization, bitsandbytes-compatible where concepts match.

    codes, state = quantize_blockwise(A)          # uint8 codes + QuantState
    A_hat = dequantize_blockwise(codes, state)    # back to A's dtype and shape

Each block of `blocksize` consecutive elements (row-major order) is scaled by
its absolute maximum and every value is replaced by the index of the nearest
value of a 256-entry map. Rounding rule: dist8bit.quant.codebook. Block
layout: dist8bit.quant.layout.

Non-finite inputs are never silently turned into finite data: a block that
holds NaN gets a NaN absmax, a block that holds +-Inf an Inf absmax, so the
whole block dequantizes to non-finite values.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .backends import REFERENCE, backend_for
from .quant.codebook import Codebook, build_codebook
from .quant.layout import DEFAULT_BLOCKSIZE, QUANTIZE_BLOCKSIZES, check_blocksize, num_blocks
from .quant.maps import (
    create_dynamic_map,
    create_dynamic_map_4bit,
    create_fp8_map,
    create_linear_map,
    create_linear_map_4bit,
    create_normal_map,
    create_quantile_map,
    validate_map,
)
from .quant.packing import code_bytes
from .quant.quantiles import estimate_quantiles
from .quant.state import QuantState

__all__ = [
    "QuantState",
    "create_dynamic_map",
    "create_dynamic_map_4bit",
    "create_fp8_map",
    "create_linear_map",
    "create_linear_map_4bit",
    "create_normal_map",
    "create_quantile_map",
    "dequantize",
    "dequantize_blockwise",
    "estimate_quantiles",
    "quantize",
    "quantize_blockwise",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@lru_cache(maxsize=8)
def _default_codebook(device: torch.device) -> Codebook:
    return build_codebook(create_dynamic_map(signed=True)).to(device)


@lru_cache(maxsize=32)
def _cached_codebook(code_bits: tuple[int, ...], device: torch.device) -> Codebook:
    code = torch.tensor(code_bits, dtype=torch.int32).view(torch.float32)
    return build_codebook(code).to(device)


def codebook_for(code: torch.Tensor | None, device: torch.device, name: str = "code") -> Codebook:
    """Validated codebook for a user map (or the signed dynamic map), cached by value."""
    if code is None:
        return _default_codebook(device)
    validate_map(code, name)
    bits = tuple(code.detach().reshape(-1).cpu().view(torch.int32).tolist())
    return _cached_codebook(bits, device)


def _backend(device: torch.device, codebook: Codebook):
    """The backend for `device`; 4-bit maps go through the reference backend.

    The compiled quantize operators take 256-entry maps only; the optimizer's
    4-bit states are encoded inside the fused step kernels. The reference
    path is exact and runs on every device, so results are the same bits."""
    return backend_for(device) if codebook.bits == 8 else REFERENCE


def _check_float_tensor(tensor: object, name: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}; convert it with .float()")
    if tensor.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {tensor.layout}; call .to_dense() first")
    return tensor


def _check_out(out: torch.Tensor | None, name: str, numel: int, dtypes: tuple[torch.dtype, ...], device: torch.device) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {out.dtype}")
    if out.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {out.numel()}")
    if out.device != device:
        raise ValueError(f"{name} is on {out.device} but the input is on {device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def quantize_blockwise(
    A: torch.Tensor,
    code: torch.Tensor | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = DEFAULT_BLOCKSIZE,
    stochastic_rounding: bool = False,
    seed: int | None = None,
    nested: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize A to uint8 codes with one float32 absmax per block.

    `code` defaults to the signed dynamic map. A 16-value map (e.g.
    create_dynamic_map_4bit()) gives 4-bit codes packed two per byte
    (dist8bit.quant.packing): a 1-D tensor of ceil(numel / 2) bytes. `absmax` and `out` are optional
    output buffers. With `stochastic_rounding`, each value rounds to the code
    above or below with probability given by its distance; `seed` (default 0)
    makes that reproducible and identical on every backend.

    `nested=True` quantizes the absmax too (double quantization, as
    bitsandbytes does it): their mean is subtracted (`state.offset`) and the
    rest quantized with the signed dynamic map in blocks of the same
    `blocksize` (`state.state2`), so the scales cost about 1 byte per block
    instead of 4.
    """
    _check_float_tensor(A, "A")
    check_blocksize(blocksize, supported=QUANTIZE_BLOCKSIZES)
    device = A.device
    codebook = codebook_for(code, device)
    n = A.numel()
    blocks = num_blocks(n, blocksize)
    _check_out(out, "out", code_bytes(n, codebook.bits), (torch.uint8,), device)
    _check_out(absmax, "absmax", blocks, (torch.float32,), device)
    if nested and absmax is not None:
        raise ValueError("absmax= cannot be combined with nested=True: a nested state keeps its scales as uint8 codes")
    if seed is not None and not stochastic_rounding:
        raise ValueError("seed is only used with stochastic_rounding=True")
    rounding_seed = (0 if seed is None else seed) if stochastic_rounding else None
    if rounding_seed is not None:
        from .quant.stochastic import seed_key

        seed_key(rounding_seed)  # validates the seed
    shape = A.shape if codebook.bits == 8 else (code_bytes(n, 4),)
    codes = out if out is not None else torch.empty(shape, dtype=torch.uint8, device=device)
    scales = absmax if absmax is not None else torch.empty(blocks, dtype=torch.float32, device=device)
    _backend(device, codebook).quantize_blockwise(
        A.contiguous().view(-1), codebook, blocksize, rounding_seed, codes.view(-1), scales
    )
    state = QuantState(scales, A.shape, codebook.code.clone(), blocksize, None, A.dtype)
    if nested:
        _nest_absmax(state)
    return codes, state


def _nest_absmax(state: QuantState) -> None:
    """Replace state.absmax by its own 8-bit codes (mean-centred, dynamic map, same blocksize)."""
    offset = state.absmax.mean()
    centred = state.absmax - offset
    state.absmax, state.state2 = quantize_blockwise(centred, blocksize=state.blocksize)
    state.offset = offset


def _decoded_absmax(state: QuantState) -> torch.Tensor:
    """The float32 scales of a state, undoing double quantization."""
    if not state.nested:
        return state.absmax
    return dequantize_blockwise(state.absmax, state.state2) + state.offset


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    code: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = DEFAULT_BLOCKSIZE,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Decode uint8 codes: out[i] = code[A[i]] * absmax[i // blocksize].

    Pass either the QuantState returned by quantize_blockwise (nested or not)
    or `absmax` (and optionally `code`, default the signed dynamic map, and
    `blocksize`). The result has A's shape and the original dtype (float32
    without a state). With a 16-value map A holds packed 4-bit codes; the
    element count then comes from the state's shape, or `out`, or is
    2 * A.numel().
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor of uint8 codes, got {type(A).__name__}")
    if A.dtype != torch.uint8:
        raise TypeError(f"A must hold uint8 codes, got {A.dtype}")
    if quant_state is not None:
        if absmax is not None or code is not None:
            raise ValueError("pass either quant_state or absmax/code, not both")
        if quant_state.blocksize is None:
            raise ValueError("quant_state has no blocksize")
        if quant_state.quant_type is not None:
            raise NotImplementedError(
                f"quant_state holds a {quant_state.quant_type!r} (4-bit) state; dist8bit decodes 8-bit block-wise "
                "states only: dequantize it with bitsandbytes.functional.dequantize_4bit"
            )
        absmax, code, blocksize = _decoded_absmax(quant_state), quant_state.code, quant_state.blocksize
        dtype = dtype or quant_state.dtype
    elif absmax is None:
        raise ValueError("dequantize_blockwise needs quant_state or absmax")
    check_blocksize(blocksize, supported=QUANTIZE_BLOCKSIZES)
    device = A.device
    codebook = codebook_for(code, device)
    shape = _decoded_shape(A, codebook, quant_state, out)
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be a float32 tensor, got {getattr(absmax, 'dtype', type(absmax).__name__)}")
    n = shape.numel()
    expected_blocks = num_blocks(n, blocksize)
    if absmax.numel() != expected_blocks:
        raise ValueError(
            f"absmax has {absmax.numel()} scales but {n} codes with blocksize={blocksize} need {expected_blocks}; "
            "were they quantized with another blocksize?"
        )
    if absmax.device != device:
        raise ValueError(f"absmax is on {absmax.device} but the codes are on {device}")
    dtype = dtype or (out.dtype if out is not None else torch.float32)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    _check_out(out, "out", n, (dtype,), device)
    result = out if out is not None else torch.empty(shape, dtype=dtype, device=device)
    _backend(device, codebook).dequantize_blockwise(
        A.contiguous().view(-1), codebook.code, absmax.contiguous(), blocksize, result.view(-1)
    )
    return result


def _decoded_shape(A: torch.Tensor, codebook: Codebook, quant_state: QuantState | None, out: torch.Tensor | None) -> torch.Size:
    """Shape of the decoded tensor: A's for 8-bit codes; for packed 4-bit codes the
    state's shape, else out's, else 2 * A.numel() elements."""
    if quant_state is not None and quant_state.shape is not None:
        expected = code_bytes(quant_state.shape.numel(), codebook.bits)
        if expected != A.numel():
            raise ValueError(
                f"A has {A.numel()} code bytes but quant_state describes a tensor of shape {tuple(quant_state.shape)} "
                f"({expected} bytes of {codebook.bits}-bit codes)"
            )
        return quant_state.shape if codebook.bits == 4 else A.shape
    if codebook.bits == 8:
        return A.shape
    if out is not None:
        if code_bytes(out.numel(), 4) != A.numel():
            raise ValueError(f"out has {out.numel()} elements but A holds {A.numel()} bytes of packed 4-bit codes")
        return out.shape
    return torch.Size([2 * A.numel()])


def quantize(
    A: torch.Tensor, code: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Quantize with a single absmax for the whole tensor: (codes, (absmax, code))."""
    _check_float_tensor(A, "A")
    device = A.device
    codebook = codebook_for(code, device)
    if codebook.bits != 8:
        raise ValueError("quantize() takes 256-value maps; use quantize_blockwise for 4-bit maps")
    _check_out(out, "out", A.numel(), (torch.uint8,), device)
    codes = out if out is not None else torch.empty(A.shape, dtype=torch.uint8, device=device)
    absmax = torch.empty(min(A.numel(), 1), dtype=torch.float32, device=device)
    whole = max(A.numel(), 1)
    backend_for(device).quantize_blockwise(A.contiguous().view(-1), codebook, whole, None, codes.view(-1), absmax)
    return codes, (absmax, codebook.code)


def dequantize(
    A: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    absmax: torch.Tensor | None = None,
    code: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of `quantize`: code[A] * absmax, as float32 (or out's dtype)."""
    if state is not None:
        absmax, code = state
    if absmax is None:
        raise ValueError("dequantize needs state or absmax")
    if not isinstance(A, torch.Tensor) or A.dtype != torch.uint8:
        raise TypeError(f"A must be a uint8 tensor of codes, got {getattr(A, 'dtype', type(A).__name__)}")
    if absmax.numel() != min(A.numel(), 1):
        raise ValueError(f"absmax must hold one scale for a non-empty tensor, got {absmax.numel()}")
    codebook = codebook_for(code, A.device)
    dtype = out.dtype if out is not None else torch.float32
    _check_out(out, "out", A.numel(), FLOAT_DTYPES, A.device)
    result = out if out is not None else torch.empty(A.shape, dtype=dtype, device=A.device)
    backend_for(A.device).dequantize_blockwise(
        A.contiguous().view(-1), codebook.code, absmax.float(), max(A.numel(), 1), result.view(-1)
    )
    return result
