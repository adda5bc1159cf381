"""The compiled CPU kernels against the plain-PyTorch reference, bit for bit.

Codes, absmax and dequantized values must have the same bits (NaN payloads
included: the kernels write the canonical NaN torch's amax writes, and the
0xFFFF bfloat16 NaN torch's vectorised float -> bfloat16 copy writes). The
kernels are exercised on this machine's instruction set (the AVX-512 path on
AVX-512 CPUs); one slow test also builds and checks the portable path.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import KERNEL_VARIANTS, assert_same_bits, needs_compiled

import dist8bit.functional as F
from dist8bit.backends import BACKEND_ENV, load_backend
from dist8bit.quant.codebook import Codebook
from dist8bit.quant.layout import SUPPORTED_BLOCKSIZES, num_blocks
from dist8bit.quant.maps import create_dynamic_map, create_dynamic_map_4bit, create_linear_map, create_quantile_map
from dist8bit.quant.stochastic import uniform_for_indices

pytestmark = needs_compiled("cpu")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 255, 256, 257, 1000, 65537]
SEEDS = [0, 2**40 + 12345]
CODE_SENTINEL = 77
ABSMAX_SENTINEL = -123.0


def _packed_map() -> torch.Tensor:
    """200 values within 1e-5 of 0.5: no lookup table fits, the kernels binary-search."""
    packed = 0.5 + torch.arange(200, dtype=torch.float64) * 5e-8
    return torch.sort(torch.cat([packed, torch.linspace(-1.0, 1.0, 56, dtype=torch.float64)]).float()).values


MAPS = {
    "dynamic-signed": lambda: create_dynamic_map(signed=True),
    "dynamic-unsigned": lambda: create_dynamic_map(signed=False),
    "linear-signed": lambda: create_linear_map(signed=True),
    "linear-unsigned": lambda: create_linear_map(signed=False),
    "linear-4bit-padded": lambda: create_linear_map(signed=True, total_bits=4),  # repeated zeros
    "quantile": lambda: create_quantile_map(torch.randn(4096, generator=torch.Generator().manual_seed(3))),
    "packed": _packed_map,
    "wide": lambda: torch.linspace(-3.0, 3.0, 256),  # values beyond [-1, 1] are legal
    # Two -0.0 entries make a -0.0 threshold, which s = +0.0 is not above.
    "signed-zero": lambda: torch.cat(
        [torch.linspace(-1.0, -0.01, 127), torch.tensor([-0.0, -0.0]), torch.linspace(0.01, 1.0, 127)]
    ),
}


@pytest.fixture(scope="module")
def cpu():
    return load_backend("cpu")


@pytest.fixture(scope="module")
def ref():
    return load_backend("reference")


def codebook(name: str) -> Codebook:
    return F.codebook_for(MAPS[name](), torch.device("cpu"))


def quantize(backend, x: torch.Tensor, book: Codebook, blocksize: int, seed: int | None = None):
    n = x.numel()
    codes = torch.full((n,), CODE_SENTINEL, dtype=torch.uint8)
    absmax = torch.full((num_blocks(n, blocksize),), ABSMAX_SENTINEL)
    backend.quantize_blockwise(x.reshape(-1), book, blocksize, seed, codes, absmax)
    return codes, absmax


def dequantize(backend, codes: torch.Tensor, book: Codebook, absmax: torch.Tensor, blocksize: int, dtype: torch.dtype):
    out = torch.full((codes.numel(),), 99.0, dtype=dtype)
    backend.dequantize_blockwise(codes, book.code, absmax, blocksize, out)
    return out


def check(cpu, ref, x, book, blocksize, seed=None, out_dtypes=None) -> torch.Tensor:
    """Quantize on both backends, then dequantize the reference codes on both."""
    codes, absmax = quantize(cpu, x, book, blocksize, seed)
    want_codes, want_absmax = quantize(ref, x, book, blocksize, seed)
    what = f"{x.dtype} n={x.numel()} blocksize={blocksize} seed={seed}"
    assert_same_bits(absmax, want_absmax, "absmax " + what)
    assert_same_bits(codes, want_codes, "codes " + what)
    for dtype in out_dtypes or {x.dtype, torch.float32}:
        got = dequantize(cpu, want_codes, book, want_absmax, blocksize, dtype)
        assert_same_bits(got, dequantize(ref, want_codes, book, want_absmax, blocksize, dtype), f"dequantize {dtype} " + what)
    return codes


def wide_range(n: int, seed: int = 0) -> torch.Tensor:
    """Gaussian values times scales spanning 1e-9..1e9, so blocks use many codes."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * torch.exp(torch.empty(n).uniform_(-20.0, 20.0, generator=gen))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("blocksize", SUPPORTED_BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid(cpu, ref, dtype, blocksize, n):
    book = codebook("dynamic-signed")
    check(cpu, ref, wide_range(n).to(dtype), book, blocksize)
    check(cpu, ref, torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype), book, blocksize)


