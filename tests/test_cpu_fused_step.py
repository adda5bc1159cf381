"""The CPU fused optimizer step against the plain-PyTorch reference, bit for bit.

Every case runs load_backend("cpu").fused_step and REFERENCE.fused_step on
clones of the same inputs (several segments of odd sizes in one call) and
compares parameters, 8- and 4-bit codes (4-bit: packed bytes, so an odd
segment's unused high nibble too) and absmax, float32 states and the
non-finite count to the last bit, NaN payloads included, and norm_out to
float64 rounding (the kernel adds in another order).

The reference computes square roots correctly rounded (through float64), as
the kernels' sqrtf does; torch.sqrt itself is not correctly rounded on every
CPU (see reference_optim._sqrt).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CPU_BUILD_FAILURE
from fused_step_cases import CASES, CASES_BY_NAME, Case, StepTensors, state_codebook
from helpers import KERNEL_VARIANTS

from dist8bit.backends import BACKEND_ENV, REFERENCE, load_backend
from dist8bit.backends.compiled import _operator_arguments
from dist8bit.backends.rules import Rule
from dist8bit.quant.codebook import Codebook
from dist8bit.quant.layout import num_blocks
from dist8bit.quant.packing import code_bytes
from dist8bit.quant.weight_error import compensated_values, error_dtype

pytestmark = pytest.mark.skipif(CPU_BUILD_FAILURE is not None, reason="the CPU extension could not be built")

CPU = torch.device("cpu")
SIZES = (0, 1, 255, 256, 257, 5000, 70000)
BITS_DTYPE = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# (state bits, blocksize); 32-bit states ignore the blocksize.
PRECISIONS = [(8, 64), (8, 256), (8, 4096), (32, 256)]
PRECISION_IDS = ["8bit-64", "8bit-256", "8bit-4096", "32bit"]
# (param dtype, grad dtype)
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
DTYPE_IDS = ["fp32", "fp16", "fp16-fp32grad", "bf16", "bf16-fp32grad"]


@pytest.fixture(scope="module")
def cpu():
    return load_backend("cpu")


@pytest.fixture
def reference():
    return REFERENCE


def make_inputs(
    case: Case,
    state_bits: int,
    blocksize: int,
    param_dtype: torch.dtype,
    grad_dtype: torch.dtype,
    sizes=SIZES,
    seed: int = 0,
    nonfinite: bool = True,
) -> StepTensors:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(param_dtype) for n in sizes]
    grads = []
    for n in sizes:
        grad = torch.randn(n, generator=gen) * torch.exp(torch.empty(n).uniform_(-6, 2, generator=gen))
        if nonfinite and n > 4:
            grad[torch.randint(0, n, (max(1, n // 500),), generator=gen)] = float("nan")
            grad[1] = float("inf")
            grad[n - 1] = -float("inf")
        grads.append(grad.to(grad_dtype))
    states: list[list[torch.Tensor]] = [[], [], []]
    absmaxes: list[list[torch.Tensor]] = [[], [], []]
    for slot, signed in enumerate(case.signed):
        for n in sizes:
            value = torch.randn(n, generator=gen) * torch.exp(torch.empty(n).uniform_(-8, 0, generator=gen))
            if not signed:
                value = value.abs()
            if state_bits != 32:
                codes = torch.empty(code_bytes(n, state_bits), dtype=torch.uint8)
                absmax = torch.empty(num_blocks(n, blocksize))
                book = state_codebook(signed, CPU, state_bits)
                REFERENCE.quantize_blockwise(value, book, blocksize, None, codes, absmax)
                states[slot].append(codes)
                absmaxes[slot].append(absmax)
            else:
                states[slot].append(value)
    quantized = state_bits != 32
    return StepTensors(params, grads, states, absmaxes, case.signed, quantized, blocksize, bits=state_bits if quantized else 8)


def run_step(backend, case: Case, inputs: StepTensors, **fields) -> None:
    """One fused step of `case` on the tensors of `inputs`, in place; `fields` as FusedStepCall's."""
    backend.fused_step(inputs.call(case, **fields))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS_DTYPE[t.dtype]) if t.dtype in BITS_DTYPE else t


