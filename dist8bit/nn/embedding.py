"""Embeddings whose optimizer state stays 32-bit.

Embedding rows see sparse, spiky gradients: quantizing their Adam state is
what made 8-bit training unstable in the 8-bit optimizers paper, whose fix
(the "stable embedding") is Xavier-uniform initialisation, a LayerNorm on the
output and 32-bit optimizer state for the weight. The override is registered
on the module, so it still applies after FSDP or DeepSpeed replace the
parameter object.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..optim.overrides import GlobalOptimManager


def _keep_32bit_state(module: nn.Module) -> None:
    GlobalOptimManager.get_instance().register_module_override(module, "weight", {"optim_bits": 32})


class StableEmbedding(nn.Embedding):
    """Embedding + LayerNorm (computed in float32), Xavier-uniform init, 32-bit optimizer state."""

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
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse, _weight, device, dtype
        )
        self.norm = nn.LayerNorm(embedding_dim, device=device)
        _keep_32bit_state(self)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        embedded = F.embedding(
            input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        norm = self.norm
        weight = None if norm.weight is None else norm.weight.float()
        bias = None if norm.bias is None else norm.bias.float()
        normalised = F.layer_norm(embedded.float(), norm.normalized_shape, weight, bias, norm.eps)
        return normalised.to(self.weight.dtype)


class Embedding(nn.Embedding):
    """torch.nn.Embedding whose weight always keeps 32-bit optimizer state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _keep_32bit_state(self)
