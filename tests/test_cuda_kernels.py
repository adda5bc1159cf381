"""The CUDA kernels against the plain-PyTorch reference, bit for bit, on a GPU.

Both backends run on the same CUDA tensors; codes, absmax and dequantized
values must agree to the last bit (NaN compared as NaN: its payload is not
part of the contract). Skipped without a CUDA GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import helpers
import pytest
import torch

from dist8bit.backends import load_backend, reference
from dist8bit.quant.codebook import Codebook, build_codebook
from dist8bit.quant.layout import SUPPORTED_BLOCKSIZES, num_blocks
from dist8bit.quant.maps import create_dynamic_map, create_linear_map
from dist8bit.quant.stochastic import uniform_for_indices

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAPS = {
    "dynamic-signed": lambda: create_dynamic_map(signed=True),
    "dynamic-unsigned": lambda: create_dynamic_map(signed=False),
    "linear-signed": lambda: create_linear_map(signed=True),
    "linear-unsigned": lambda: create_linear_map(signed=False),
    "linear-4bit-padded": lambda: create_linear_map(signed=True, total_bits=4),  # repeated zeros in the map
}
SEEDS = [0, 1, 12345, 2**32 + 7, 2**63 - 1]
CODE_SENTINEL = 77
ABSMAX_SENTINEL = -123.0


@pytest.fixture(scope="module")
def cuda_backend():
    return load_backend("cuda")


@pytest.fixture(scope="module")
def codebooks() -> dict[str, Codebook]:
    return {name: build_codebook(make()).to("cuda") for name, make in MAPS.items()}


# NaN compared as NaN: its payload is not part of the CUDA kernels' contract.
assert_same_bits = functools.partial(helpers.assert_same_bits, any_nan=True)


def quantize(backend, x: torch.Tensor, codebook: Codebook, blocksize: int, seed: int | None = None):
    """Run one backend's quantize_blockwise into sentinel-filled buffers."""
    n = x.numel()
    codes = torch.full((n,), CODE_SENTINEL, dtype=torch.uint8, device=x.device)
    absmax = torch.full((num_blocks(n, blocksize),), ABSMAX_SENTINEL, dtype=torch.float32, device=x.device)
    backend.quantize_blockwise(x.reshape(-1), codebook, blocksize, seed, codes, absmax)
    return codes, absmax


def dequantize(backend, codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int, dtype):
    out = torch.full((codes.numel(),), 99.0, dtype=dtype, device=codes.device)
    backend.dequantize_blockwise(codes.reshape(-1), code, absmax, blocksize, out)
    return out


def check_quantize(cuda_backend, x, codebook, blocksize, seed=None, dequantize_too=True) -> None:
    what = f"n={x.numel()} dtype={x.dtype} blocksize={blocksize} seed={seed}"
    codes, absmax = quantize(cuda_backend, x, codebook, blocksize, seed)
    ref_codes, ref_absmax = quantize(reference, x, codebook, blocksize, seed)
    assert_same_bits(absmax, ref_absmax, "absmax " + what)
    assert_same_bits(codes, ref_codes, "codes " + what)
    if dequantize_too:
        for dtype in DTYPES:
            out = dequantize(cuda_backend, codes, codebook.code, absmax, blocksize, dtype)
            ref = dequantize(reference, codes, codebook.code, absmax, blocksize, dtype)
            assert_same_bits(out, ref, f"dequantized to {dtype}, " + what)