def assert_same(actual: StepTensors, expected: StepTensors, what: str = "") -> None:
    for k, (a, b) in enumerate(zip(actual.params, expected.params, strict=True)):
        mismatch = (bits(a) != bits(b)).nonzero().flatten()
        assert mismatch.numel() == 0, (
            f"{what} param {k} (numel {a.numel()}): {mismatch.numel()} differ, first at {mismatch[:4].tolist()}: "
            f"{a[mismatch[:4]].tolist()} vs {b[mismatch[:4]].tolist()}"
        )
    for slot in range(3):
        for k, (a, b) in enumerate(zip(actual.states[slot], expected.states[slot], strict=True)):
            mismatch = (bits(a) != bits(b)).nonzero().flatten()
            assert mismatch.numel() == 0, (
                f"{what} state{slot + 1}[{k}] (numel {a.numel()}): {mismatch.numel()} differ, first at "
                f"{mismatch[:4].tolist()}: {a[mismatch[:4]].tolist()} vs {b[mismatch[:4]].tolist()}"
            )
        for k, (a, b) in enumerate(zip(actual.absmaxes[slot], expected.absmaxes[slot], strict=True)):
            assert torch.equal(bits(a), bits(b)), f"{what} absmax{slot + 1}[{k}]"
    for k, (a, b) in enumerate(zip(actual.errors, expected.errors, strict=True)):
        mismatch = (a != b).nonzero().flatten()
        assert mismatch.numel() == 0, (
            f"{what} errors[{k}] (numel {a.numel()}): {mismatch.numel()} differ, first at {mismatch[:4].tolist()}: "
            f"{a[mismatch[:4]].tolist()} vs {b[mismatch[:4]].tolist()}"
        )


@pytest.mark.parametrize("param_dtype,grad_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("state_bits,blocksize", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_reference(cpu, reference, case, state_bits, blocksize, param_dtype, grad_dtype):
    """Two consecutive steps with non-finite gradients, grad_scale and update_scale."""
    check_two_steps(cpu, reference, case, make_inputs(case, state_bits, blocksize, param_dtype, grad_dtype))


# 4-bit states: every case with state slots at the 4-bit default blocksize in
# float32; the other dtypes and blocksizes on the rules with the most slots
# (the parameter side is the 8-bit tests' code, shared).
FOUR_BIT = [(case.name, 128, torch.float32, torch.float32) for case in CASES if case.signed] + [
    ("adamw", 64, torch.float16, torch.float16),
    ("adamw", 256, torch.bfloat16, torch.float32),
    ("adamw", 4096, torch.float32, torch.bfloat16),
    ("ademamix", 64, torch.bfloat16, torch.bfloat16),
    ("ademamix", 2048, torch.float16, torch.float32),
    ("rmsprop-momentum", 4096, torch.bfloat16, torch.float16),
]


@pytest.mark.parametrize(
    "name,blocksize,param_dtype,grad_dtype",
    FOUR_BIT,
    ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}".replace("torch.", "") for c in FOUR_BIT],
)
def test_4bit_matches_reference(cpu, reference, name, blocksize, param_dtype, grad_dtype):
    """4-bit states, packed two per byte: two steps with non-finite gradients, grad_scale and update_scale."""
    case = CASES_BY_NAME[name]
    check_two_steps(cpu, reference, case, make_inputs(case, 4, blocksize, param_dtype, grad_dtype))


def check_two_steps(cpu, reference, case: Case, inputs: StepTensors, steps: int = 2) -> None:
    """`steps` steps of `case` on the CPU and the reference (the first with grad_scale and update_scale) agree bit for bit."""
    mine, theirs = inputs.copy(), inputs.copy()
    n = len(inputs.params)
    gen = torch.Generator().manual_seed(1)
    grad_scale = torch.rand(n, generator=gen) + 0.5
    update_scale = torch.rand(n, generator=gen) + 0.5
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
    for step in range(steps):
        scales = {"grad_scale": grad_scale, "update_scale": update_scale} if step == 0 else {}
        run_step(cpu, case, mine, **scales, nonfinite_count=counts[0])
        run_step(reference, case, theirs, **scales, nonfinite_count=counts[1])
        assert_same(mine, theirs, f"step {step}")
    assert counts[0].item() == counts[1].item() > 0


