"""bitsandbytes.nn's optimizer-related modules on dist8bit.

`StableEmbedding` and `Embedding` are the modules of bitsandbytes.nn that
exist for the 8-bit optimizers: both register their weight for 32-bit
optimizer state with dist8bit's GlobalOptimManager, both initialise it
Xavier-uniform, and StableEmbedding adds a LayerNorm computed in float32.
The layers that quantize weights for inference (Linear8bitLt, Linear4bit,
Params4bit, Embedding8bit, ...) are out of scope: constructing one raises
NotImplementedError naming what to use.
"""

from __future__ import annotations

from typing import Any

import torch

from ...nn import Embedding as _Embedding32bitState
from ...nn import StableEmbedding
from ..unsupported import unsupported_class

__all__ = ["Embedding", "StableEmbedding"]


class Embedding(_Embedding32bitState):
    """bitsandbytes.nn.Embedding: torch.nn.Embedding with Xavier-uniform init and 32-bit optimizer state.

    dist8bit.nn.Embedding keeps torch's N(0, 1) initialisation; bitsandbytes'
    draws Xavier-uniform weights, and so does this class (same draws for the
    same seed). Its signature is bitsandbytes' (no `dtype`).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: torch.Tensor | None = None,
        device: Any = None,
    ) -> None:
        super().__init__(
            num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse, _weight, device
        )

    reset_parameters = StableEmbedding.reset_parameters


_MODULE = "bitsandbytes.nn"
_INFERENCE = (
    "weight quantization for inference is out of scope: keep torch.nn.{torch_name} (its optimizer state is what "
    "dist8bit quantizes) or use bitsandbytes itself for quantized weights"
)
for _name, _torch_name in {
    "Linear8bitLt": "Linear",
    "Linear4bit": "Linear",
    "LinearFP4": "Linear",
    "LinearNF4": "Linear",
    "OutlierAwareLinear": "Linear",
    "Int8Params": "Parameter",
    "Params4bit": "Parameter",
    "Embedding8bit": "Embedding",
    "Embedding4bit": "Embedding",
    "EmbeddingFP4": "Embedding",
    "EmbeddingNF4": "Embedding",
}.items():
    globals()[_name] = unsupported_class(_MODULE, _name, _INFERENCE.format(torch_name=_torch_name))
del _name, _torch_name
