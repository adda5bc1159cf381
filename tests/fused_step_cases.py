"""Optimizer-step cases and call tensors shared by the CPU and CUDA fused-step tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch

from dist8bit.backends.contract import FusedStepCall
from dist8bit.backends.rules import Rule, StepConstants, WeightDecay
from dist8bit.functional import codebook_for
from dist8bit.quant.codebook import Codebook
from dist8bit.quant.maps import create_dynamic_map, create_dynamic_map_4bit, create_linear_map_4bit


@dataclass(frozen=True)
class Case:
    name: str
    rule: Rule
    wd_mode: WeightDecay
    step: StepConstants
    signed: tuple[bool, ...]  # one per used state slot: which dynamic map it uses


CASES = [
    Case(
        "adamw",
        Rule.ADAM,
        WeightDecay.DECOUPLED,
        StepConstants(lr=1e-3, step=7, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True),
        (True, False),
    ),
    Case(
        "adam-l2",
        Rule.ADAM,
        WeightDecay.L2,
        StepConstants(lr=1e-3, step=7, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01),
        (True, False),
    ),
    Case(
        "adam-first-step",
        Rule.ADAM,
        WeightDecay.DECOUPLED,
        StepConstants(lr=1e-3, step=1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True),
        (True, False),
    ),
    Case(
        "lamb-in-direction",
        Rule.ADAM,
        WeightDecay.IN_DIRECTION,
        StepConstants(lr=1e-3, step=3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01),
        (True, False),
    ),
    Case("sgd", Rule.SGD, WeightDecay.L2, StepConstants(lr=0.1, step=3, weight_decay=1e-4), ()),
    Case("sgd-decoupled", Rule.SGD, WeightDecay.DECOUPLED, StepConstants(lr=0.1, step=3, weight_decay=1e-2, decoupled=True), ()),
    Case(
        "sgd-momentum",
        Rule.SGD,
        WeightDecay.L2,
        StepConstants(lr=0.1, step=3, weight_decay=1e-4, momentum=0.9, dampening=0.1),
        (True,),
    ),
    Case(
        "sgd-momentum-first-step",
        Rule.SGD,
        WeightDecay.L2,
        StepConstants(lr=0.1, step=1, weight_decay=1e-4, momentum=0.9, dampening=0.1),
        (True,),
    ),
    Case(
        "sgd-nesterov",
        Rule.SGD,
        WeightDecay.L2,
        StepConstants(lr=0.1, step=4, weight_decay=1e-4, momentum=0.9, nesterov=True),
        (True,),
    ),
    Case("lars-no-momentum", Rule.LARS, WeightDecay.L2, StepConstants(lr=0.1, step=3, weight_decay=1e-2), ()),
    Case(
        "lars",
        Rule.LARS,
        WeightDecay.L2,
        StepConstants(lr=0.1, step=3, weight_decay=1e-2, momentum=0.9, dampening=0.1),
        (True,),
    ),
    Case(
        "lars-first-step-nesterov",
        Rule.LARS,
        WeightDecay.L2,
        StepConstants(lr=0.1, step=1, weight_decay=1e-2, momentum=0.9, nesterov=True),
        (True,),
    ),
    Case(
        "rmsprop",
        Rule.RMSPROP,
        WeightDecay.L2,
        StepConstants(lr=1e-2, step=3, beta2=0.99, eps=1e-8, weight_decay=1e-4),
        (False,),
    ),
    Case(
        "rmsprop-momentum",
        Rule.RMSPROP,
        WeightDecay.L2,
        StepConstants(lr=1e-2, step=3, beta2=0.99, eps=1e-8, weight_decay=1e-4, momentum=0.9),
        (False, True),
    ),
    Case("adagrad", Rule.ADAGRAD, WeightDecay.L2, StepConstants(lr=1e-2, step=3, eps=1e-10, weight_decay=1e-4), (False,)),
    Case(
        "lion",
        Rule.LION,
        WeightDecay.DECOUPLED,
        StepConstants(lr=1e-4, step=3, beta1=0.9, beta2=0.99, weight_decay=0.1, decoupled=True),
        (True,),
    ),
    Case(
        "ademamix",
        Rule.ADEMAMIX,
        WeightDecay.DECOUPLED,
        StepConstants(
            lr=1e-3,
            step=5,
            beta1=0.9,
            beta2=0.999,
            beta3=0.9999,
            alpha=5.0,
            eps=1e-8,
            weight_decay=0.01,
            decoupled=True,
        ),
        (True, True, False),
    ),
]

CASES_BY_NAME = {case.name: case for case in CASES}


@cache
def state_codebook(signed: bool, device: torch.device, bits: int = 8) -> Codebook:
    """The codebook of a state slot (built once per device).

    8-bit: the signed or unsigned dynamic map. 4-bit: the optimizers' choice
    (issue 15): the signed 4-bit dynamic map for signed slots, the linear map
    without zero for unsigned ones (second moments, sums of squares)."""
    if bits == 4:
        code = create_dynamic_map_4bit(signed=True) if signed else create_linear_map_4bit()
    else:
        code = create_dynamic_map(signed=signed)
    return codebook_for(code, device)


@dataclass
class StepTensors:
    """The tensors of one fused step (three slots each for states and absmax) and their layout."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    states: list[list[torch.Tensor]]
    absmaxes: list[list[torch.Tensor]]
    signed: tuple[bool, ...]  # one per used state slot: which map it uses (state_codebook)
    quantized: bool  # uint8 codes + absmax (of `bits`), else float32 states
    blocksize: int
    offsets: list[int] | None = None  # segment_offsets; None: all 0
    bits: int = 8  # quantized: 8 or 4 (codes packed two per byte)
    errors: list[torch.Tensor] = field(default_factory=list)  # compensated bf16 params: one int8/int16 per segment

    def copy(self, device: torch.device | None = None) -> StepTensors:
        """A deep copy (on `device`, default: where the tensors are): fresh, contiguous, aligned tensors."""

        def copy(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device or t.device, copy=True)

        return StepTensors(
            [copy(t) for t in self.params],
            [copy(t) for t in self.grads],
            [[copy(t) for t in slot] for slot in self.states],
            [[copy(t) for t in slot] for slot in self.absmaxes],
            self.signed,
            self.quantized,
            self.blocksize,
            None if self.offsets is None else list(self.offsets),
            self.bits,
            [copy(t) for t in self.errors],
        )

    def codebooks(self, device: torch.device) -> list[Codebook | None]:
        books: list[Codebook | None] = [None, None, None]
        if self.quantized:
            for slot, signed in enumerate(self.signed):
                books[slot] = state_codebook(signed, device, self.bits)
        return books

    def call(self, case: Case, **fields: Any) -> FusedStepCall:
        """The call of `case` on these tensors; `fields` (grad_scale, seed, norm_out, ...) override."""
        device = self.params[0].device if self.params else torch.device("cpu")
        offsets = self.offsets if self.offsets is not None else [0] * len(self.params)
        arguments = {
            "rule": case.rule,
            "wd_mode": case.wd_mode,
            "constants": case.step.vector(),
            "params": self.params,
            "grads": self.grads,
            "states": self.states,
            "absmaxes": self.absmaxes,
            "codebooks": self.codebooks(device),
            "segment_offsets": offsets,
            "blocksize": self.blocksize,
            "errors": self.errors,
        }
        return FusedStepCall(**{**arguments, **fields})