def check_skipped_third_segment(cpu, reference, case: Case, inputs: StepTensors) -> tuple[StepTensors, torch.Tensor]:
    """One step of three segments on the CPU and the reference, every scaled gradient of the third
    non-finite: they agree bit for bit and count at least that segment. Returns the CPU result and the scales."""
    mine, theirs = inputs.copy(), inputs.copy()
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
    grad_scale = torch.tensor([1.0, 1.0, float("inf")])  # segment 2: every scaled gradient is non-finite
    run_step(cpu, case, mine, grad_scale=grad_scale, nonfinite_count=counts[0])
    run_step(reference, case, theirs, grad_scale=grad_scale, nonfinite_count=counts[1])
    assert_same(mine, theirs)
    assert counts[0].item() == counts[1].item() >= inputs.params[2].numel()
    return mine, grad_scale


NORM_PRECISIONS = [(*precision, name) for precision in PRECISIONS for name in CASES_BY_NAME] + [
    (4, 128, name) for name in ("lamb-in-direction", "lars", "ademamix")
]


@pytest.mark.parametrize(
    "state_bits,blocksize,name", NORM_PRECISIONS, ids=[f"{name}-{bits}bit-{size}" for bits, size, name in NORM_PRECISIONS]
)
def test_norm_out_only_sums(cpu, reference, name, state_bits, blocksize):
    """norm_out: sum(d^2) over finite elements per segment, nothing else written."""
    case = CASES_BY_NAME[name]
    inputs = make_inputs(case, state_bits, blocksize, torch.float32, torch.float32)
    mine = inputs.copy()
    n = len(SIZES)
    norms = [torch.full((n,), -1.0, dtype=torch.float64) for _ in range(2)]
    count = torch.zeros(1, dtype=torch.int64)
    grad_scale = torch.linspace(0.5, 2.0, n)
    run_step(cpu, case, mine, grad_scale=grad_scale, norm_out=norms[0], nonfinite_count=count)
    run_step(reference, case, inputs.copy(), grad_scale=grad_scale, norm_out=norms[1])
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-12, atol=0.0)
    assert norms[0][0].item() == 0.0  # the empty segment
    assert count.item() == 0
    assert_same(mine, inputs, "norm mode must not modify")


ROUNDING_CASES = [(name, bits, 256) for name in ("adamw", "sgd", "lion", "ademamix") for bits in (8, 32)] + [
    (name, 4, 128) for name in ("adamw", "lion", "ademamix")
]


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32grad", "bf16grad"])
@pytest.mark.parametrize(
    "name,state_bits,blocksize", ROUNDING_CASES, ids=[f"{name}-{bits}bit" for name, bits, _ in ROUNDING_CASES]
)
def test_bf16_stochastic_rounding(cpu, reference, name, state_bits, blocksize, grad_dtype):
    """Parameters rounded by the hash of (seed, segment_offsets[k] + i), also across a 2^32 boundary."""
    case = CASES_BY_NAME[name]
    inputs = make_inputs(case, state_bits, blocksize, torch.bfloat16, grad_dtype)
    offsets = [(1 << 32) - 300 + 7 * k if k % 2 else (k << 40) + 12345 for k in range(len(SIZES))]
    mine, theirs = inputs.copy(), inputs.copy()
    for seed in (0, 2**62 + 12345):
        run_step(cpu, case, mine, segment_offsets=offsets, seed=seed)
        run_step(reference, case, theirs, segment_offsets=offsets, seed=seed)
        assert_same(mine, theirs, f"seed {seed}")
    rounded = make_inputs(case, state_bits, blocksize, torch.bfloat16, grad_dtype)
    run_step(cpu, case, rounded, segment_offsets=offsets)
    assert not all(torch.equal(a, b) for a, b in zip(rounded.params, inputs.params, strict=True))


