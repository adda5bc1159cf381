"""bitsandbytes.functional's 8-bit block-wise API, running on dist8bit's kernels.

Same names, positional signatures and defaults as bitsandbytes 0.50.2 (plus
`estimate_quantiles`, `create_quantile_map`, `quantize` and `dequantize` of
earlier releases). Where the two differ, this module follows bitsandbytes:

- `quantize_blockwise` / `dequantize_blockwise` default to blocksize 4096
  (dist8bit.functional: 256, the optimizers' size); the 6th positional
  argument of `quantize_blockwise` is `nested`;
- `estimate_quantiles` moves the default offset to 1 / (2 * num_quantiles)
  when num_quantiles < 256 and picks those quantiles from the 256-level grid
  at indices linspace(0, 255, num_quantiles), as bitsandbytes did;
- bad dtypes raise ValueError.

What stays dist8bit's: the rounding rule picks the truly nearest code
(bitsandbytes' CPU path picks another one for ~0.15% of randn values), so
codes may differ from bitsandbytes' by those values while the absmax, the
maps and the decoding are bit-identical; block sizes are powers of two in
[64, 65536]; `create_linear_map`'s signed map holds an exact 0.

4-bit, int8-matmul and raw optimizer-update functions are out of scope:
calling them raises NotImplementedError naming what to use.
"""

from __future__ import annotations

import torch

from ... import functional as _functional
from ...functional import (  # noqa: F401 (re-exported unchanged: __all__ below)
    QuantState,
    create_dynamic_map,
    create_fp8_map,
    create_normal_map,
    create_quantile_map,
    dequantize,
    quantize,
)
from ...quant.maps import create_linear_map  # noqa: F401 (re-exported)
from ...quant.quantiles import default_offset
from ..unsupported import unsupported_function

# dist8bit.functional's names; where bitsandbytes differs, the definitions below replace them.
__all__ = list(_functional.__all__)

GRID = 256  # bitsandbytes estimated 256 quantiles and picked fewer from them


def quantize_blockwise(
    A: torch.Tensor,
    code: torch.Tensor | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = 4096,  # bitsandbytes' default here (its optimizers use 256)
    nested: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """bitsandbytes.functional.quantize_blockwise: (uint8 codes, QuantState)."""
    if isinstance(A, torch.Tensor) and A.dtype not in _functional.FLOAT_DTYPES:
        raise ValueError(f"Blockwise quantization only supports 16/32-bit floats, but got {A.dtype}")
    return _functional.quantize_blockwise(A, code, absmax, out, blocksize, nested=nested)


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    code: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> torch.Tensor:
    """bitsandbytes.functional.dequantize_blockwise.

    With `quant_state`, `absmax`, `code` and `blocksize` are ignored (as in
    bitsandbytes); `nested` is accepted and ignored too: the state says
    whether its absmax is quantized.
    """
    del nested
    if isinstance(A, torch.Tensor) and A.dtype != torch.uint8:
        raise ValueError(f"A must be uint8, got {A.dtype}")
    if quant_state is not None:
        return _functional.dequantize_blockwise(A, quant_state, out=out)
    if absmax is None:
        raise ValueError("dequantize_blockwise requires either quant_state or absmax")
    return _functional.dequantize_blockwise(A, absmax=absmax, code=code, out=out, blocksize=blocksize)


def estimate_quantiles(
    A: torch.Tensor, out: torch.Tensor | None = None, offset: float = 1 / 512, num_quantiles: int = 256
) -> torch.Tensor:
    """bitsandbytes.functional.estimate_quantiles (removed in bitsandbytes 0.45).

    Estimates 256 quantiles at levels linspace(offset, 1 - offset, 256) (into
    `out` when given) and returns the `num_quantiles` of them at indices
    linspace(0, 255, num_quantiles). With fewer than 256 quantiles the
    default offset becomes 1 / (2 * num_quantiles); an offset passed
    explicitly is kept unless it equals the default 1/512, exactly as in
    bitsandbytes.
    """
    if num_quantiles < GRID and offset == 1 / 512:
        offset = default_offset(num_quantiles)
    quantiles = _functional.estimate_quantiles(A, offset=offset, num_quantiles=GRID)
    if out is not None:
        quantiles = out.copy_(quantiles)
    if num_quantiles < GRID:
        picked = torch.linspace(0, GRID - 1, num_quantiles).long().to(quantiles.device)
        quantiles = quantiles[picked]
    return quantiles


_MODULE = "bitsandbytes.functional"
_FOUR_BIT = "4-bit weight quantization is out of scope: use bitsandbytes itself for it"
_INT8 = "int8 matrix multiplication is out of scope: use bitsandbytes itself for it"
_OPTIM = (
    "use the optimizers of dist8bit.compat.bitsandbytes.optim (or dist8bit.optim), which run the whole update in one fused kernel"
)
for _name, _alternative in {
    "quantize_4bit": _FOUR_BIT,
    "dequantize_4bit": _FOUR_BIT,
    "quantize_fp4": _FOUR_BIT,
    "dequantize_fp4": _FOUR_BIT,
    "quantize_nf4": _FOUR_BIT,
    "dequantize_nf4": _FOUR_BIT,
    "get_4bit_type": _FOUR_BIT + " (the NF4 map itself is create_normal_map())",
    "gemv_4bit": _FOUR_BIT,
    "int8_linear_matmul": _INT8,
    "int8_mm_dequant": _INT8,
    "int8_double_quant": _INT8,
    "int8_vectorwise_quant": _INT8,
    "int8_vectorwise_dequant": _INT8,
    "igemm": _INT8,
    "batched_igemm": _INT8,
    "optimizer_update_32bit": _OPTIM,
    "optimizer_update_8bit_blockwise": _OPTIM,
    "get_paged": "paged optimizer states come with the Paged* optimizers (dist8bit.optim.PagedAdamW8bit, ...)",
}.items():
    globals()[_name] = unsupported_function(_MODULE, _name, _alternative)
del _name, _alternative
