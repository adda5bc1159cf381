"""The warnings a process gets when paged states cannot be had, or a paging call fails.

Paged optimizers then keep their states in ordinary memory and give the same
results; only nothing can spill to host memory. One warning per process and
kind, not per optimizer or per parameter: the reason (no CUDA, no concurrent
managed access, extension not built) is a property of the machine, and a
failing driver call (a managed allocation the driver refuses, advice or a
prefetch it rejects) usually fails the same way for every state.
"""

from __future__ import annotations

import warnings

_warned = False
_warned_failure = False


class PagingFailure(RuntimeError):
    """A CUDA runtime call of paging failed (the message names it); the CUDA error state is already cleared."""


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


def warn_failed(reason: str) -> None:
    """Warn, once per process, that a paging call failed and what the optimizer did instead.

    The step goes on either way: a state whose managed allocation failed lives
    in ordinary device memory, and a state whose advice or prefetch failed stays
    managed but where the driver puts it (correct, possibly slower).
    """
    global _warned_failure
    if _warned_failure:
        return
    _warned_failure = True
    warnings.warn(
        f"dist8bit: a paged-memory call failed: {reason}. Optimizer steps go on with the same results: "
        "states that could not be allocated in managed memory use ordinary device memory, and states that "
        "could not be moved stay where the driver keeps them. Later failures are handled the same way "
        "without another warning (this one is issued once per process).",
        RuntimeWarning,
        stacklevel=4,
    )
