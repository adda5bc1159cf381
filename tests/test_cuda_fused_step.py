"""The CUDA fused optimizer step against the plain-PyTorch reference, bit for bit.

Every case runs load_backend("cuda").fused_step on CUDA tensors and
REFERENCE.fused_step on CPU copies of the same inputs, then compares
parameters, codes, absmax, float32 states and the non-finite count to the last
bit (NaN only has to meet NaN: its payload is not part of the contract), and
norm_out to float64 rounding (the kernel sums in another order).

States come in three precisions (`bits`): 32 (float32 values), 8 (one code
per byte) and 4 (16-entry maps, codes packed two per byte, the optimizers'
maps: signed dynamic for signed slots, linear without zero for unsigned ones).
Every 4-bit case has "4bit" in its id, so `-k 4bit` runs exactly them.

Compensated bfloat16 parameters (issue 16: one int8 or int16 error buffer per
segment, dist8bit/quant/weight_error.py) are compared the same way, error
codes included; their tests have "compensated" in their names, so
`-k compensated` runs exactly them (gpu-check counts them as
fused_step_compensated). The oracle-side test at the end runs on the CPU: it
shows that those comparisons fail for a kernel that ignores the buffer.

The oracle runs on the CPU, where every reference operation rounds like the
kernels' (IEEE division, sqrt, no contraction); on CUDA tensors ATen may
rewrite a division by a Python scalar as a multiplication by its reciprocal.

Skipped without a CUDA GPU (the host-compiler probe of the launcher header
is in test_cuda_sources_compile.py).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from fused_step_cases import CASES, Case, StepTensors, state_codebook

from dist8bit.backends import REFERENCE, load_backend, reference
from dist8bit.backends.rules import Rule
from dist8bit.quant.layout import num_blocks
from dist8bit.quant.packing import code_bytes
from dist8bit.quant.weight_error import error_dtype

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS_DTYPE = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
SIZES = (1, 255, 256, 257, 5000, 70000)  # odd sizes end in a half-used byte of 4-bit codes
# (bits, blocksize): every layout family of the quantized kernels (one warp with
# several blocks, one warp per block, a group of warps, the 512-thread group of
# 4096) at 8 bits; 4 bits at 64, its default 128 and 4096; and float32 states.
PRECISIONS = [(8, 64), (8, 256), (8, 2048), (8, 4096), (4, 64), (4, 128), (4, 4096), (32, 256)]
FLOAT32_MAX = 3.4028234663852886e38
ODD_TAIL_GARBAGE = 0xA0  # planted in the unused high nibble of odd 4-bit runs: the step must write 0 there


def precision_id(value) -> str:
    """Test ids like `4bit-128` (quantized) or `32bit` (float32 states)."""
    if isinstance(value, tuple):
        bits, blocksize = value
        return f"{bits}bit" if bits == 32 else f"{bits}bit-{blocksize}"
    return f"{value}bit" if isinstance(value, int) else str(value)


CASE_BY_NAME = {case.name: case for case in CASES}


def spread(n: int, generator: torch.Generator, low: float, high: float) -> torch.Tensor:
    """Normal values whose magnitudes spread over 10**low .. 10**high."""
    values = torch.randn(n, generator=generator)
    return values * torch.pow(10.0, torch.empty(n).uniform_(low, high, generator=generator))


def make_inputs(
    case: Case,
    sizes,
    param_dtype: torch.dtype,
    grad_dtype: torch.dtype,
    bits: int,
    blocksize: int,
    seed: int = 0,
    nonfinite: bool = False,
) -> StepTensors:
    """Random parameters, gradients and states on the CPU, states of `bits` (32, 8 or 4).

    Quantized states are encoded by the reference; 4-bit ones are 1-D packed
    codes whose odd tail carries ODD_TAIL_GARBAGE in its unused high nibble
    (the reference writes 0 there, so a kernel that keeps it fails)."""
    quantized = bits != 32
    g = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for n in sizes:
        shape = (350, 200) if n == 70000 else (n,)  # one 2-D parameter among the usual sizes
        params.append(spread(n, g, -2, 0.5).to(param_dtype).view(shape))
        grad = spread(n, g, -5, 0.3)
        if nonfinite and n > 0:
            where = torch.randint(0, n, (max(1, n // 61),), generator=g)
            specials = torch.tensor([float("inf"), float("-inf"), float("nan")])
            grad[where] = specials[torch.arange(where.numel()) % 3]
        grads.append(grad.to(grad_dtype).view(shape))
    states: list[list[torch.Tensor]] = [[], [], []]
    absmaxes: list[list[torch.Tensor]] = [[], [], []]
    for slot, signed in enumerate(case.signed):
        book = state_codebook(signed, CPU, bits) if quantized else None
        for n, param in zip(sizes, params, strict=True):
            values = spread(n, g, -6, -1)
            if not signed:
                values = values.abs()
            if not quantized:
                states[slot].append(values.reshape(param.shape))
                continue
            codes = torch.zeros(code_bytes(n, bits), dtype=torch.uint8)
            scales = torch.zeros(num_blocks(n, blocksize), dtype=torch.float32)
            reference.quantize_blockwise(values, book, blocksize, None, codes, scales)
            if scales.numel() > 2:
                scales[1] = 0.0  # a block of zeros (1 / absmax = inf on the way back)
            if bits == 4 and n % 2:
                codes[-1] |= ODD_TAIL_GARBAGE
            states[slot].append(codes.reshape(param.shape) if bits == 8 else codes)
            absmaxes[slot].append(scales)
    offsets = [(k << 33) + 12345 * k for k in range(len(sizes))]  # uses the high 32 bits of the index
    return StepTensors(params, grads, states, absmaxes, case.signed, quantized, blocksize, offsets, bits=bits)


def run(
    backend,
    device: torch.device,
    case: Case,
    inputs: StepTensors,
    *,
    grad_scale: torch.Tensor | None = None,
    update_scale: torch.Tensor | None = None,
    norm: bool = False,
    count: bool = False,
    seed: int | None = None,
):
    """One step on copies of `inputs` on `device`; returns (tensors, norm_out, nonfinite_count)."""
    t = inputs.copy(device)
    segments = len(t.params)
    norm_out = torch.full((segments,), -1.0, dtype=torch.float64, device=device) if norm else None
    nonfinite = torch.full((1,), 5, dtype=torch.int64, device=device) if count else None
    scales = {"grad_scale": grad_scale, "update_scale": update_scale}
    scales = {name: value.to(device) for name, value in scales.items() if value is not None}
    backend.fused_step(t.call(case, **scales, norm_out=norm_out, nonfinite_count=nonfinite, seed=seed))
    return t, norm_out, nonfinite


def run_in_place(backend, case: Case, t: StepTensors, *, count: bool = False, seed: int | None = None):
    """One step on the tensors of `t` themselves (no copy: keeps views as they are)."""
    device = t.params[0].device
    nonfinite = torch.full((1,), 5, dtype=torch.int64, device=device) if count else None
    backend.fused_step(t.call(case, nonfinite_count=nonfinite, seed=seed))
    return t, None, nonfinite


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal dtype, shape and bits; NaN only has to meet NaN."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.reshape(-1), expected.reshape(-1)
    if not a.is_floating_point():
        mismatch = a != e
    else:
        nan_a, nan_e = torch.isnan(a), torch.isnan(e)
        bits = BITS_DTYPE[a.dtype]
        mismatch = (nan_a != nan_e) | (~nan_a & (a.view(bits) != e.view(bits)))
    if bool(mismatch.any()):
        where = mismatch.nonzero().flatten()[:8].tolist()
        raise AssertionError(
            f"{what}: {int(mismatch.sum())} of {a.numel()} differ, first at {where}: "
            f"got {a[where].tolist()}, expected {e[where].tolist()}"
        )


def assert_same_step(actual: StepTensors, expected: StepTensors, what: str) -> None:
    for k, (p, q) in enumerate(zip(actual.params, expected.params, strict=True)):
        assert_same_bits(p, q, f"{what}: params[{k}]")
    for k, (p, q) in enumerate(zip(actual.grads, expected.grads, strict=True)):
        assert_same_bits(p, q, f"{what}: grads[{k}] (must stay untouched)")
    for slot in range(3):
        for k, (p, q) in enumerate(zip(actual.states[slot], expected.states[slot], strict=True)):
            assert_same_bits(p, q, f"{what}: state{slot + 1}[{k}]")
        for k, (p, q) in enumerate(zip(actual.absmaxes[slot], expected.absmaxes[slot], strict=True)):
            assert_same_bits(p, q, f"{what}: absmax{slot + 1}[{k}]")
    for k, (p, q) in enumerate(zip(actual.errors, expected.errors, strict=True)):
        assert_same_bits(p, q, f"{what}: errors[{k}]")


def check(case: Case, inputs: StepTensors, what: str, *, backend=None, device: torch.device | None = None, **options) -> None:
    """The backend under test (default: the CUDA kernel on the GPU) vs the CPU reference on the same
    inputs, every output compared."""
    backend = backend or load_backend("cuda")
    device = device or torch.device("cuda")
    got, got_norm, got_count = run(backend, device, case, inputs, **options)
    want, want_norm, want_count = run(REFERENCE, CPU, case, inputs, **options)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if options.get("norm"):
        assert_same_step(got, inputs, f"{what}: norm_out given, nothing else may change")
        torch.testing.assert_close(got_norm.cpu(), want_norm, rtol=1e-10, atol=0.0, msg=f"{what}: norm_out")
    else:
        assert_same_step(got, want, what)
    if options.get("count"):
        assert int(got_count.item()) == int(want_count.item()), f"{what}: nonfinite_count"


# ---------------------------------------------------------------------------
# Every rule, precision, blocksize and parameter dtype


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bits", "blocksize"), PRECISIONS, ids=precision_id)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(case, bits, blocksize, dtype):
    if not case.signed and bits != 32:
        pytest.skip("no state: the precision does not apply")
    inputs = make_inputs(case, SIZES, dtype, dtype, bits, blocksize, seed=blocksize + len(case.name) + bits)
    check(case, inputs, f"{case.name} {bits}-bit blocksize={blocksize} {dtype}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    ("bits", "blocksize"), [(8, 128), (8, 512), (8, 1024), (4, 256), (4, 512), (4, 1024), (4, 2048)], ids=precision_id
)
@pytest.mark.parametrize("case", ["adamw", "ademamix", "rmsprop-momentum"])
def test_other_blocksizes(case, bits, blocksize):
    case = CASE_BY_NAME[case]
    inputs = make_inputs(case, SIZES, torch.float32, torch.float32, bits, blocksize, seed=blocksize)
    check(case, inputs, f"{case.name} {bits}-bit blocksize={blocksize}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    ("param_dtype", "grad_dtype"),
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.bfloat16, torch.float16),
    ],
    ids=str,
)
@pytest.mark.parametrize("bits", [8, 4, 32], ids=precision_id)
def test_mixed_param_and_grad_dtypes(param_dtype, grad_dtype, bits):
    case = CASE_BY_NAME["adamw"]
    inputs = make_inputs(case, SIZES, param_dtype, grad_dtype, bits, 256 if bits == 8 else 128, seed=3)
    check(case, inputs, f"params {param_dtype}, grads {grad_dtype}, {bits}-bit")


# ---------------------------------------------------------------------------
# Scales, non-finite gradients, norms


def segment_scales(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grad_scale = torch.rand(count, generator=g) + 0.5
    grad_scale[-1] = FLOAT32_MAX  # overflows the larger gradients to inf: skipped and counted
    update_scale = torch.rand(count, generator=g) * 2
    update_scale[0] = 0.0
    return grad_scale, update_scale


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bits", "blocksize"), [(8, 256), (8, 2048), (4, 128), (32, 256)], ids=precision_id)
@pytest.mark.parametrize("case", ["adamw", "lamb-in-direction", "sgd", "sgd-momentum", "lion", "ademamix"])
def test_scales_and_nonfinite_gradients(case, bits, blocksize, dtype):
    case = CASE_BY_NAME[case]
    inputs = make_inputs(case, SIZES, dtype, dtype, bits, blocksize, seed=7, nonfinite=True)
    grad_scale, update_scale = segment_scales(len(SIZES), seed=blocksize)
    what = f"{case.name} {bits}-bit blocksize={blocksize} {dtype}"
    check(case, inputs, what + " (no scales)", count=True)
    check(case, inputs, what + " (grad_scale)", grad_scale=grad_scale, count=True)
    check(case, inputs, what + " (update_scale)", update_scale=update_scale, count=True)
    check(case, inputs, what + " (both)", grad_scale=grad_scale, update_scale=update_scale, count=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(("bits", "blocksize"), [(8, 64), (8, 4096), (4, 128), (32, 256)], ids=precision_id)
@pytest.mark.parametrize("case", ["lamb-in-direction", "adamw", "sgd-momentum", "ademamix"])
def test_norm_out_writes_only_the_norms(case, bits, blocksize):
    case = CASE_BY_NAME[case]
    sizes = (*SIZES, 0, 3)  # an empty segment has norm 0
    inputs = make_inputs(case, sizes, torch.float32, torch.float32, bits, blocksize, seed=11, nonfinite=True)
    check_norm_passes(case, inputs, f"{case.name} norm")


def check_norm_passes(case, inputs, what: str) -> None:
    """Norm passes over `inputs` (its last two segments hold 0 and 3 elements) match the reference,
    without and with per-segment grad scales, writing only the norms (and the count)."""
    grad_scale, _ = segment_scales(len(inputs.params), seed=2)
    check(case, inputs, what, norm=True, count=True)
    check(case, inputs, f"{what} with grad_scale", norm=True, grad_scale=grad_scale)


# ---------------------------------------------------------------------------
# Stochastic rounding of bfloat16 parameters


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4, 32], ids=precision_id)
@pytest.mark.parametrize("seed", [0, 12345, 2**63 - 1])
def test_stochastic_rounding(seed, bits, dtype):
    """bfloat16 parameters round stochastically at segment_offsets[k] + i; other dtypes ignore the seed."""
    case = CASE_BY_NAME["adamw"]
    inputs = make_inputs(case, SIZES, dtype, torch.float32, bits, 256, seed=5, nonfinite=True)
    check(case, inputs, f"seed={seed} {dtype} {bits}-bit", seed=seed, count=True)
    lion = CASE_BY_NAME["lion"]
    check(lion, make_inputs(lion, SIZES, dtype, dtype, bits, 64, seed=6), f"lion seed={seed} {bits}-bit", seed=seed)


@pytest.mark.gpu
@needs_gpu
def test_stochastic_rounding_uses_the_seed():
    case = CASE_BY_NAME["sgd"]
    inputs = make_inputs(case, (50_000,), torch.bfloat16, torch.float32, 32, 256, seed=1)
    cuda = load_backend("cuda")
    device = torch.device("cuda")
    a, _, _ = run(cuda, device, case, inputs, seed=1)
    b, _, _ = run(cuda, device, case, inputs, seed=1)
    c, _, _ = run(cuda, device, case, inputs, seed=2)
    assert torch.equal(a.params[0], b.params[0]) and not torch.equal(a.params[0], c.params[0])


# ---------------------------------------------------------------------------
# Layouts: unaligned segments, many segments, empty calls, several steps


def unaligned(inputs: StepTensors, shift: int, error_shift: int | None = None) -> StepTensors:
    """The same values as views into shared flat buffers, every segment `shift` elements past alignment
    (error buffers `error_shift`, default `shift`)."""

    def pack(tensors: list[torch.Tensor], shift: int = shift) -> list[torch.Tensor]:
        if not tensors:
            return []
        total = sum(t.numel() + shift for t in tensors)
        buffer = torch.zeros(total + shift, dtype=tensors[0].dtype, device=tensors[0].device)
        views, at = [], shift
        for t in tensors:
            view = buffer[at : at + t.numel()].view(t.shape)
            view.copy_(t)
            views.append(view)
            at += t.numel() + shift
        return views

    return StepTensors(
        pack(inputs.params),
        pack(inputs.grads),
        [pack(slot) for slot in inputs.states],
        [pack(slot) for slot in inputs.absmaxes],
        inputs.signed,
        inputs.quantized,
        inputs.blocksize,
        inputs.offsets,
        inputs.bits,
        pack(inputs.errors, shift if error_shift is None else error_shift),
    )


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shift", [1, 2, 3])
@pytest.mark.parametrize(("bits", "blocksize"), [(8, 64), (8, 256), (8, 2048), (4, 128), (32, 256)], ids=precision_id)
def test_unaligned_segments(bits, blocksize, shift, dtype):
    """Segments that start inside a vector take the per-element accesses and still agree (4-bit: codes at odd bytes)."""
    case = CASE_BY_NAME["ademamix"]
    inputs = make_inputs(case, SIZES, dtype, dtype, bits, blocksize, seed=shift, nonfinite=True)
    views = unaligned(inputs.copy(torch.device("cuda")), shift)
    assert views.params[0].data_ptr() % 16 != 0
    got, _, got_count = run_in_place(load_backend("cuda"), case, views, count=True, seed=9)
    want, _, want_count = run(REFERENCE, CPU, case, inputs, count=True, seed=9)
    assert_same_step(got, want, f"shift={shift}")
    assert int(got_count.item()) == int(want_count.item())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(("bits", "blocksize"), [(8, 64), (8, 1024), (4, 128), (32, 256)], ids=precision_id)
def test_many_segments(bits, blocksize):
    """Thousands of segments, empty ones among them: the unit-to-segment search over a long table."""
    g = torch.Generator().manual_seed(blocksize)
    sizes = [int(v) for v in torch.randint(0, 700, (3000,), generator=g)]
    sizes[::7] = [0] * len(sizes[::7])
    sizes[1::97] = [blocksize * 3 + 1] * len(sizes[1::97])
    case = CASE_BY_NAME["adamw"]
    inputs = make_inputs(case, sizes, torch.bfloat16, torch.bfloat16, bits, blocksize, seed=4, nonfinite=True)
    check(case, inputs, "3000 segments", count=True, seed=3)
    check(case, inputs, "3000 segments, norm", norm=True)


@pytest.mark.gpu
@needs_gpu
def test_empty_segments_and_calls():
    case = CASE_BY_NAME["adamw"]
    for bits in (8, 4, 32):
        inputs = make_inputs(case, (0, 0, 0), torch.float32, torch.float32, bits, 256)
        check(case, inputs, "only empty segments", count=True)
        check(case, inputs, "only empty segments, norm", norm=True)
    cuda = load_backend("cuda")
    cuda.fused_step(StepTensors([], [], [[], [], []], [[], [], []], case.signed, False, 256).call(case))
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("bits", [8, 4, 32], ids=precision_id)
@pytest.mark.parametrize("case", ["adamw", "ademamix", "sgd-momentum", "adagrad"])
def test_several_steps(case, bits):
    """Each backend feeds its own outputs into its next step; every step agrees."""
    case = CASE_BY_NAME[case]
    inputs = make_inputs(case, SIZES, torch.bfloat16, torch.float32, bits, 256 if bits == 8 else 128, seed=21)
    cuda_backend = load_backend("cuda")
    got = inputs.copy(torch.device("cuda"))
    want = inputs.copy(CPU)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        grads = [spread(t.numel(), g, -5, 0).reshape(t.shape) for t in inputs.grads]
        got.grads = [t.to("cuda") for t in grads]
        want.grads = grads
        got, _, _ = run(cuda_backend, torch.device("cuda"), case, got, seed=step)
        want, _, _ = run(REFERENCE, CPU, case, want, seed=step)
        assert_same_step(got, want, f"{case.name} step {step}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("bits", [8, 4, 32], ids=precision_id)
def test_special_values(bits):
    """inf/NaN/huge parameters, NaN and subnormal scales, states at the float32 limits."""
    case = CASE_BY_NAME["adamw"]
    inputs = make_inputs(case, SIZES, torch.float32, torch.float32, bits, 64, seed=8)
    p = inputs.params[4]
    p[:6] = torch.tensor([float("inf"), float("-inf"), float("nan"), FLOAT32_MAX, -1e-45, 0.0])
    inputs.grads[4][:6] = torch.tensor([1.0, -1.0, 2.0, 1e30, 3.0, -0.0])
    if bits != 32:
        inputs.absmaxes[0][4][3] = float("nan")
        inputs.absmaxes[1][4][4] = 1e-45
        inputs.absmaxes[0][5][2] = FLOAT32_MAX
    else:
        inputs.states[0][4][10:13] = torch.tensor([float("nan"), FLOAT32_MAX, -FLOAT32_MAX])
        inputs.states[1][4][10:13] = torch.tensor([1e-45, FLOAT32_MAX, 0.0])
    check(case, inputs, "special values", count=True)


# ---------------------------------------------------------------------------
# Streams and argument checks


@pytest.mark.gpu
@needs_gpu
def test_runs_on_the_current_stream():
    case = CASE_BY_NAME["adamw"]
    inputs = make_inputs(case, (1 << 20, 777), torch.float32, torch.float32, 8, 256, seed=12)
    want, _, _ = run(REFERENCE, CPU, case, inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got, _, _ = run(load_backend("cuda"), torch.device("cuda"), case, inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert_same_step(got, want, "side stream")


@pytest.mark.gpu
@needs_gpu
def test_rejects_bad_arguments():
    case = CASE_BY_NAME["adamw"]
    inputs = make_inputs(case, (300,), torch.float32, torch.float32, 8, 256).copy(torch.device("cuda"))
    good = inputs.call(case, segment_offsets=[0], blocksize=256)
    cuda = load_backend("cuda")

    def call(**override):
        cuda.fused_step(replace(good, **override))

    with pytest.raises(RuntimeError, match="blocksize"):
        call(blocksize=100)
    with pytest.raises(RuntimeError, match="state slot"):
        call(rule=int(Rule.ADEMAMIX))
    with pytest.raises(RuntimeError, match="hyper"):
        call(constants=[0.0] * 3)
    with pytest.raises(RuntimeError, match="grads"):
        call(grads=[inputs.grads[0][:-1]])
    with pytest.raises(RuntimeError, match="absmax1"):
        call(absmaxes=[[inputs.absmaxes[0][0][:-1]], inputs.absmaxes[1], []])
    with pytest.raises(RuntimeError, match="grad_scale"):
        call(grad_scale=torch.ones(2, device="cuda"))
    with pytest.raises(RuntimeError, match="norm_out"):
        call(norm_out=torch.zeros(1, device="cuda"))  # float32, not float64
    with pytest.raises(RuntimeError, match="params"):
        call(params=[inputs.params[0].cpu()])
    with pytest.raises(RuntimeError, match="seed"):
        call(seed=-1)


@pytest.mark.gpu
@needs_gpu
def test_rejects_bad_4bit_arguments():
    """The shared contract holds on CUDA: 4-bit codes take ceil(n / 2) bytes, and one call has one code width."""
    case = CASE_BY_NAME["adamw"]
    inputs = make_inputs(case, (301,), torch.float32, torch.float32, 4, 128).copy(torch.device("cuda"))
    good = inputs.call(case, segment_offsets=[0])
    cuda = load_backend("cuda")
    with pytest.raises(RuntimeError, match=r"state1\[0\] must hold 151 bytes"):
        cuda.fused_step(replace(good, states=[[torch.zeros(301, dtype=torch.uint8, device="cuda")], *inputs.states[1:]]))
    eight_bit_book = state_codebook(False, torch.device("cuda"), 8)
    with pytest.raises(RuntimeError, match="same bits"):
        cuda.fused_step(replace(good, codebooks=[good.codebooks[0], eight_bit_book, None]))


# ---------------------------------------------------------------------------
# The oracle side, on the CPU: what the 4-bit GPU cases compare against


def test_4bit_inputs_and_the_comparison_catch_a_wrong_nibble():
    """The reference rewrites the planted odd-tail nibble to 0 and assert_same_step sees a one-nibble difference.

    Runs without a GPU: it checks the inputs and the comparison the CUDA 4-bit
    cases rely on (a kernel that kept the padding nibble, or got one code
    wrong, must fail them)."""
    case = CASE_BY_NAME["adamw"]
    inputs = make_inputs(case, (257, 1, 300), torch.float32, torch.float32, 4, 128, seed=2)
    assert [t.numel() for t in inputs.states[0]] == [129, 1, 150]
    assert int(inputs.states[0][0][-1]) >> 4 == ODD_TAIL_GARBAGE >> 4
    want, _, _ = run(REFERENCE, CPU, case, inputs)
    for slot in range(len(case.signed)):
        for codes, n in zip(want.states[slot], (257, 1, 300), strict=True):
            if n % 2:
                assert int(codes[-1]) >> 4 == 0, "the unused high nibble of an odd run must be written 0"
    kept_padding = want.copy()
    kept_padding.states[0][0][-1] |= ODD_TAIL_GARBAGE
    with pytest.raises(AssertionError, match=r"state1\[0\]: 1 of 129 differ"):
        assert_same_step(kept_padding, want, "planted padding nibble")
    wrong_code = want.copy()
    wrong_code.states[1][2][7] ^= 0x10  # element 15's code, one nibble
    with pytest.raises(AssertionError, match=r"state2\[2\]: 1 of 150 differ"):
        assert_same_step(wrong_code, want, "planted wrong code")


# ---------------------------------------------------------------------------
# Compensated bfloat16 parameters (issue 16): p is read as the bfloat16 plus its
# error code, written round-to-nearest-even, and the new code stored in the
# same pass (dist8bit/quant/weight_error.py, csrc/common/weight_error.h).

ERROR_BITS = (8, 16)
# Every way a rule reads p: decoupled decay, L2, decay in the direction, plain
# SGD, momentum, LARS's rate, RMSprop, Adagrad, Lion's sign, three states.
COMPENSATED_CASES = [
    "adamw",
    "adam-l2",
    "lamb-in-direction",
    "sgd",
    "sgd-momentum",
    "lars",
    "rmsprop-momentum",
    "adagrad",
    "lion",
    "ademamix",
]
COMPENSATED_PRECISIONS = [(8, 256), (4, 128), (32, 256)]
# SIZES without the 70000-element 2-D parameter: the CPU oracle's time, not the kernel's, bounds these
# cases (gpu-check runs every GPU test in one budget); test_compensated_layouts keeps SIZES.
COMPENSATED_SIZES = SIZES[:-1]
# Planted at the start of every segment long enough, under codes of alternating
# sign at the buffer's ends: a non-finite p carries no error (its code becomes
# 0), a negative code under +-0 floors the magnitude at 0, subnormals and the
# smallest normal cross the binade edge, the largest bfloat16 plus the largest
# code stays finite (and may round to inf after the update).
SPECIAL_PARAMS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 2**-133, -(2**-130), 2**-126, 1.0, -2.0]
SPECIAL_PARAMS += [3.38e38, -3.38e38]


def compensated_inputs(
    case: Case,
    sizes,
    bits: int,
    blocksize: int,
    error_bits: int,
    grad_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    nonfinite: bool = False,
    specials: bool = True,
) -> StepTensors:
    """make_inputs with bfloat16 parameters and one error buffer per segment: random codes over the
    buffer's whole range (both ends first), and (with `specials`) SPECIAL_PARAMS planted."""
    inputs = make_inputs(case, sizes, torch.bfloat16, grad_dtype, bits, blocksize, seed=seed, nonfinite=nonfinite)
    g = torch.Generator().manual_seed(seed + 1)
    dtype = error_dtype(error_bits)
    top = torch.iinfo(dtype).max
    special_values = torch.tensor(SPECIAL_PARAMS).bfloat16()
    ends = torch.tensor([top, -top] * len(SPECIAL_PARAMS), dtype=torch.int32)[: len(SPECIAL_PARAMS)]
    inputs.errors = []
    for param in inputs.params:
        q = torch.randint(-top, top + 1, (param.numel(),), generator=g, dtype=torch.int32)
        q[:2] = torch.tensor([top, -top], dtype=torch.int32)[: param.numel()]
        if specials and param.numel() >= 2 * len(SPECIAL_PARAMS):
            param.view(-1)[: len(SPECIAL_PARAMS)] = special_values
            q[: len(SPECIAL_PARAMS)] = ends
        inputs.errors.append(q.to(dtype).view(param.shape))
    return inputs