def spread_values(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Normal values over many magnitudes, so that every code gets used."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    values = torch.randn(n, device="cuda", generator=g)
    values *= torch.pow(10.0, torch.empty(n, device="cuda").uniform_(-4, 2, generator=g))
    return values.to(dtype)


def sizes_for(blocksize: int) -> list[int]:
    edges = [blocksize - 1, blocksize, blocksize + 1, 3 * blocksize + 5, 37 * blocksize, 64 * blocksize + 17]
    return sorted({1, 2, 31, 63, 64, 65, 1000, 100_003, *edges})


# ---------------------------------------------------------------------------
# Deterministic rounding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", SUPPORTED_BLOCKSIZES)
def test_quantize_matches_reference(cuda_backend, codebooks, dtype, blocksize):
    for n in sizes_for(blocksize):
        check_quantize(cuda_backend, spread_values(n, dtype, seed=n), codebooks["dynamic-signed"], blocksize)


@pytest.mark.parametrize("map_name", list(MAPS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_map(cuda_backend, codebooks, map_name, dtype):
    x = spread_values(20_000, dtype, seed=3)
    if "unsigned" in map_name:
        x = x.abs()
    for blocksize in (64, 256, 4096, 100, 20_000):
        check_quantize(cuda_backend, x, codebooks[map_name], blocksize)


def test_every_code_and_every_midpoint(cuda_backend, codebooks):
    """Inputs on and next to every threshold of every map (the tie rule: a midpoint goes down)."""
    for name, book in codebooks.items():
        t = book.thresholds[:-1]
        around = torch.stack([t, torch.nextafter(t, t + 1), torch.nextafter(t, t - 1), book.code[:-1]], dim=1)
        x = torch.cat([torch.ones(1, device="cuda"), around.flatten()])  # absmax 1 for the first block
        for blocksize in (64, 1024, 4096, x.numel()):
            codes, absmax = quantize(cuda_backend, x, book, blocksize)
            ref_codes, ref_absmax = quantize(reference, x, book, blocksize)
            assert_same_bits(absmax, ref_absmax, name)
            assert_same_bits(codes, ref_codes, name)


# ---------------------------------------------------------------------------
# Special values


def special_blocks(dtype: torch.dtype, blocksize: int) -> torch.Tensor:
    info = torch.finfo(dtype)
    cases = [
        [float("nan")],
        [float("inf")],
        [float("-inf")],
        [float("nan"), float("inf"), -1.0],
        [0.0],
        [-0.0],
        [0.0, -0.0, 0.0],
        [info.max, -info.max, 1.0],
        [info.tiny, -info.tiny / 2, info.tiny / 8],  # normal and subnormal
        [info.tiny / 4, -info.tiny / 2],  # absmax subnormal: 1 / absmax may overflow to inf
        [1e-45, -1e-45] if dtype == torch.float32 else [info.tiny * info.eps],  # smallest subnormal
        [-2.5, 2.5, 1.25, -1.25],
        [-1.0],
        [3.0, -0.0, float("nan")],
    ]
    rows = []
    for values in cases:
        row = torch.zeros(blocksize, dtype=torch.float32)
        row[: len(values)] = torch.tensor(values, dtype=torch.float32)
        row = row[torch.randperm(blocksize, generator=torch.Generator().manual_seed(len(rows)))]
        rows.append(row)
    rows.append(torch.full((blocksize,), -0.0))
    rows.append(torch.full((blocksize,), float("nan")))
    return torch.cat(rows).to(dtype).cuda()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 2048, 4096, 100])
def test_special_values(cuda_backend, codebooks, dtype, blocksize):
    x = special_blocks(dtype, blocksize)
    for seed in (None, 5):
        for name in ("dynamic-signed", "linear-unsigned"):
            check_quantize(cuda_backend, x, codebooks[name], blocksize, seed)
            # The same values cut by the large path (one block) and a short last block.
            check_quantize(cuda_backend, x, codebooks[name], x.numel(), seed)
            check_quantize(cuda_backend, x[:-3], codebooks[name], blocksize, seed)


def test_nan_absmax_is_canonical(cuda_backend, codebooks):
    x = torch.ones(3 * 64 + 5, device="cuda")
    x[10] = float("nan")
    x[64 + 3] = -float("nan")
    x.view(torch.int32)[128:192] = 0x7F800001  # a signalling NaN with a payload
    x[-1] = float("nan")
    for blocksize in (64, 100, 100_000):  # fast, generic and large paths; every block holds a NaN
        _, absmax = quantize(cuda_backend, x, codebooks["dynamic-signed"], blocksize)
        assert bool((absmax.view(torch.int32) == 0x7FC00000).all()), absmax


# ---------------------------------------------------------------------------
# Stochastic rounding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", SUPPORTED_BLOCKSIZES)
def test_stochastic_rounding_matches_reference(cuda_backend, codebooks, dtype, blocksize):
    x = spread_values(9 * blocksize + 77, dtype, seed=blocksize)
    for seed in SEEDS:
        check_quantize(cuda_backend, x, codebooks["dynamic-signed"], blocksize, seed, dequantize_too=False)


@pytest.mark.parametrize("map_name", list(MAPS))
def test_stochastic_rounding_every_map(cuda_backend, codebooks, map_name):
    x = spread_values(50_000, torch.float32, seed=11)
    if "unsigned" in map_name:
        x = x.abs()
    for blocksize in (64, 4096, 1000, 50_000):
        for seed in (3, 2**40 + 1):
            check_quantize(cuda_backend, x, codebooks[map_name], blocksize, seed, dequantize_too=False)


def test_stochastic_rounding_depends_on_the_seed(cuda_backend, codebooks):
    x = torch.full((1 << 16,), 0.3, device="cuda")
    x[::64] = 1.0
    a, _ = quantize(cuda_backend, x, codebooks["dynamic-signed"], 64, seed=1)
    b, _ = quantize(cuda_backend, x, codebooks["dynamic-signed"], 64, seed=1)
    c, _ = quantize(cuda_backend, x, codebooks["dynamic-signed"], 64, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------
# Other block sizes (functional.quantize passes blocksize = numel) and layouts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("n", "blocksize"),
    [
        (1, 1),
        (100, 1),
        (1000, 3),
        (1000, 31),
        (1000, 32),
        (4096, 48),
        (5000, 1000),
        (50_000, 4097),
        (50_000, 8192),  # generic path, largest
        (50_000, 8193),  # large path, blocks meet inside tiles
        (100_000, 9000),
        (100_000, 16384),
        (8191, 8191),
        (100_000, 100_000),  # the whole tensor as one block
        (1_000_003, 1_000_003),
        (1_000_003, 2_000_000),  # blocksize > n
        (70_000, 64),
    ],
)
def test_any_blocksize(cuda_backend, codebooks, dtype, n, blocksize):
    x = spread_values(n, dtype, seed=n + blocksize)
    check_quantize(cuda_backend, x, codebooks["dynamic-signed"], blocksize)
    check_quantize(cuda_backend, x, codebooks["dynamic-signed"], blocksize, seed=9, dequantize_too=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [1, 2, 3, 5])
def test_unaligned_buffers(cuda_backend, codebooks, dtype, offset):
    """Views that start inside a 16-byte word take the scalar paths and still agree."""
    book = codebooks["dynamic-signed"]
    n = 10 * 256 + 9
    x = spread_values(n + offset, dtype, seed=offset)[offset:]
    for blocksize in (64, 256, 4096):
        blocks = num_blocks(n, blocksize)
        codes = torch.full((n + offset,), CODE_SENTINEL, dtype=torch.uint8, device="cuda")[offset:]
        absmax = torch.full((blocks + 1,), ABSMAX_SENTINEL, device="cuda")[1:]
        cuda_backend.quantize_blockwise(x, book, blocksize, None, codes, absmax)
        ref_codes, ref_absmax = quantize(reference, x, book, blocksize)
        assert_same_bits(codes, ref_codes, "codes")
        assert_same_bits(absmax, ref_absmax, "absmax")
        for out_dtype in DTYPES:
            out = torch.full((n + offset,), 7.0, dtype=out_dtype, device="cuda")[offset:]
            cuda_backend.dequantize_blockwise(codes, book.code, absmax, blocksize, out)
            assert_same_bits(out, dequantize(reference, ref_codes, book.code, ref_absmax, blocksize, out_dtype))
        # Aligned input, unaligned codes only.
        aligned = x.clone()
        cuda_backend.quantize_blockwise(aligned, book, blocksize, None, codes, absmax)
        assert_same_bits(codes, ref_codes, "codes, unaligned output")


def test_empty(cuda_backend, codebooks):
    book = codebooks["dynamic-signed"]
    for blocksize in (1, 64, 100):
        for dtype in DTYPES:
            codes, absmax = quantize(cuda_backend, torch.empty(0, dtype=dtype, device="cuda"), book, blocksize)
            assert codes.numel() == 0 and absmax.numel() == 0
            out = dequantize(cuda_backend, codes, book.code, absmax, blocksize, dtype)
            assert out.numel() == 0
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------
# Dequantize on its own: arbitrary codes and scales


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [1, 2, 8, 16, 17, 64, 100, 256, 4096, 10_000])
def test_dequantize_matches_reference(cuda_backend, codebooks, dtype, blocksize):
    g = torch.Generator(device="cuda").manual_seed(blocksize)
    for n in (1, 15, 16, 17, 1000, 65_537):
        codes = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda", generator=g)
        absmax = torch.randn(num_blocks(n, blocksize), device="cuda", generator=g).abs() * 100
        specials = torch.tensor([float("nan"), float("inf"), 0.0, -0.0, 1e-45, 3e38, -2.0], device="cuda")
        absmax[: specials.numel()] = specials[: absmax.numel()]
        for name in ("dynamic-signed", "linear-unsigned"):
            code = codebooks[name].code
            out = dequantize(cuda_backend, codes, code, absmax, blocksize, dtype)
            ref = dequantize(reference, codes, code, absmax, blocksize, dtype)
            assert_same_bits(out, ref, f"n={n} blocksize={blocksize} {name}")