def test_seed_is_ignored_for_float16(cpu, reference):
    case = CASES_BY_NAME["adamw"]
    inputs = make_inputs(case, 8, 256, torch.float16, torch.float16)
    mine, theirs = inputs.copy(), inputs.copy()
    run_step(cpu, case, mine, seed=5)
    run_step(reference, case, theirs, seed=5)
    assert_same(mine, theirs)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    "state_bits,blocksize", [(8, 64), (8, 256), (32, 256), (4, 64)], ids=["8bit-64", "8bit-256", "32bit", "4bit-64"]
)
@pytest.mark.parametrize("name", ["adamw", "sgd-momentum", "rmsprop-momentum", "lion", "ademamix"])
def test_special_values(cpu, reference, name, state_bits, blocksize, param_dtype):
    """NaN/Inf parameters and states, all-zero and tiny blocks (absmax 0, 1/absmax = inf), huge gradients."""
    case = CASES_BY_NAME[name]
    sizes = (300, 1000, 4095)
    inputs = make_inputs(case, state_bits, blocksize, param_dtype, torch.float32, sizes=sizes, seed=3)
    inputs.params[0][:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0]).to(param_dtype)
    inputs.params[2][7] = float("nan")
    inputs.grads[1][:64] = 0.0  # zero gradients over a zero state: an all-zero block
    inputs.grads[1][64:70] = torch.tensor([3e38, -3e38, 1e30, -1e-30, 1e-40, 0.0])
    inputs.grads[2][:300] = torch.randn(300) * 1e-39  # subnormal gradients
    for slot in range(len(case.signed)):
        if state_bits != 32:
            zero_code = int(torch.searchsorted(inputs.codebooks(CPU)[slot].thresholds, torch.tensor([0.0])).item())
            inputs.states[slot][1][: code_bytes(64, state_bits)] = zero_code | (zero_code << 4 if state_bits == 4 else 0)
            inputs.absmaxes[slot][1][0] = 0.0
            inputs.absmaxes[slot][2][1] = 1e-40  # 1 / absmax overflows
            inputs.absmaxes[slot][2][2] = float("inf")
            inputs.absmaxes[slot][2][3] = float("nan")
        else:
            inputs.states[slot][1][:64] = 0.0
            inputs.states[slot][2][3] = float("nan")
            inputs.states[slot][2][4] = float("inf")
            inputs.states[slot][2][5] = 1e-42
    check_skipped_third_segment(cpu, reference, case, inputs)


@pytest.mark.parametrize("state_bits", [8, 4], ids=["8bit", "4bit"])
def test_many_segments_and_empty_calls(cpu, reference, state_bits):
    """Hundreds of small segments (parallel work split across them) and calls with nothing to do."""
    case = CASES_BY_NAME["adamw"]
    gen = torch.Generator().manual_seed(7)
    sizes = [int(x) for x in torch.randint(0, 700, (300,), generator=gen)]
    inputs = make_inputs(case, state_bits, 64, torch.float32, torch.float32, sizes=sizes)
    mine, theirs = inputs.copy(), inputs.copy()
    norms = [torch.zeros(len(sizes), dtype=torch.float64) for _ in range(2)]
    run_step(cpu, case, mine.copy(), norm_out=norms[0])
    run_step(reference, case, theirs.copy(), norm_out=norms[1])
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-12, atol=0.0)
    run_step(cpu, case, mine)
    run_step(reference, case, theirs)
    assert_same(mine, theirs)
    empty = make_inputs(case, state_bits, 64, torch.float32, torch.float32, sizes=(0, 0))
    run_step(cpu, case, empty, norm_out=torch.zeros(2, dtype=torch.float64))
    run_step(cpu, case, make_inputs(case, state_bits, 64, torch.float32, torch.float32, sizes=()))