def compensated_id(error_bits: int) -> str:
    return f"err{error_bits}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("error_bits", ERROR_BITS, ids=compensated_id)
@pytest.mark.parametrize(("bits", "blocksize"), COMPENSATED_PRECISIONS, ids=precision_id)
@pytest.mark.parametrize("case", COMPENSATED_CASES)
def test_compensated_matches_reference(case, bits, blocksize, error_bits):
    """Every rule family, state precision and buffer width; bfloat16 gradients with the 8-bit buffer, float32 with 16."""
    case = CASE_BY_NAME[case]
    if not case.signed and bits != 32:
        pytest.skip("no state: the precision does not apply")
    grad_dtype = torch.bfloat16 if error_bits == 8 else torch.float32
    inputs = compensated_inputs(case, COMPENSATED_SIZES, bits, blocksize, error_bits, grad_dtype, seed=bits + error_bits)
    check(case, inputs, f"{case.name} {bits}-bit blocksize={blocksize} compensated err{error_bits}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("error_bits", ERROR_BITS, ids=compensated_id)
@pytest.mark.parametrize(("bits", "blocksize"), [(8, 64), (8, 2048), (8, 4096), (4, 4096)], ids=precision_id)
@pytest.mark.parametrize("case", ["adamw", "ademamix"])
def test_compensated_layouts(case, bits, blocksize, error_bits):
    """The other layout families (several blocks per warp, groups of warps, the 512-thread group)."""
    case = CASE_BY_NAME[case]
    inputs = compensated_inputs(case, SIZES, bits, blocksize, error_bits, seed=blocksize)
    check(case, inputs, f"{case.name} {bits}-bit blocksize={blocksize} compensated err{error_bits}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("error_bits", ERROR_BITS, ids=compensated_id)
@pytest.mark.parametrize(("bits", "blocksize"), [(8, 256), (32, 256)], ids=precision_id)
@pytest.mark.parametrize("case", ["adamw", "sgd-momentum", "lion"])
def test_compensated_scales_and_nonfinite_gradients(case, bits, blocksize, error_bits):
    """Skipped (non-finite) elements keep p and q; grad_scale and update_scale; the count."""
    case = CASE_BY_NAME[case]
    inputs = compensated_inputs(case, COMPENSATED_SIZES, bits, blocksize, error_bits, seed=7, nonfinite=True)
    grad_scale, update_scale = segment_scales(len(COMPENSATED_SIZES), seed=error_bits)
    what = f"{case.name} {bits}-bit compensated err{error_bits}"
    check(case, inputs, what + " (no scales)", count=True)
    check(case, inputs, what + " (both scales)", grad_scale=grad_scale, update_scale=update_scale, count=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("error_bits", ERROR_BITS, ids=compensated_id)
@pytest.mark.parametrize(("bits", "blocksize"), [(8, 64), (32, 256)], ids=precision_id)
@pytest.mark.parametrize("case", ["lamb-in-direction", "adamw"])
def test_compensated_norm_out_reads_the_compensated_p(case, bits, blocksize, error_bits):
    """The norm pass reads p with its error (LAMB's direction holds wd * p) and writes nothing else.
    No special parameters: a NaN p would make its segment's norm NaN, which hides the rest of it."""
    case = CASE_BY_NAME[case]
    sizes = (*COMPENSATED_SIZES, 0, 3)
    inputs = compensated_inputs(case, sizes, bits, blocksize, error_bits, seed=11, nonfinite=True, specials=False)
    check_norm_passes(case, inputs, f"{case.name} norm compensated")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("error_bits", ERROR_BITS, ids=compensated_id)
@pytest.mark.parametrize(("shift", "error_shift"), [(1, 1), (2, 2), (3, 3), (0, 1), (0, 2)])
@pytest.mark.parametrize(("bits", "blocksize"), [(8, 256), (32, 256)], ids=precision_id)
def test_compensated_unaligned_segments(bits, blocksize, shift, error_shift, error_bits):
    """Error buffers inside a flat buffer at any element offset: with shift 0 only the error pointer is
    misaligned, which alone must send the segment to per-element accesses."""
    case = CASE_BY_NAME["ademamix"]
    inputs = compensated_inputs(
        case, COMPENSATED_SIZES, bits, blocksize, error_bits, seed=shift + 5 * error_shift, nonfinite=True
    )
    views = unaligned(inputs.copy(torch.device("cuda")), shift, error_shift)
    assert views.errors[1].data_ptr() % 4 != 0  # at an odd element offset: no vector access for either width
    got, _, got_count = run_in_place(load_backend("cuda"), case, views, count=True)
    want, _, want_count = run(REFERENCE, CPU, case, inputs, count=True)
    assert_same_step(got, want, f"compensated shift={shift} error_shift={error_shift}")
    assert int(got_count.item()) == int(want_count.item())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    ("bits", "blocksize", "error_bits"),
    [(8, 64, 8), (4, 128, 16), (32, 256, 8)],
    ids=["8bit-64-err8", "4bit-128-err16", "32bit-err8"],
)
def test_compensated_many_segments(bits, blocksize, error_bits):
    """Hundreds of segments, empty ones among them, each with its own error buffer (the unit search
    over long tables is test_many_segments'; the oracle's per-segment cost keeps this one shorter)."""
    g = torch.Generator().manual_seed(blocksize)
    sizes = [int(v) for v in torch.randint(0, 700, (600,), generator=g)]
    sizes[::7] = [0] * len(sizes[::7])
    case = CASE_BY_NAME["adamw"]
    inputs = compensated_inputs(case, sizes, bits, blocksize, error_bits, torch.bfloat16, seed=4, nonfinite=True)
    check(case, inputs, "600 segments compensated", count=True)
    if bits == 8:
        check(case, inputs, "600 segments compensated, norm", norm=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("error_bits", ERROR_BITS, ids=compensated_id)
@pytest.mark.parametrize(
    ("case", "bits"),
    [("adamw", 8), ("adamw", 4), ("ademamix", 32), ("lion", 8)],
    ids=["adamw-8bit", "adamw-4bit", "ademamix-32bit", "lion-8bit"],
)
def test_compensated_several_steps(case, bits, error_bits):
    """Each backend feeds its own parameters, states and error codes into its next step; every step agrees."""
    case = CASE_BY_NAME[case]
    blocksize = 256 if bits == 8 else 128
    inputs = compensated_inputs(case, COMPENSATED_SIZES, bits, blocksize, error_bits, seed=21)
    cuda_backend = load_backend("cuda")
    got = inputs.copy(torch.device("cuda"))
    want = inputs.copy(CPU)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        grads = [spread(t.numel(), g, -5, 0).reshape(t.shape) for t in inputs.grads]
        got.grads = [t.to("cuda") for t in grads]
        want.grads = grads
        got, _, _ = run(cuda_backend, torch.device("cuda"), case, got)
        want, _, _ = run(REFERENCE, CPU, case, want)
        assert_same_step(got, want, f"{case.name} compensated err{error_bits} step {step}")


@pytest.mark.gpu
@needs_gpu
def test_compensated_rejects_bad_arguments():
    """The shared checks of kernel_contract.h, on CUDA: dtypes, sizes, devices, count, seed."""
    from dist8bit.backends.compiled import _operator_arguments  # the op's flat arguments, past FusedStepCall's checks

    case = CASE_BY_NAME["adamw"]
    inputs = compensated_inputs(case, (300, 40), 8, 256, 8).copy(torch.device("cuda"))
    good = inputs.call(case)
    cuda = load_backend("cuda")
    errors = list(good.errors)

    def call(**override):
        cuda.fused_step(replace(good, **override))

    with pytest.raises(RuntimeError, match=r"errors\[0\] must be int8"):
        call(errors=[e.int() for e in errors])
    with pytest.raises(RuntimeError, match=r"errors\[1\] must be"):
        call(errors=[errors[0], errors[1].short()])
    with pytest.raises(RuntimeError, match=r"errors\[0\] must hold 300 elements"):
        call(errors=[errors[0][:-1], errors[1]])
    with pytest.raises(RuntimeError, match=r"errors\[1\] is on cpu"):
        call(errors=[errors[0], errors[1].cpu()])
    float_params = [p.float() for p in inputs.params]
    with pytest.raises(RuntimeError, match="need bfloat16 params"):
        call(params=float_params, grads=[g.float() for g in inputs.grads])
    arguments = _operator_arguments(good)
    assert len(arguments[-4]) == 2 and arguments[-1] is None  # the schema's errors and seed
    with pytest.raises(RuntimeError, match="pass no seed"):
        torch.ops.dist8bit.fused_step(*arguments[:-1], 1)
    with pytest.raises(RuntimeError, match="errors must hold 0 or 2"):
        torch.ops.dist8bit.fused_step(*arguments[:-4], errors[:1], *arguments[-3:])


def test_compensated_comparison_catches_a_kernel_that_ignores_the_buffer():
    """Runs without a GPU: `check` (the comparison every compensated CUDA case uses) passes for the
    reference against itself and fails for planted defects: a step that reads p without its error
    (norm pass too), one that does not write the new codes, and a plain bfloat16 step."""
    case = CASE_BY_NAME["adamw"]
    inputs = compensated_inputs(case, (257, 1000), 8, 256, 8, seed=3)

    def planted(defect):
        return SimpleNamespace(fused_step=defect)

    def reads_without_error(call):
        REFERENCE.fused_step(replace(call, errors=[torch.zeros_like(e) for e in call.errors]))

    def keeps_old_codes(call):
        old = [e.clone() for e in call.errors]
        REFERENCE.fused_step(call)
        for error, before in zip(call.errors, old, strict=True):
            error.copy_(before)

    def plain_bf16(call):
        REFERENCE.fused_step(replace(call, errors=()))

    check(case, inputs, "reference vs itself", backend=REFERENCE, device=CPU)
    with pytest.raises(AssertionError, match=r"params\[\d\]"):
        check(case, inputs, "reads p without its error", backend=planted(reads_without_error), device=CPU)
    with pytest.raises(AssertionError, match=r"errors\[\d\]"):
        check(case, inputs, "keeps the old codes", backend=planted(keeps_old_codes), device=CPU)
    with pytest.raises(AssertionError, match=r"params\[\d\]|errors\[\d\]"):
        check(case, inputs, "plain bfloat16 step", backend=planted(plain_bf16), device=CPU)
    lamb = CASE_BY_NAME["lamb-in-direction"]  # its direction holds wd * p: the norm pass reads p
    lamb_inputs = compensated_inputs(lamb, (257, 1000), 32, 256, 16, seed=4, specials=False)
    check(lamb, lamb_inputs, "norm, reference vs itself", backend=REFERENCE, device=CPU, norm=True)
    with pytest.raises(AssertionError, match="norm_out"):
        check(lamb, lamb_inputs, "norm without the error", backend=planted(reads_without_error), device=CPU, norm=True)