# ---------------------------------------------------------------------------
# Streams, devices, argument checks


def test_runs_on_the_current_stream(cuda_backend, codebooks):
    book = codebooks["dynamic-signed"]
    x = spread_values(1 << 20, torch.float32, seed=4)
    expected_codes, expected_absmax = quantize(reference, x, book, 256)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        codes, absmax = quantize(cuda_backend, x, book, 256)
        out = dequantize(cuda_backend, codes, book.code, absmax, 256, torch.float32)
    torch.cuda.current_stream().wait_stream(stream)
    assert_same_bits(codes, expected_codes)
    assert_same_bits(absmax, expected_absmax)
    assert_same_bits(out, dequantize(reference, expected_codes, book.code, expected_absmax, 256, torch.float32))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device(cuda_backend):
    device = torch.device("cuda", 1)
    book = build_codebook(create_dynamic_map(signed=True)).to(device)
    x = spread_values(100_000, torch.float32, seed=2).to(device)
    codes = torch.empty(x.numel(), dtype=torch.uint8, device=device)
    absmax = torch.empty(num_blocks(x.numel(), 256), device=device)
    with torch.cuda.device(0):
        cuda_backend.quantize_blockwise(x, book, 256, 3, codes, absmax)
    ref_codes, ref_absmax = quantize(reference, x, book, 256, 3)
    assert_same_bits(codes, ref_codes)
    assert_same_bits(absmax, ref_absmax)


