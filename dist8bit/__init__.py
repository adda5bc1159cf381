"""dist8bit: 8-bit block-wise quantized optimizer states for distributed PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

from . import functional, nn, offload, optim
from .integrations.deepspeed import register_on_import as _register_with_deepspeed_on_import

# DeepSpeed configs may name dist8bit optimizers; patches DeepSpeed once it is imported (never imports it).
_register_with_deepspeed_on_import()

__all__ = ["__version__", "functional", "nn", "offload", "optim"]
