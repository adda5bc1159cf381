"""dist8bit: 8-bit block-wise quantized optimizer states for distributed PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

from . import functional, nn, optim

__all__ = ["__version__", "functional", "nn", "optim"]