def on_one_and_several_threads(run):
    """run() on one thread, then on max(2, current) threads: the kernels split work by blocks, never changing a bit."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(run())
        return results
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("state_bits", [8, 4], ids=["8bit", "4bit"])
def test_thread_count_does_not_change_results(cpu, reference, state_bits):
    case = CASES_BY_NAME["ademamix"]
    inputs = make_inputs(case, state_bits, 256, torch.bfloat16, torch.float32, sizes=(100000, 3, 40000))

    def step():
        mine = inputs.copy()
        norms = torch.zeros(3, dtype=torch.float64)
        run_step(cpu, case, mine.copy(), norm_out=norms)
        run_step(cpu, case, mine, segment_offsets=[0, 5, 9], seed=11)
        return mine, norms

    results = on_one_and_several_threads(step)
    assert_same(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_rejects_bad_arguments(cpu):
    case = CASES_BY_NAME["adamw"]
    good = make_inputs(case, 8, 256, torch.float32, torch.float32, sizes=(300,))

    def call(inputs, rule=Rule.ADAM, blocksize=None, **kwargs):
        inputs = inputs.copy()
        if blocksize is not None:
            inputs.blocksize = blocksize
        run_step(cpu, Case("x", rule, case.wd_mode, case.step, case.signed), inputs, **kwargs)

    call(good)
    with pytest.raises(RuntimeError, match="state slots"):
        call(good, rule=Rule.LION)  # Lion takes one state
    with pytest.raises(RuntimeError, match="blocksize"):
        call(good, blocksize=100)
    bad = good.copy()
    bad.grads[0] = bad.grads[0][:-1]
    with pytest.raises(RuntimeError, match="grad"):
        call(bad)
    bad = good.copy()
    bad.absmaxes[1][0] = bad.absmaxes[1][0][:-1]
    with pytest.raises(RuntimeError, match="absmax"):
        call(bad)
    bad = good.copy()
    bad.params[0] = bad.params[0].double()
    with pytest.raises(RuntimeError, match="params"):
        call(bad)
    with pytest.raises(RuntimeError, match="grad_scale"):
        call(good, grad_scale=torch.ones(2))
    with pytest.raises(RuntimeError, match="nonfinite_count"):
        call(good, nonfinite_count=torch.zeros(1, dtype=torch.int32))


def test_4bit_adagrad_initial_accumulator(cpu, reference):
    """Adagrad's initial_accumulator_value in 4-bit: codes filled with 0xFF (two 15s, the code of 1.0 in the
    linear map) and absmax = the value. An odd segment's fill leaves 15 in the unused high nibble; the step
    writes it back as 0, like the reference."""
    case = CASES_BY_NAME["adagrad"]
    inputs = make_inputs(case, 4, 128, torch.float32, torch.float32, sizes=(1, 255, 1000))
    for codes, absmax in zip(inputs.states[0], inputs.absmaxes[0], strict=True):
        codes.fill_(0xFF)
        absmax.fill_(0.1)
    mine, theirs = inputs.copy(), inputs.copy()
    run_step(cpu, case, mine)
    run_step(reference, case, theirs)
    assert_same(mine, theirs)
    assert [int(codes[-1]) >> 4 for codes in mine.states[0][:2]] == [0, 0]


def test_rejects_bad_4bit_arguments(cpu):
    """Wrong code byte counts, mixed 8-/4-bit slots and a 4-bit map with an encoder table fail with the argument's name."""
    case = CASES_BY_NAME["adamw"]
    good = make_inputs(case, 4, 128, torch.float32, torch.float32, sizes=(301,))
    run_step(cpu, case, good.copy())
    bad = good.copy()
    bad.states[0][0] = torch.zeros(301, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"state1\[0\] must hold 151 bytes"):
        run_step(cpu, case, bad)
    eight = state_codebook(False, CPU, 8)
    with pytest.raises(RuntimeError, match="same bits"):
        run_step(cpu, case, good.copy(), codebooks=[state_codebook(True, CPU, 4), eight, None])
    book = state_codebook(True, CPU, 4)
    with_table = Codebook(book.code, book.thresholds, eight.encoder)
    with pytest.raises(RuntimeError, match="empty for a 4-bit map"):
        run_step(cpu, case, good.copy(), codebooks=[with_table, state_codebook(False, CPU, 4), None])
    with pytest.raises(RuntimeError, match="blocksize"):
        run_step(cpu, case, good.copy(), blocksize=100)


# ---------------------------------------------------------------------------
# Compensated bfloat16 parameters: one int8/int16 error buffer per segment
# (dist8bit/quant/weight_error.py), read into p and rewritten in the same pass.

STATE_BLOCKSIZE = {8: 64, 4: 128, 32: 256}
COMPENSATED_SIZES = (0, 1, 255, 256, 257, 5000)  # many segments: the thread test runs the long ones
GRAD_DTYPES = {"fp32grad": torch.float32, "bf16grad": torch.bfloat16}


