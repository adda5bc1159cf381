"""Optimizer offload: parameters and gradients on the GPU, master weights and 8-bit states on the host."""

from .optimizer import CPUOffloadOptimizer

__all__ = ["CPUOffloadOptimizer"]