def test_argument_checks(cuda_backend, codebooks):
    book = codebooks["dynamic-signed"]
    x = torch.randn(1000, device="cuda")
    codes = torch.empty(1000, dtype=torch.uint8, device="cuda")
    absmax = torch.empty(4, device="cuda")
    bad_calls = {
        "absmax on the CPU": (x, codes, absmax.cpu(), 256),
        "int8 codes": (x, codes.view(torch.int8), absmax, 256),
        "short absmax": (x, codes, absmax[:3], 256),
        "short codes": (x, codes[:999], absmax, 256),
        "float64 input": (x.double(), codes, absmax, 256),
        "strided codes": (x[:500], torch.empty(1000, dtype=torch.uint8, device="cuda")[::2], absmax[:2], 256),
        "zero blocksize": (x, codes, absmax, 0),
    }
    for what, (xx, cc, aa, bs) in bad_calls.items():
        with pytest.raises(RuntimeError):
            cuda_backend.quantize_blockwise(xx, book, bs, None, cc, aa)
            pytest.fail(f"accepted {what}")
    with pytest.raises(RuntimeError):
        cuda_backend.quantize_blockwise(x, book, 256, -1, codes, absmax)
    out = torch.empty(1000, device="cuda")
    with pytest.raises(RuntimeError):
        cuda_backend.dequantize_blockwise(codes, book.code, absmax, 256, out.long())
    with pytest.raises(RuntimeError):
        cuda_backend.dequantize_blockwise(codes, book.code[:255], absmax, 256, out)
    with pytest.raises(RuntimeError):
        cuda_backend.dequantize_blockwise(codes, book.code, absmax[:3], 256, out)


def test_encoder_table_is_only_a_shortcut(cuda_backend, codebooks):
    """Without the encoder table (binary search only) every code is the same."""
    for name, book in codebooks.items():
        searching = dataclasses.replace(book, encoder=book.encoder[:0])
        for dtype in DTYPES:
            x = torch.cat([spread_values(50_000, dtype, seed=4), special_blocks(dtype, 256)])
            for blocksize in (64, 4096, 1000):
                for seed in (None, 5):
                    codes, absmax = quantize(cuda_backend, x, book, blocksize, seed)
                    ref_codes, ref_absmax = quantize(cuda_backend, x, searching, blocksize, seed)
                    what = f"{name} {dtype} blocksize={blocksize} seed={seed}"
                    assert_same_bits(codes, ref_codes, "codes " + what)
                    assert_same_bits(absmax, ref_absmax, "absmax " + what)