def with_errors(inputs: StepTensors, error_bits: int, seed: int = 5) -> StepTensors:
    """`inputs` (bfloat16 params) given random error codes over the buffer's whole range, both ends first."""
    gen = torch.Generator().manual_seed(seed)
    top = torch.iinfo(error_dtype(error_bits)).max
    inputs.errors = []
    for param in inputs.params:
        q = torch.randint(-top, top + 1, (param.numel(),), generator=gen, dtype=torch.int32)
        q[:2] = torch.tensor([top, -top], dtype=torch.int32)[: param.numel()]
        inputs.errors.append(q.to(error_dtype(error_bits)))
    return inputs


def compensated_inputs(
    case: Case,
    state_bits: int,
    error_bits: int,
    grad_dtype: torch.dtype = torch.float32,
    sizes=COMPENSATED_SIZES,
    seed: int = 0,
) -> StepTensors:
    inputs = make_inputs(case, state_bits, STATE_BLOCKSIZE[state_bits], torch.bfloat16, grad_dtype, sizes=sizes, seed=seed)
    return with_errors(inputs, error_bits)


# Every rule family that reads p differently (decoupled decay, L2, momentum, sign, three states, LARS's rate)
# with both buffer widths; AdamW over every state precision and gradient dtype.
COMPENSATED = [
    ("adamw", state_bits, grad, error_bits) for state_bits in (8, 32, 4) for grad in GRAD_DTYPES for error_bits in (8, 16)
] + [
    (name, *variant)
    for name in ("adam-l2", "sgd-momentum", "lion", "ademamix", "lars")
    for variant in ((8, "bf16grad", 8), (32, "fp32grad", 16), (4, "fp32grad", 8))
]


@pytest.mark.parametrize(
    "name,state_bits,grad,error_bits", COMPENSATED, ids=[f"{n}-{b}bit-{g}-err{e}" for n, b, g, e in COMPENSATED]
)
def test_compensated_matches_reference(cpu, reference, name, state_bits, grad, error_bits):
    """Three steps (errors carried from step to step) with non-finite gradients, grad_scale and update_scale."""
    case = CASES_BY_NAME[name]
    inputs = compensated_inputs(case, state_bits, error_bits, GRAD_DTYPES[grad])
    check_two_steps(cpu, reference, case, inputs, steps=3)


@pytest.mark.parametrize("error_bits", [8, 16])
@pytest.mark.parametrize("state_bits", [8, 32], ids=["8bit", "32bit"])
def test_compensated_special_values(cpu, reference, state_bits, error_bits):
    """NaN/Inf/+-0/subnormal/largest bfloat16 params, codes at +-max, stale codes under +-0 (restored magnitude
    floored at 0), binade boundaries; skipped (non-finite gradient) elements keep p and q."""
    case = CASES_BY_NAME["adamw"]
    top = torch.iinfo(error_dtype(error_bits)).max
    sizes = (300, 1000, 77)
    inputs = compensated_inputs(case, state_bits, error_bits, sizes=sizes, seed=3)
    special = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -0.0, 2**-133, -(2**-130), 2**-126, 1.0, 2.0, 3.38e38]
    codes = [top, -top, top, -top, -top, 1, -top, top, -top, -top, -1, top]
    inputs.params[0][: len(special)] = torch.tensor(special).bfloat16()
    inputs.errors[0][: len(codes)] = torch.tensor(codes).to(inputs.errors[0].dtype)
    inputs.params[1][300:400] = (torch.randn(100) * 1e-39).bfloat16()  # subnormal parameters
    inputs.grads[1][300:400] = torch.randn(100) * 1e-36
    mine, grad_scale = check_skipped_third_segment(cpu, reference, case, inputs)
    for k, (before, after) in enumerate(zip(inputs.params, mine.params, strict=True)):
        skipped = ~torch.isfinite(inputs.grads[k] * grad_scale[k])
        kept = skipped & torch.isfinite(before) & (compensated_values(before, inputs.errors[k]) != 0)
        assert kept.sum() > 0
        assert torch.equal(bits(after[kept]), bits(before[kept])), f"segment {k}: a skipped element's p changed"
        assert torch.equal(mine.errors[k][kept], inputs.errors[k][kept]), f"segment {k}: a skipped element's q changed"
    assert mine.errors[0][:3].tolist() == [0, 0, 0]  # non-finite p carry no error


