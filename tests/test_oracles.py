"""dist8bit's optimizers against textbook oracles (tests/oracles.py, which imports nothing from dist8bit).

Each case runs 20 steps with non-zero betas, weight decay and bias correction
on three parameters of about 4k elements (blocks of 256, one short last
block), with gradients that keep a direction (so momenta and the slow EMA
grow) plus noise. Every case also lists wrong oracles (a swapped beta, a
dropped term, another convention): the same comparison, with the same
tolerance, must reject each of them, so no check here passes vacuously.

32-bit: dist8bit's trajectory and the oracle's (float64) run side by side.
float32 rounds each of the ~10 operations of a step to 2^-24 relative, so
after 20 steps parameters and states may differ by up to about
20 * 10 * 6e-8 = 1.2e-5 relative, typically far less. rtol 1e-5 with atol
1e-6 (parameters of order 1, steps of order lr = 1e-2; atol scales with the
parameters) holds that: the largest error measured on every case and backend
is 0.21 of this tolerance, and a 0.1% error in one step's update exceeds it.

8-bit: each step starts the oracle from dist8bit's own parameter and
dequantized state (decoded here with the textbook dynamic map), so
quantization noise never accumulates and both checks stay sharp for all 20
steps: the parameter, which dist8bit updates from the new float32 state
before requantizing it, must match the oracle to one step's float32 rounding
(rtol 1e-6, atol 1e-7; measured worst 0.012 of the 32-bit tolerance, i.e.
0.12 of this one); the new state must be the nearest representable value to
the oracle's new state: per element its error may exceed the nearest-code
error (`oracles.nearest_code_error`, the block's absmax times the distance to
the closest code) by 1e-6 relative, for float32 rounding next to a midpoint
between two codes (measured: 1.7e-7). A dropped bias correction, a wrong beta
or a missing term moves some parameter by far more than that in the first
steps, which is what the wrong oracles show.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import oracles
import pytest
import torch

import dist8bit.optim as d8

SHAPES = ((64, 65), (4096,), (33, 130))
STEPS = 20
BLOCKSIZE = 256
RTOL, ATOL = 1e-5, 1e-6  # float32 parameters and states over 20 steps (module docstring)
STEP_RTOL, STEP_ATOL = 1e-6, 1e-7  # one step from the same inputs (8-bit checks)
STATE_SLACK = 1e-6  # relative, on top of the nearest-code error (module docstring)
# bf16 parameters: every step rounds them to 8 significant bits, and float32
# (dist8bit) and float64 (the oracle) land on different sides of a rounding
# midpoint now and then. Such an element then differs by one bf16 ulp of the
# magnitudes it passed through: measured, up to 2 such ulps on at most 4 of a
# tensor's ~4k elements, e.g. 0.0581 vs 0.0591. rtol 2^-6 (2 to 4 ulps) plus atol 1e-3
# (2 ulps at 0.06 to 0.125) allows that; a missing or L2 weight decay or a
# wrong beta moves thousands of elements by more.
BF16_RTOL, BF16_ATOL = 2**-6, 1e-3
SIGNED = {"exp_avg": True, "exp_avg_slow": True, "exp_avg_sq": False, "momentum_buffer": True}


@dataclass(frozen=True)
class Case:
    """One configuration: dist8bit's (32-bit, 8-bit) classes and arguments, its oracle, and wrong oracles."""

    name: str
    classes: tuple[Callable[..., torch.optim.Optimizer], Callable[..., torch.optim.Optimizer]]
    kwargs: dict
    oracle: object
    wrong: dict[str, object] = field(default_factory=dict)
    scale: float = 1.0  # initial parameters ~ scale * randn; atol scales with it (rounding is relative)
    zero_param: bool = False  # the second parameter starts at 0 (LAMB's ||p|| = 0 rule)


def swapped_betas(rule):
    return dataclasses.replace(rule, beta1=rule.beta2, beta2=rule.beta1)