def test_encoder_argument_checks(cuda_backend, codebooks):
    book = codebooks["dynamic-signed"]
    x = torch.randn(1000, device="cuda")
    codes = torch.empty(1000, dtype=torch.uint8, device="cuda")
    absmax = torch.empty(4, device="cuda")
    for bad in (book.encoder[:129], book.encoder.double(), book.encoder.cpu()):
        with pytest.raises(RuntimeError, match="encoder"):
            cuda_backend.quantize_blockwise(x, dataclasses.replace(book, encoder=bad), 256, None, codes, absmax)


# ---------------------------------------------------------------------------
# CUDA against the CPU extension


def test_cuda_matches_cpu_backend(cuda_backend, codebooks):
    try:
        cpu_backend = load_backend("cpu")
    except RuntimeError as error:
        pytest.skip(f"CPU extension unavailable: {error}")
    for dtype in DTYPES:
        x = torch.cat([spread_values(100_000, dtype, seed=8), special_blocks(dtype, 256)])
        for name in ("dynamic-signed", "linear-4bit-padded"):
            book = codebooks[name]
            cpu_book = book.to("cpu")
            for blocksize in (64, 256, 4096, 1000, x.numel()):
                for seed in (None, 17):
                    codes, absmax = quantize(cuda_backend, x, book, blocksize, seed)
                    cpu_codes, cpu_absmax = quantize(cpu_backend, x.cpu(), cpu_book, blocksize, seed)
                    what = f"{dtype} {name} blocksize={blocksize} seed={seed}"
                    assert_same_bits(codes.cpu(), cpu_codes, "codes " + what)
                    assert_same_bits(absmax.cpu(), cpu_absmax, "absmax " + what)
                    for out_dtype in DTYPES:
                        out = dequantize(cuda_backend, codes, book.code, absmax, blocksize, out_dtype)
                        cpu_out = dequantize(cpu_backend, cpu_codes, cpu_book.code, cpu_absmax, blocksize, out_dtype)
                        assert_same_bits(out.cpu(), cpu_out, f"dequantized to {out_dtype}, " + what)


# ---------------------------------------------------------------------------
# 64-bit indexing


def _expected_tail(x_tail: torch.Tensor, book: Codebook, blocksize: int, seed: int | None, first_index: int):
    """Reference codes of a block-aligned tail slice whose first element has global index first_index."""
    s, absmax = reference.scaled_blocks(x_tail, blocksize)
    index = torch.searchsorted(book.thresholds, s.contiguous(), side="left")
    if seed is not None:
        code = book.code
        at_or_above = s >= code[index]
        low = torch.where(at_or_above, index, index - 1).clamp(min=0)
        high = (low + 1).clamp(max=code.numel() - 1)
        fraction = (s - code[low]) / (code[high] - code[low])
        indices = torch.arange(s.numel(), device=s.device, dtype=torch.int64) + first_index
        index = torch.where(uniform_for_indices(seed, indices) < fraction, high, low)
    return index.to(torch.uint8), absmax


@pytest.mark.slow
@pytest.mark.parametrize("seed", [None, 21])
def test_more_than_2_to_the_31_elements(cuda_backend, codebooks, seed):
    n = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    book = codebooks["dynamic-signed"]
    blocksize = 256
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    x.normal_(generator=torch.Generator(device="cuda").manual_seed(1))
    codes, absmax = quantize(cuda_backend, x, book, blocksize, seed)
    tail_start = (2**31 // blocksize - 20) * blocksize  # a block boundary below 2**31
    expected_codes, expected_absmax = _expected_tail(x[tail_start:], book, blocksize, seed, tail_start)
    assert_same_bits(codes[tail_start:], expected_codes, "codes beyond 2**31")
    assert_same_bits(absmax[tail_start // blocksize :], expected_absmax, "absmax beyond 2**31")
    out = dequantize(cuda_backend, codes, book.code, absmax, blocksize, torch.bfloat16)
    expected_out = dequantize(
        reference, codes[tail_start:], book.code, absmax[tail_start // blocksize :], blocksize, torch.bfloat16
    )
    assert_same_bits(out[tail_start:], expected_out, "dequantized beyond 2**31")
    del x, codes, absmax, out
    # The large path (one block for everything) on the same scale.
    y = torch.ones(n, dtype=torch.float16, device="cuda")
    y[-1] = -4.0
    codes, absmax = quantize(cuda_backend, y, book, n, seed)
    assert absmax.item() == 4.0
    expected_codes, _ = _expected_tail(torch.tensor([1.0, -4.0], device="cuda"), book, 2, None, 0)
    assert int(codes[-1]) == int(expected_codes[1])
    if seed is None:
        assert bool((codes[:-1] == expected_codes[0]).all())
