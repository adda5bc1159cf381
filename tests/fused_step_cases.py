"""Optimizer-step cases shared by the CPU and CUDA fused-step tests."""

from __future__ import annotations

from dataclasses import dataclass

from dist8bit.backends.rules import Rule, StepConstants, WeightDecay


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