@pytest.mark.parametrize("error_bits", [8, 16])
def test_compensated_keeps_small_updates(cpu, error_bits):
    """Updates of about 1/8 of a bfloat16 ulp: plain bfloat16 parameters never move, compensated ones follow
    the float32 run to the buffer's resolution: per step at most 256 float32 ulps off with int8 (128, half of
    the 2^8 the shift drops, but 256 where the code is clamped next to a tie; tests/test_weight_error.py),
    1 with int16 (a tie), plus 1 for the float32 update's own rounding."""
    case = CASES_BY_NAME["sgd"]  # p - lr * (g + wd * p), no state
    steps, n = 10, 4096
    gen = torch.Generator().manual_seed(2)
    start = (1 + torch.rand(n, generator=gen)).bfloat16()  # [1, 2): float32 ulp 2^-23, bfloat16 ulp 2^-7
    grads = [torch.full((n,), 1e-2)]  # lr 0.1: a step of about 1e-3
    fp32 = make_inputs(case, 32, 256, torch.float32, torch.float32, sizes=(n,), nonfinite=False)
    fp32.params, fp32.grads = [start.float()], grads
    plain = fp32.copy()
    plain.params = [start.clone()]
    compensated = plain.copy()
    compensated.errors = [torch.zeros(n, dtype=error_dtype(error_bits))]
    for _ in range(steps):
        for inputs in (fp32, plain, compensated):
            run_step(cpu, case, inputs)
    assert torch.equal(plain.params[0], start)
    restored = compensated_values(compensated.params[0], compensated.errors[0])
    per_step_ulps = (256 if error_bits == 8 else 1) + 1
    torch.testing.assert_close(restored, fp32.params[0], rtol=0.0, atol=steps * per_step_ulps * 2**-23)
    assert (compensated.params[0] != start).float().mean() > 0.9


@pytest.mark.parametrize(
    "name,error_bits", [("lamb-in-direction", 8), ("adam-l2", 16), ("lars", 8), ("sgd", 16)], ids=lambda v: str(v)
)
def test_compensated_norm_out(cpu, reference, name, error_bits):
    """Norm passes read p with its error code (L2 and in-direction decay see it) and write nothing."""
    case = CASES_BY_NAME[name]
    inputs = compensated_inputs(case, 8, error_bits)
    mine = inputs.copy()
    norms = [torch.full((len(COMPENSATED_SIZES),), -1.0, dtype=torch.float64) for _ in range(2)]
    run_step(cpu, case, mine, norm_out=norms[0])
    run_step(reference, case, inputs.copy(), norm_out=norms[1])
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-12, atol=0.0)
    assert_same(mine, inputs, "norm mode must not modify")


@pytest.mark.parametrize("error_bits", [8, 16])
def test_compensated_thread_count_does_not_change_results(cpu, error_bits):
    case = CASES_BY_NAME["ademamix"]
    inputs = compensated_inputs(case, 8, error_bits, sizes=(100000, 3, 40000))

    def step():
        mine = inputs.copy()
        run_step(cpu, case, mine)
        return mine

    results = on_one_and_several_threads(step)
    assert_same(results[0], results[1])


