"""The one warning a process gets when paged states cannot be had.

Paged optimizers then keep their states in ordinary memory and give the same
results; only nothing can spill to host memory. One warning per process, not
per optimizer or per parameter: the reason (no CUDA, no concurrent managed
access, extension not built) is a property of the machine.
"""

from __future__ import annotations

import warnings

_warned = False


def warn_unavailable(reason: str) -> None:
    """Warn, once per process, that paged states fall back to ordinary memory."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"dist8bit: is_paged=True but paged optimizer states are unavailable here: {reason}. "
        "Paged optimizers keep their states in ordinary memory (same results; nothing spills to host memory). "
        "This warning is issued once per process.",
        RuntimeWarning,
        stacklevel=4,
    )
