"""Why an optimizer step refuses CUDA graph capture, and the one check that says so.

A captured step would replay stale pointers: each fused launch uploads its
segment table (addresses of the parameters, gradients and states of the
launch) from a pinned host buffer that is handed out again once the launch's
copy has run, so a replayed graph would copy whatever that buffer holds by
then. Paged optimizers also place states with driver calls that a capture
forbids (cudaMemAdvise, cudaMemGetInfo, cudaMallocManaged). Making capture work
would mean per-graph table buffers that live as long as the graph; refusing
with a clear error is the simple, obviously correct choice.
"""

from __future__ import annotations

import torch


def refuse_graph_capture(optimizer: torch.optim.Optimizer) -> None:
    """Raise RuntimeError if the current CUDA stream is capturing a graph (cheap: no CUDA call before CUDA is up)."""
    if not torch.cuda.is_initialized() or not torch.cuda.is_current_stream_capturing():
        return
    raise RuntimeError(
        f"{type(optimizer).__name__}.step() cannot be captured in a CUDA graph: each fused launch uploads its "
        "segment table (the addresses of parameters, gradients and states) from a pinned host buffer that is "
        "reused after the launch, so a replay would read a stale table, and paged optimizers move states with "
        "driver calls that capture forbids. Fix: call optimizer.step() outside torch.cuda.graph(...) / "
        "CUDA-graph trees (e.g. capture only forward and backward and step eagerly), or use a torch.optim "
        "optimizer with capturable=True for a captured step."
    )
