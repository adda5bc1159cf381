"""The fused-step contract, written once: one object describes one kernel call.

The optimizer builds a FusedStepCall per batch of segments and hands it to
its backend's `fused_step(call)`. The reference backend reads it directly;
the compiled backends flatten it once into the torch operator
`dist8bit::fused_step` (compiled.py; schema in ops.py, registered by the C++
side). Changing the contract means changing this file, ops.py's schema and
the C++ entry points together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..quant.codebook import Codebook
from .rules import Rule, WeightDecay

NUM_SLOTS = 3  # state slots every call carries (unused ones are empty lists); AdEMAMix uses all three


@dataclass(frozen=True)
class FusedStepCall:
    """One optimizer step over a list of segments, in one launch.

    A segment is a contiguous run of one parameter's elements. Per segment k:
    params[k] (float32/float16/bfloat16, all the same dtype), grads[k] (same
    numel, float32/float16/bfloat16) and, for each used state slot S,
    states[S][k]: uint8 codes with absmaxes[S][k] = float32 scales, one per
    block of `blocksize` starting at the segment's first element, or float32
    values with absmaxes[S] empty. An empty states[S] means slot S is unused.
    All segments share one precision; `codebooks[S]` is the codebook of a
    quantized slot, None for 32-bit or unused slots. A 16-value codebook
    (Codebook.bits == 4) means 4-bit codes packed two per byte
    (dist8bit.quant.packing): states[S][k] then holds ceil(numel / 2) bytes.
    Every quantized slot of a call has the same bits.

    Per element, with d the direction of `rule` (dist8bit.backends.rules,
    csrc/common/update_rules.h, reference_optim.py):

        g = grads[k] * grad_scale[k]              (grad_scale: float32 per segment, optional)
        lr_eff = constants[LR] * update_scale[k]  (update_scale: float32 per segment, optional)
        p <- p * constants[DECAY] - lr_eff * d    (LARS: d already carries lr_eff, so rate 1)

    Elements whose scaled gradient is not finite are skipped: parameter and
    states keep their values (8-bit states are re-encoded with the block's new
    scale) and nonfinite_count (int64, 1 element, optional) is incremented.
    With norm_out (float64 per segment) given, only sum(d^2) over finite
    elements is written per segment and nothing else is modified. With seed
    given, bfloat16 parameters are written with stochastic rounding keyed by
    (seed, segment_offsets[k] + i): see reference_optim.round_bf16_stochastically.

    Compensated bfloat16 parameters (errors given, one int8 or int16 tensor
    per segment with the segment's numel, all one dtype; params bfloat16; no
    seed): the update reads p as weight_error.compensated_values(p, errors[k])
    (the float32 the bfloat16 and its stored rounding error stand for), writes
    p rounded to nearest even and errors[k] = weight_error.weight_errors(
    stepped, p) in the same pass (dist8bit.quant.weight_error). Elements with
    a non-finite gradient keep their error too. Norm passes read p the same way.

    Construction checks the structure (slot count, list lengths); the
    kernels check tensor dtypes, sizes and devices.
    """

    rule: Rule
    wd_mode: WeightDecay
    constants: Sequence[float]  # StepConstants.vector(): float32 values indexed by HyperSlot
    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    states: Sequence[Sequence[torch.Tensor]]
    absmaxes: Sequence[Sequence[torch.Tensor]]
    codebooks: Sequence[Codebook | None]
    segment_offsets: Sequence[int]
    blocksize: int
    seed: int | None = None
    grad_scale: torch.Tensor | None = None
    update_scale: torch.Tensor | None = None
    norm_out: torch.Tensor | None = None
    nonfinite_count: torch.Tensor | None = None
    errors: Sequence[torch.Tensor] = ()

    def __post_init__(self) -> None:
        for name in ("states", "absmaxes", "codebooks"):
            if len(getattr(self, name)) != NUM_SLOTS:
                raise ValueError(f"FusedStepCall.{name} must hold {NUM_SLOTS} slots, got {len(getattr(self, name))}")
        segments = len(self.params)
        for name in ("grads", "segment_offsets"):
            if len(getattr(self, name)) != segments:
                raise ValueError(f"FusedStepCall.{name} has {len(getattr(self, name))} entries for {segments} segments")
        if len(self.errors) not in (0, segments):
            raise ValueError(f"FusedStepCall.errors has {len(self.errors)} entries for {segments} segments")
        if len(self.errors) and self.seed is not None:
            raise ValueError("FusedStepCall: compensated parameters (errors) are rounded to nearest; pass no seed")
        for slot in range(NUM_SLOTS):
            for name, entries in (("states", self.states[slot]), ("absmaxes", self.absmaxes[slot])):
                if len(entries) not in (0, segments):
                    raise ValueError(f"FusedStepCall.{name}[{slot}] has {len(entries)} entries for {segments} segments")

    def used_slots(self) -> list[int]:
        """The state slots this call updates."""
        return [slot for slot in range(NUM_SLOTS) if len(self.states[slot])]
