"""`import dist8bit.compat.bitsandbytes as bnb`: bitsandbytes' public surface on dist8bit.

The submodules mirror bitsandbytes': `functional` (8-bit block-wise
quantization, maps, QuantState), `nn` (StableEmbedding, Embedding) and
`optim` (the optimizers, with bitsandbytes' signatures, defaults and
semantics). Everything runs on dist8bit's kernels; bitsandbytes itself is
never imported. Names outside that surface (int8 matmul, 4-bit layers) exist
and raise NotImplementedError naming what to use.
"""

from __future__ import annotations

from importlib.util import find_spec

from ..unsupported import unsupported_class, unsupported_function
from . import functional, nn

__all__ = ["functional", "nn"]

# The optimizers live in their own module, optim.py, imported here whenever
# it is present in this package.
if find_spec(f"{__name__}.optim") is not None:
    from . import optim

    __all__ += ["optim"]

_MATMUL = "int8 / 4-bit matrix multiplication is out of scope: use torch.matmul, or bitsandbytes itself for it"
matmul = unsupported_function("bitsandbytes", "matmul", _MATMUL)
matmul_4bit = unsupported_function("bitsandbytes", "matmul_4bit", _MATMUL)
MatmulLtState = unsupported_class("bitsandbytes", "MatmulLtState", _MATMUL)
