"""Checkpoint conversion between 8-bit and fp32 optimizer states (see docs/checkpoints.md).

    from dist8bit.checkpoint import convert
    convert("adamw.pt", "adamw-8bit.pt", to="8bit", verify=True)

Readers turn each format into one canonical per-parameter form
(`canonical.py`); `plan.py` turns that into output slots and streaming jobs;
`writer.py` writes them atomically without holding the checkpoint in memory.
"""

from .canonical import Dense, OptimizerState, ParamState, Quantized
from .conversion import convert, find_optimizer_state_dicts
from .errors import CheckpointError
from .progress import Report

__all__ = [
    "CheckpointError",
    "Dense",
    "OptimizerState",
    "ParamState",
    "Quantized",
    "Report",
    "convert",
    "find_optimizer_state_dicts",
]