LR, WD = 1e-2, 0.1
ADAM = oracles.Adam(lr=LR, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=WD, decoupled=False)
ADAMW = dataclasses.replace(ADAM, decoupled=True)
LION = oracles.Lion(lr=LR, beta1=0.9, beta2=0.99, weight_decay=WD)
LAMB = oracles.LAMB(lr=LR, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=WD)
LAMB_L2 = dataclasses.replace(LAMB, adam_w_mode=False)
LAMB_NO_BC = dataclasses.replace(LAMB, bias_correction=False)
LAMB_SMALL_WD = dataclasses.replace(LAMB, weight_decay=0.01)
LAMB_UNORM = dataclasses.replace(LAMB, max_unorm=0.5)  # < 1 binds: the trust-ratio step has norm ||p||
ADEMAMIX = oracles.AdEMAMix(lr=LR, beta1=0.8, beta2=0.99, beta3=0.99, alpha=5.0, eps=1e-8, weight_decay=WD)
ADEMAMIX_WARM = dataclasses.replace(ADEMAMIX, t_alpha=10, t_beta3=15)
LARS = oracles.LARS(lr=0.1, momentum=0.9, weight_decay=WD, trust_coefficient=0.02)
LARS_STEP = dataclasses.replace(LARS, trust_in_momentum=False)
LARS_KW = {"lr": 0.1, "momentum": 0.9, "weight_decay": WD, "trust_coefficient": 0.02}
LAMB_KW = {"lr": LR, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": WD}
ADAM_KW = {"lr": LR, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": WD}
LION_KW = {"lr": LR, "betas": (0.9, 0.99), "weight_decay": WD}
ADEMAMIX_KW = {"lr": LR, "betas": (0.8, 0.99, 0.99), "alpha": 5.0, "eps": 1e-8, "weight_decay": WD}

CASES = [
    Case(
        "Adam-L2",
        (d8.Adam32bit, d8.Adam8bit),
        ADAM_KW,
        ADAM,
        {"decoupled weight decay": ADAMW, "no bias correction": dataclasses.replace(ADAM, bias_correction=False)},
    ),
    Case(
        "AdamW",
        (d8.AdamW32bit, d8.AdamW8bit),
        ADAM_KW,
        ADAMW,
        {
            "L2 weight decay": ADAM,
            "betas swapped": swapped_betas(ADAMW),
            "no weight decay": dataclasses.replace(ADAMW, weight_decay=0.0),
        },
    ),
    Case(
        "Lion",
        (d8.Lion32bit, d8.Lion8bit),
        LION_KW,
        LION,
        {"betas swapped": swapped_betas(LION), "no weight decay": dataclasses.replace(LION, weight_decay=0.0)},
    ),
    Case(
        "LAMB",
        (d8.LAMB32bit, d8.LAMB8bit),
        LAMB_KW,
        LAMB,
        {
            "no trust ratio (bitsandbytes 0.50)": dataclasses.replace(LAMB, min_coeff=1.0, max_coeff=1.0),
            "no bias correction": LAMB_NO_BC,
            "L2 weight decay": LAMB_L2,
            "ratio 0 for a zero parameter": dataclasses.replace(LAMB, zero_norm_ratio=0.0),
        },
        zero_param=True,
    ),
    Case(
        "LAMB-L2",
        (d8.LAMB32bit, d8.LAMB8bit),
        {**LAMB_KW, "adam_w_mode": False},
        LAMB_L2,
        {"weight decay in the direction": LAMB, "betas swapped": swapped_betas(LAMB_L2)},
    ),
    Case(
        "LAMB-no-bias-correction",
        (d8.LAMB32bit, d8.LAMB8bit),
        {**LAMB_KW, "bias_correction": False},
        LAMB_NO_BC,
        {"bias correction": LAMB},
    ),
    Case("LAMB-max_unorm", (d8.LAMB32bit, d8.LAMB8bit), {**LAMB_KW, "max_unorm": 0.5}, LAMB_UNORM, {"no update-norm clip": LAMB}),
    Case(
        # ||p|| / ||r|| is about 40 here (||r|| >= wd ||p||, so wd must be small
        # for it to exceed 10): dist8bit applies it unclamped (the paper's
        # phi = identity), where DeepSpeed's FusedLamb would clamp it to 10.
        "LAMB-large-ratio",
        (d8.LAMB32bit, d8.LAMB8bit),
        {**LAMB_KW, "weight_decay": 0.01},
        LAMB_SMALL_WD,
        {"DeepSpeed's clamp to [0.01, 10]": dataclasses.replace(LAMB_SMALL_WD, min_coeff=0.01, max_coeff=10.0)},
        scale=50.0,
    ),
    Case(
        "LARS",
        (d8.LARS32bit, d8.LARS8bit),
        LARS_KW,
        LARS,
        {
            "trust ratio outside the momentum": LARS_STEP,
            "no weight decay": dataclasses.replace(LARS, weight_decay=0.0),
            "no momentum": dataclasses.replace(LARS, momentum=0.0),
        },
    ),
    Case(
        "LARS-trust-ratio-in-step",
        (d8.LARS32bit, d8.LARS8bit),
        {**LARS_KW, "trust_ratio_in": "step"},
        LARS_STEP,
        {"trust ratio in the momentum (the paper)": LARS},
    ),
    Case(
        "AdEMAMix",
        (d8.AdEMAMix32bit, d8.AdEMAMix8bit),
        ADEMAMIX_KW,
        ADEMAMIX,
        {"no slow EMA": dataclasses.replace(ADEMAMIX, alpha=0.0), "beta3 = beta1": dataclasses.replace(ADEMAMIX, beta3=0.8)},
    ),
    Case(
        "AdEMAMix-warmup",
        (d8.AdEMAMix32bit, d8.AdEMAMix8bit),
        {**ADEMAMIX_KW, "t_alpha": 10, "t_beta3": 15},
        ADEMAMIX_WARM,
        {
            "no alpha warm-up": dataclasses.replace(ADEMAMIX_WARM, t_alpha=None),
            "no beta3 warm-up": dataclasses.replace(ADEMAMIX_WARM, t_beta3=None),
            "beta3 warm-up twice as long": dataclasses.replace(ADEMAMIX_WARM, t_beta3=30),
        },
    ),
]


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are a few thousand elements: more threads only add barriers, which cost 100x
    on a loaded machine (measured: 28 ms instead of 0.3 ms per searchsorted of 4k values on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def problem(case: Case, dtype: torch.dtype, device: torch.device) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Initial parameters and STEPS gradients each: a fixed direction plus noise, in `dtype`."""
    generator = torch.Generator().manual_seed(0)
    params = [case.scale * torch.randn(shape, generator=generator) for shape in SHAPES]
    if case.zero_param:
        params[1].zero_()
    directions = [torch.randn(shape, generator=generator) for shape in SHAPES]
    grads = [[d + 0.5 * torch.randn(d.shape, generator=generator) for d in directions] for _ in range(STEPS)]
    return [p.to(device, dtype) for p in params], [[g.to(device, dtype) for g in step] for step in grads]


def outside(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> str | None:
    """None when |actual - expected| <= atol + rtol |expected| everywhere, else the worst element."""
    actual, expected = actual.double(), expected.double()
    excess = (actual - expected).abs() - (atol + rtol * expected.abs())
    if excess.max() <= 0:
        return None
    worst = int(excess.argmax())
    count = int((excess > 0).sum())
    return f"{count} elements outside; worst: {actual.reshape(-1)[worst]:.9g} vs {expected.reshape(-1)[worst]:.9g}"


def first_failure(checks: Callable[[object], str | None], rules: dict[str, object]) -> dict[str, str | None]:
    return {name: checks(rule) for name, rule in rules.items()}


# ------------------------------------------------------------------- 32-bit
def run_32bit(
    case: Case, device: torch.device, dtype: torch.dtype, rtol: float, atol: float, torch_state_names: bool = True
) -> dict[str, str | None]:
    """Run case.classes[0] and each oracle (the right one and the wrong ones) for STEPS steps.

    Returns, per oracle, the first disagreement (step, tensor, what) or None.
    With bf16 parameters the oracle rounds its parameters to bf16 after every
    step too, as any bf16 training does. The final states are compared too
    when the optimizer uses torch's state names (dist8bit does).
    """
    params, grads = problem(case, dtype, device)
    atol = atol * case.scale
    mine = [p.clone().requires_grad_(True) for p in params]
    optimizer = case.classes[0](mine, **case.kwargs)
    rules = {"oracle": case.oracle, **case.wrong}
    theirs = {name: [p.double() for p in params] for name in rules}
    states = {name: [rule.init_state(p.double()) for p in params] for name, rule in rules.items()}
    failures: dict[str, str | None] = dict.fromkeys(rules)
    for t in range(1, STEPS + 1):
        for p, g in zip(mine, grads[t - 1], strict=True):
            p.grad = g
        optimizer.step()
        for name, rule in rules.items():
            for i, g in enumerate(grads[t - 1]):
                new, states[name][i] = rule.step(theirs[name][i], g.double(), states[name][i], t)
                theirs[name][i] = new.to(dtype).double()
                problem_here = failures[name] is None and outside(mine[i].detach(), theirs[name][i], rtol, atol)
                if problem_here:
                    failures[name] = f"step {t}, parameter {i}: {problem_here}"
    for i, p in enumerate(mine if torch_state_names else []):
        for key, expected in states["oracle"][i].items():
            problem_here = failures["oracle"] is None and outside(optimizer.state[p][key], expected, rtol, atol)
            if problem_here:
                failures["oracle"] = f"final state {key} of parameter {i}: {problem_here}"
    return failures


def assert_oracle_only(failures: dict[str, str | None]) -> None:
    """The right oracle agrees and every wrong one is rejected by the same comparison."""
    assert failures["oracle"] is None, failures["oracle"]
    accepted = [name for name, failure in failures.items() if name != "oracle" and failure is None]
    assert not accepted, f"the comparison cannot tell dist8bit from these wrong oracles: {accepted}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_32bit_matches_textbook_oracle(backend, case):
    assert_oracle_only(run_32bit(case, backend, torch.float32, RTOL, ATOL))


def test_32bit_bf16_params_match_textbook_oracle(backend):
    """AdamW with bf16 parameters and gradients (math in float32, parameters stored in bf16)."""
    case = CASES[1]
    assert case.name == "AdamW"
    assert_oracle_only(run_32bit(case, backend, torch.bfloat16, BF16_RTOL, BF16_ATOL))


# -------------------------------------------------------------------- 8-bit
def dequantized_state(optimizer, param: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """dist8bit's 8-bit state of `param` (documented layout: <name>_codes, <name>_absmax), decoded here."""
    state = optimizer.state[param]
    decoded = {}
    for name in names:
        codes, absmax = state[name + "_codes"], state[name + "_absmax"]
        assert codes.dtype == torch.uint8 and absmax.numel() == -(-param.numel() // BLOCKSIZE), name
        decoded[name] = oracles.dequantize_blockwise(codes, absmax, oracles.dynamic_map(SIGNED[name]), BLOCKSIZE)
    return decoded


def state_outside(actual: torch.Tensor, expected: torch.Tensor, signed: bool) -> str | None:
    """None when `actual` is the nearest representable value to `expected` (up to float32 rounding)."""
    bound = oracles.nearest_code_error(expected, oracles.dynamic_map(signed), BLOCKSIZE) + STATE_SLACK * expected.abs()
    excess = (actual - expected).abs() - bound
    if excess.max() <= 0:
        return None
    worst = int(excess.argmax())
    return (
        f"{int((excess > 0).sum())} elements not the nearest code; worst: {actual.reshape(-1)[worst]:.6g} "
        f"vs {expected.reshape(-1)[worst]:.6g} (allowed error {bound.reshape(-1)[worst]:.3g})"
    )


def run_8bit(case: Case, device: torch.device) -> dict[str, str | None]:
    """Each step, every oracle starts from dist8bit's parameter and decoded state (see the module docstring)."""
    params, grads = problem(case, torch.float32, device)
    mine = [p.clone().requires_grad_(True) for p in params]
    optimizer = case.classes[1](mine, blocksize=BLOCKSIZE, **case.kwargs)
    rules = {"oracle": case.oracle, **case.wrong}
    names = list(case.oracle.init_state(params[0]))
    failures: dict[str, str | None] = dict.fromkeys(rules)
    for t in range(1, STEPS + 1):
        before = [p.detach().double() for p in mine]
        if t == 1:
            states = [case.oracle.init_state(p) for p in before]
        else:
            states = [dequantized_state(optimizer, p, names) for p in mine]
        for p, g in zip(mine, grads[t - 1], strict=True):
            p.grad = g
        optimizer.step()
        after = [dequantized_state(optimizer, p, names) for p in mine]
        for name, rule in rules.items():
            for i, g in enumerate(grads[t - 1]):
                if failures[name] is not None:
                    continue
                expected, expected_state = rule.step(before[i], g.double(), states[i], t)
                problem_here = outside(mine[i].detach(), expected, STEP_RTOL, STEP_ATOL * case.scale)
                for key in names:
                    problem_here = problem_here or state_outside(after[i][key], expected_state[key], SIGNED[key])
                if problem_here:
                    failures[name] = f"step {t}, parameter {i}: {problem_here}"
    return failures


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_8bit_matches_textbook_oracle(backend, case):
    assert_oracle_only(run_8bit(case, backend))


# ------------------------------------------------------------- bitsandbytes
# bitsandbytes' 32-bit optimizers on CPU against the same oracles: an
# implementation that shares no code with the oracles or with dist8bit. Where
# bitsandbytes follows another convention than dist8bit, it matches the oracle
# that dist8bit's test rejects (and rejects dist8bit's), which states the
# difference exactly.
BNB_CASES = [
    ("Lion32bit", LION_KW, LION, {"betas swapped": swapped_betas(LION)}),
    ("AdamW32bit", ADAM_KW, ADAMW, {"L2 weight decay": ADAM}),
    # bitsandbytes' Adam decays weights decoupled, as AdamW does; dist8bit's Adam is torch's (L2).
    ("Adam32bit", ADAM_KW, ADAMW, {"L2 weight decay (torch's and dist8bit's Adam)": ADAM}),
    # bitsandbytes 0.50's LAMB32bit is AdamW plus max_unorm (which, on CPU, it measures before bias
    # correction, so it is off here): no trust ratio. dist8bit's LAMB keeps the paper's.
    (
        "LAMB32bit",
        {**LAMB_KW, "max_unorm": 0.0},
        dataclasses.replace(LAMB, min_coeff=1.0, max_coeff=1.0),
        {"trust ratio (the paper's and dist8bit's LAMB)": LAMB},
    ),
    # bitsandbytes 0.50.2's AdEMAMix32bit fails on CPU (a shape error in its CPU kernel); its plain-torch
    # reference class runs, with both warm-ups. That class applies the warm-ups to alpha and beta3 again
    # for each parameter of a group (compounding them), so each parameter gets a group of its own.
    (
        "ademamix._ReferenceAdEMAMix",
        {**ADEMAMIX_KW, "t_alpha": 10, "t_beta3": 15},
        ADEMAMIX_WARM,
        {"no beta3 warm-up": dataclasses.replace(ADEMAMIX_WARM, t_beta3=None)},
    ),
]


@pytest.mark.parametrize(("name", "kwargs", "oracle", "wrong"), BNB_CASES, ids=[c[0] for c in BNB_CASES])
def test_bitsandbytes_32bit_matches_the_same_oracles(name, kwargs, oracle, wrong):
    bnb_optim = pytest.importorskip("bitsandbytes.optim")
    cls = bnb_optim
    for part in name.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            pytest.skip(f"this bitsandbytes has no optim.{name}")

    def one_group_each(params, **options):
        return cls([{"params": [p]} for p in params], **options)

    case = Case(f"bitsandbytes-{name}", (one_group_each, cls), kwargs, oracle, wrong)
    assert_oracle_only(run_32bit(case, torch.device("cpu"), torch.float32, RTOL, ATOL, torch_state_names=False))


# ------------------------------------------------------------- the oracles' own parts
def test_textbook_dynamic_map_is_bitsandbytes_map():
    """The map used to decode dist8bit's states here is written from the paper; bitsandbytes
    computes the same values in float32 steps, so they agree to 2 float32 ulps."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        theirs = bnb_functional.create_dynamic_map(signed=signed).double().sort().values
        torch.testing.assert_close(oracles.dynamic_map(signed), theirs, rtol=2.5e-7, atol=0.0)


def test_ademamix_beta3_warmup_follows_the_half_life():
    """The half-life form of the beta3 schedule: its half-life grows linearly in t from beta1's to beta3's."""
    rule = dataclasses.replace(ADEMAMIX, beta1=0.9, beta3=0.999, t_beta3=100)
    assert rule.beta3_at(0) == pytest.approx(0.9, rel=1e-12)
    lives = [oracles.half_life(rule.beta3_at(t)) for t in range(0, 101, 10)]
    steps = [b - a for a, b in itertools.pairwise(lives)]
    assert steps == pytest.approx([steps[0]] * len(steps), rel=1e-9)
    assert rule.beta3_at(100) == pytest.approx(0.999, rel=1e-12)
    assert rule.beta3_at(250) == 0.999
    assert dataclasses.replace(ADEMAMIX, alpha=4.0, t_alpha=8).alpha_at(2) == 1.0