def special_blocks(blocksize: int) -> torch.Tensor:
    """One block per special case, then a short last block."""
    gen = torch.Generator().manual_seed(blocksize)

    def randn() -> torch.Tensor:
        return torch.randn(blocksize, generator=gen)

    nan_block, inf_block, minus_inf_block, all_special = randn(), randn(), randn(), randn()
    nan_block[blocksize // 3] = math.nan
    inf_block[5] = math.inf
    minus_inf_block[-1] = -math.inf
    all_special[:3] = torch.tensor([math.inf, -math.inf, math.nan])
    with_denormals = randn()
    with_denormals[::3] = torch.tensor(1e-40).expand_as(with_denormals[::3])
    with_denormals[1] = 1.0
    signed_zeros = torch.zeros(blocksize)
    signed_zeros[::2] = -0.0
    signed_zeros[3] = -2.5e-7
    blocks = [
        randn(),
        torch.zeros(blocksize),
        torch.full((blocksize,), -0.0),
        nan_block,
        inf_block,
        minus_inf_block,
        all_special,
        randn() * 1e-42,  # absmax a denormal whose reciprocal overflows: s = +-inf or NaN
        randn() * 2.0**-128,  # absmax a denormal whose reciprocal is finite
        with_denormals,
        randn() * 1e38,  # absmax near the float32 maximum: 1 / absmax is a denormal
        -randn().abs(),
        signed_zeros,
        randn()[: blocksize // 2 + 3],
    ]
    return torch.cat(blocks)


@pytest.mark.parametrize("seed", [None, *SEEDS])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values(cpu, ref, dtype, blocksize, seed):
    x = special_blocks(blocksize).to(dtype)
    for name in ("dynamic-signed", "dynamic-unsigned", "linear-4bit-padded"):
        check(cpu, ref, x, codebook(name), blocksize, seed)


@pytest.mark.parametrize("name", ["dynamic-signed", "dynamic-unsigned", "linear-signed", "quantile", "packed"])
def test_values_on_thresholds(cpu, ref, name):
    """s exactly on a threshold goes to the lower code; one ulp above, to the upper one."""
    book = codebook(name)
    finite = book.thresholds[:-1]
    inf = torch.tensor(math.inf)
    values = torch.cat([finite, torch.nextafter(finite, inf), torch.nextafter(finite, -inf)])
    values = values[values.abs() <= 1.0]
    # Blocks of 256 that each hold 1.0, so absmax = 1 and s = x exactly.
    rows = torch.cat([values, torch.zeros((-values.numel()) % 255)]).view(-1, 255)
    x = torch.cat([torch.ones(rows.shape[0], 1), rows], dim=1).reshape(-1)
    codes = check(cpu, ref, x, book, 256).view(-1, 256)[:, 1:].reshape(-1)[: values.numel()]
    brute_force = (book.thresholds.unsqueeze(0) < values.unsqueeze(1)).sum(dim=1)
    assert torch.equal(codes.long(), brute_force), "code = number of thresholds strictly below s"


@pytest.mark.parametrize("seed", [None, *SEEDS])
@pytest.mark.parametrize("name", list(MAPS))
def test_maps(cpu, ref, name, seed):
    book = codebook(name)
    if name == "packed":
        assert book.encoder.numel() == 0, "this map must force the binary-search fallback"
    x = wide_range(65537, seed=1)
    x[::7] = x[::7].abs() * 1e-3  # more values near zero and positive (unsigned maps)
    x[::11] = 0.0
    x[::13] = -0.0
    for dtype in DTYPES:
        for blocksize in (64, 4096):
            check(cpu, ref, x.to(dtype), book, blocksize, seed, out_dtypes=[dtype])


@pytest.mark.parametrize("seed", SEEDS)
def test_stochastic_ties(cpu, ref, seed):
    """Draws with u exactly equal to the fraction must round down (u < fraction is strict)."""
    book = F.codebook_for(torch.arange(-128, 128, dtype=torch.float32) / 128, torch.device("cpu"))
    n = 4096
    u = uniform_for_indices(seed, torch.arange(n))
    x = u * 2.0**-7  # s = u * 2^-7 between the codes 0 and 2^-7, so the fraction is exactly u
    x[::256] = 1.0  # absmax 1 in every block of 256
    codes = check(cpu, ref, x, book, 256, seed)
    assert bool((codes.view(-1, 256)[:, 1:] == 128).all())


@pytest.mark.parametrize("blocksize", [1, 3, 17, 48, 100, 5000, 16384, 16385, 40000, 65537, 70001])
def test_any_blocksize(cpu, ref, blocksize):
    """functional.quantize passes blocksize = numel; large blocks take the two-pass path."""
    x = wide_range(70001, seed=2)
    if blocksize == 40000:
        x[12345] = math.nan  # one NaN block, one regular block
    for seed in (None, 7):
        check(cpu, ref, x, codebook("dynamic-signed"), blocksize, seed, out_dtypes=[torch.float32, torch.bfloat16])
    check(cpu, ref, x[:3001].half(), codebook("linear-signed"), blocksize)


def test_blocksize_beyond_numel(cpu, ref):
    """One block however large the blocksize (the reference cannot pad to 2**40)."""
    x = wide_range(20000, seed=4)
    book = codebook("dynamic-signed")
    for blocksize, seed in ((2**40, None), (2**40, 1), (2**63 - 1, None)):
        got = quantize(cpu, x, book, blocksize, seed)
        want = quantize(ref, x, book, x.numel(), seed)
        assert_same_bits(got[0], want[0], "codes")
        assert_same_bits(got[1], want[1], "absmax")
        assert_same_bits(
            dequantize(cpu, got[0], book, got[1], blocksize, torch.float32),
            dequantize(ref, want[0], book, want[1], x.numel(), torch.float32),
        )


def test_large_tensors(cpu, ref):
    """Outputs of 8 MiB and more take non-temporal stores when 64-byte aligned; misaligned ones must not."""
    n = 2**23 + 1000
    x = wide_range(n, seed=5)
    book = codebook("dynamic-signed")
    want_codes, want_absmax = quantize(ref, x, book, 256)
    for offset in (0, 1):
        codes = torch.full((n + offset,), CODE_SENTINEL, dtype=torch.uint8)[offset:]
        absmax = torch.full((num_blocks(n, 256) + offset,), ABSMAX_SENTINEL)[offset:]
        cpu.quantize_blockwise(x, book, 256, None, codes, absmax)
        assert_same_bits(codes, want_codes, f"codes, offset {offset}")
        assert_same_bits(absmax, want_absmax, f"absmax, offset {offset}")
    for dtype in DTYPES:
        want = dequantize(ref, want_codes, book, want_absmax, 256, dtype)
        for offset in (0, 1):
            out = torch.full((n + offset,), 99.0, dtype=dtype)[offset:]
            cpu.dequantize_blockwise(want_codes, book.code, want_absmax, 256, out)
            assert_same_bits(out, want, f"dequantize {dtype}, offset {offset}")


@pytest.mark.parametrize("n", [1, 1000, 16385, 70000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_quantize(monkeypatch, dtype, n):
    A = wide_range(n, seed=n).to(dtype).reshape(-1, 1)
    results = {}
    for name in ("cpu", "reference"):
        monkeypatch.setenv(BACKEND_ENV, name)
        codes, (absmax, code) = F.quantize(A)
        results[name] = (codes, absmax, F.dequantize(codes, (absmax, code)))
    for got, want, what in zip(results["cpu"], results["reference"], ("codes", "absmax", "dequantized"), strict=True):
        assert_same_bits(got, want, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_special_scales(cpu, ref, dtype):
    """Scales that are NaN, +-Inf, 0, denormal or huge (overflowing half)."""
    book = codebook("dynamic-signed")
    blocksize = 64
    scales = torch.tensor([1.0, math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-41, 3e38, 7e4, 1e-6, -2.5, 6e4])
    codes = torch.arange(scales.numel() * blocksize - 5, dtype=torch.int64).remainder(256).to(torch.uint8)
    codes = codes[torch.randperm(codes.numel(), generator=torch.Generator().manual_seed(0))]
    got = dequantize(cpu, codes, book, scales, blocksize, dtype)
    assert_same_bits(got, dequantize(ref, codes, book, scales, blocksize, dtype), f"dequantize {dtype}")


def test_empty(cpu):
    book = codebook("dynamic-signed")
    for dtype in DTYPES:
        codes, absmax = quantize(cpu, torch.empty(0, dtype=dtype), book, 256)
        assert codes.numel() == 0 and absmax.numel() == 0
        assert dequantize(cpu, codes, book, absmax, 256, dtype).numel() == 0


def test_input_checks(cpu):
    book = codebook("dynamic-signed")
    book4 = F.codebook_for(create_dynamic_map_4bit(), torch.device("cpu"))
    x = torch.randn(300)
    codes = torch.empty(300, dtype=torch.uint8)
    absmax = torch.empty(2)
    op = torch.ops.dist8bit.quantize_blockwise
    args = (book.code, book.thresholds, book.encoder)

    def run(x=x, codes=codes, absmax=absmax, args=args, blocksize=256, seed=None):
        op(x, *args, blocksize, seed, codes, absmax)

    run()  # valid
    bad_calls = {
        "x dtype": dict(x=x.double()),
        "x layout": dict(x=torch.randn(600)[::2]),
        "codes dtype": dict(codes=codes.to(torch.int8)),
        "codes size": dict(codes=codes[:-1]),
        "absmax size": dict(absmax=torch.empty(3)),
        "absmax dtype": dict(absmax=absmax.double()),
        "blocksize": dict(blocksize=0),
        "seed": dict(seed=-1),
        "encoder size": dict(args=(book.code, book.thresholds, book.encoder[:-1])),
        "encoder dtype": dict(args=(book.code, book.thresholds, book.encoder.double())),
        "thresholds end": dict(args=(book.code, book.thresholds.clamp(max=1.0), *args[2:])),
        "code size": dict(args=(book.code[:-1], *args[1:])),
        # 4-bit maps are quantized by the reference backend (functional routes them there).
        "4-bit map": dict(args=(book4.code, book4.thresholds, book4.encoder)),
    }
    for what, kwargs in bad_calls.items():
        with pytest.raises(RuntimeError):
            run(**kwargs)
            pytest.fail(f"accepted a bad {what}")
    dq = torch.ops.dist8bit.dequantize_blockwise
    with pytest.raises(RuntimeError):
        dq(codes, book.code, torch.empty(3), 256, torch.empty(300))
    with pytest.raises(RuntimeError):
        dq(codes, book.code, absmax, 256, torch.empty(300, dtype=torch.float64))


PORTABLE_CHECK = textwrap.dedent(
    """
    import sys
    import torch
    from dist8bit.backends import load_backend, use_cpu_variant
    from dist8bit.backends.compiled import compiled_backend
    import dist8bit.functional as F
    from dist8bit.quant.maps import create_dynamic_map, create_linear_map

    use_cpu_variant(sys.argv[1])
    cpu, ref = compiled_backend("cpu"), load_backend("reference")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20001, generator=gen) * torch.exp(torch.empty(20001).uniform_(-20, 20, generator=gen))
    x[::50] = 0.0
    x[100:110] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-42, 1e-40, 0, 0, 0, 0])
    x[256:512] = 0.0
    for code in (create_dynamic_map(), create_linear_map(total_bits=4)):
        book = F.codebook_for(code, torch.device("cpu"))
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for blocksize in (64, 256, 100, 20001):
                for seed in (None, 5):
                    results = []
                    for backend in (cpu, ref):
                        codes = torch.empty(x.numel(), dtype=torch.uint8)
                        absmax = torch.empty(-(-x.numel() // blocksize))
                        backend.quantize_blockwise(x.to(dtype), book, blocksize, seed, codes, absmax)
                        out = torch.empty(x.numel(), dtype=dtype)
                        backend.dequantize_blockwise(codes, book.code, absmax, blocksize, out)
                        bits = torch.int32 if dtype == torch.float32 else torch.int16
                        results.append((codes, absmax.view(torch.int32), out.view(bits)))
                    for got, want in zip(*results):
                        assert torch.equal(got, want), (dtype, blocksize, seed)
    # The encoder against the float64 nearest-code oracle (test_encoder_exhaustive.py's values).
    sys.path.insert(0, sys.argv[2])
    import test_encoder_exhaustive as e
    for name, make in e.MAPS.items():
        code = make()
        x, mask = e.in_unit_blocks(torch.cat([e.special_values(code), e.stratified_sample(e.SAMPLES)]))
        codes, _ = F.quantize_blockwise(x, code=code, blocksize=e.BLOCK)
        wrong = int((codes.long()[mask] != e.nearest_code_oracle(code, x[mask])).sum())
        assert wrong == 0, (name, wrong)
    print("portable ok")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
def test_portable_path(variant):
    """Build the kernels as the scalar loops (-DD8_PORTABLE), the AVX2 path (-mno-avx512f) or AVX-512
    without VBMI (-mno-avx512vbmi) in a fresh process and compare."""
    env = {k: v for k, v in os.environ.items() if k != BACKEND_ENV}
    command = [sys.executable, "-c", PORTABLE_CHECK, variant, os.path.dirname(os.path.abspath(__file__))]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and "portable ok" in result.stdout, result.stdout + result.stderr
