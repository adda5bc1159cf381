"""Quantization math shared by every backend: maps, block layout, rounding rule."""
