"""Modules that pair with 8-bit optimizers."""

from .embedding import Embedding, StableEmbedding

__all__ = ["Embedding", "StableEmbedding"]