def test_compensated_rejects_bad_arguments(cpu):
    """Error buffers only with bfloat16 params, int8/int16, one per segment of its numel, and no seed."""
    case = CASES_BY_NAME["adamw"]
    good = compensated_inputs(case, 8, 8, sizes=(300, 20))
    run_step(cpu, case, good.copy())
    for dtype in (torch.float16, torch.float32):
        bad = good.copy()
        bad.params = [p.to(dtype) for p in bad.params]
        with pytest.raises(RuntimeError, match="need bfloat16 params"):
            run_step(cpu, case, bad)
    bad = good.copy()
    bad.errors[0] = bad.errors[0].int()
    with pytest.raises(RuntimeError, match=r"errors\[0\] must be int8"):
        run_step(cpu, case, bad)
    bad = good.copy()
    bad.errors[1] = bad.errors[1].short()
    with pytest.raises(RuntimeError, match=r"errors\[1\] must be Char"):
        run_step(cpu, case, bad)
    bad = good.copy()
    bad.errors[1] = bad.errors[1][:-1]
    with pytest.raises(RuntimeError, match=r"errors\[1\] must hold 20 elements"):
        run_step(cpu, case, bad)
    bad = good.copy()
    bad.errors[1] = torch.zeros(40, dtype=torch.int8)[::2]
    with pytest.raises(RuntimeError, match=r"errors\[1\] must be contiguous"):
        run_step(cpu, case, bad)
    # The op itself, past FusedStepCall's own checks: one buffer for two segments, and a seed.
    arguments = _operator_arguments(good.copy().call(case))
    errors_at = len(arguments) - 4
    with pytest.raises(RuntimeError, match="errors must hold 0 or 2 tensors"):
        torch.ops.dist8bit.fused_step(*arguments[:errors_at], arguments[errors_at][:1], *arguments[errors_at + 1 :])
    with pytest.raises(RuntimeError, match="pass no seed"):
        torch.ops.dist8bit.fused_step(*arguments[:-1], 3)


PORTABLE_CHECK = textwrap.dedent(
    """
    import sys
    import torch
    from dist8bit.backends import use_cpu_variant
    from dist8bit.backends.compiled import compiled_backend

    sys.path.insert(0, sys.argv[1])
    import test_cpu_fused_step as t

    use_cpu_variant(sys.argv[2])

    cpu = compiled_backend("cpu")
    for case in t.CASES:
        for state_bits, blocksize in ((8, 64), (32, 256), (4, 128)):
            dtypes = (
                (torch.float32, torch.float32, None),
                (torch.bfloat16, torch.float16, 3),
                (torch.bfloat16, torch.float32, None),
                (torch.float16, torch.bfloat16, None),
            )
            for param_dtype, grad_dtype, seed in dtypes:
                inputs = t.make_inputs(case, state_bits, blocksize, param_dtype, grad_dtype, sizes=(0, 1, 257, 3000))
                mine, theirs = inputs.copy(), inputs.copy()
                counts = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
                t.run_step(cpu, case, mine, update_scale=torch.full((4,), 0.7), nonfinite_count=counts[0], seed=seed)
                t.run_step(t.REFERENCE, case, theirs, update_scale=torch.full((4,), 0.7), nonfinite_count=counts[1], seed=seed)
                t.assert_same(mine, theirs, case.name)
                assert counts[0].item() == counts[1].item()
                norms = [torch.zeros(4, dtype=torch.float64) for _ in range(2)]
                t.run_step(cpu, case, inputs.copy(), norm_out=norms[0])
                t.run_step(t.REFERENCE, case, inputs.copy(), norm_out=norms[1])
                torch.testing.assert_close(norms[0], norms[1], rtol=1e-12, atol=0.0)
        for state_bits, error_bits in ((8, 8), (32, 16), (4, 16)):
            inputs = t.compensated_inputs(case, state_bits, error_bits, torch.float16, sizes=(0, 1, 257, 3000))
            mine, theirs = inputs.copy(), inputs.copy()
            for _ in range(2):
                t.run_step(cpu, case, mine, update_scale=torch.full((4,), 0.7))
                t.run_step(t.REFERENCE, case, theirs, update_scale=torch.full((4,), 0.7))
            t.assert_same(mine, theirs, f"{case.name} compensated")
            norms = [torch.zeros(4, dtype=torch.float64) for _ in range(2)]
            t.run_step(cpu, case, inputs.copy(), norm_out=norms[0])
            t.run_step(t.REFERENCE, case, inputs.copy(), norm_out=norms[1])
            torch.testing.assert_close(norms[0], norms[1], rtol=1e-12, atol=0.0)
    print("portable ok")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
def test_portable_path(variant):
    """The scalar path (-DD8_PORTABLE), the AVX2 path (-mno-avx512f) and AVX-512 without VBMI
    (-mno-avx512vbmi), each built in a fresh process, against the reference, compensated too."""
    env = {k: v for k, v in os.environ.items() if k != BACKEND_ENV}
    here = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, "-c", PORTABLE_CHECK, here, variant]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0 and "portable ok" in result.stdout, result.stdout + result.stderr
