"""dist8bit.compat.bitsandbytes.functional / .nn against the real bitsandbytes, on CPU.

Exact (bit for bit) wherever bitsandbytes is deterministic and follows the
same rule: maps, absmax, nested offsets, decoding, state dicts, embedding
initialisation and forward. Codes are the one place the two may differ:
dist8bit picks the nearest code, bitsandbytes' CPU path sometimes another
one, so there the test checks that dist8bit's code is never the farther one.
"""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

import dist8bit.compat.bitsandbytes as compat
import dist8bit.functional as F
from dist8bit.backends import BACKEND_ENV
from dist8bit.nn import Embedding as Dist8bitEmbedding
from dist8bit.optim.overrides import GlobalOptimManager
from dist8bit.quant.codebook import midpoint_thresholds, nearest_code_index
from dist8bit.quant.layout import check_blocksize

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional
CF = compat.functional

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and every bit (so -0.0 != 0.0 and NaN == NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype in BITS_VIEW:
        return torch.equal(a.view(BITS_VIEW[a.dtype]), b.view(BITS_VIEW[b.dtype]))
    return torch.equal(a, b)


def bnb_accepts(builder, *args) -> torch.Tensor | None:
    try:
        return builder(*args)
    except (AssertionError, TypeError, NameError, ValueError):  # bitsandbytes asserts, or fails on odd arguments
        return None


# ---------------------------------------------------------------------------
# Maps


def test_dynamic_map_covers_bitsandbytes_argument_range_bit_for_bit():
    """Every (signed, max_exponent_bits, total_bits) bitsandbytes builds; signed maps may spend every bit on the exponent."""
    checked = 0
    for signed in (True, False):
        for total_bits in range(1, 9):
            for exponent_bits in range(0, total_bits + 1):
                expected = bnb_accepts(BF.create_dynamic_map, signed, exponent_bits, total_bits)
                if expected is None:
                    continue
                assert same_bits(CF.create_dynamic_map(signed, exponent_bits, total_bits), expected), (
                    signed,
                    exponent_bits,
                    total_bits,
                )
                checked += 1
    assert checked == 45  # 8 total_bits x (all exponent splits signed, one unsigned) that bitsandbytes accepts
    assert same_bits(F.create_dynamic_map(True, 8, 8), BF.create_dynamic_map(True, 8, 8))


def test_fp8_map_is_bit_identical_for_every_layout():
    checked = 0
    for signed in (True, False):
        for total_bits in range(1, 9):
            for exponent_bits in range(0, total_bits + 1):
                precision_bits = total_bits - int(signed) - exponent_bits
                if precision_bits < 0:
                    continue
                expected = bnb_accepts(BF.create_fp8_map, signed, exponent_bits, precision_bits, total_bits)
                if expected is None:
                    continue
                ours = CF.create_fp8_map(signed, exponent_bits, precision_bits, total_bits)
                assert same_bits(ours, expected), (signed, exponent_bits, precision_bits, total_bits)
                checked += 1
    assert checked == 72
    assert same_bits(CF.create_fp8_map(), BF.create_fp8_map())  # defaults: signed E5M2
    with pytest.raises(ValueError, match="exponent_bits \\+ precision_bits"):
        CF.create_fp8_map(True, 4, 4, 8)


@pytest.mark.parametrize("use_extra_value", [True, False])
@pytest.mark.parametrize("offset", [0.9677083, 0.99, 0.75])
def test_normal_map_is_bit_identical_without_scipy(monkeypatch, offset, use_extra_value):
    expected = BF.create_normal_map(offset, use_extra_value)  # bitsandbytes needs scipy.stats.norm.ppf
    for name in [name for name in sys.modules if name == "scipy" or name.startswith("scipy.")]:
        monkeypatch.setitem(sys.modules, name, None)  # importing scipy now fails
    monkeypatch.setitem(sys.modules, "scipy", None)
    ours = CF.create_normal_map(offset, use_extra_value)
    assert same_bits(ours, expected)
    assert (ours != 0).sum() == (15 if use_extra_value else 14)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("add_zero", [True, False])
def test_linear_map_matches_bitsandbytes_within_rounding(signed, add_zero):
    """bitsandbytes' float32 linspace vs k/steps rounded once: at most 1 ulp of 0.5 apart; ours keeps an exact 0."""
    expected = BF.create_linear_map(signed, 8, add_zero)
    ours = CF.create_linear_map(signed, 8, add_zero)
    assert (ours - expected).abs().max() <= 6e-8
    if signed and add_zero:
        assert (ours == 0).sum() == 2 and expected[128] != 0  # bitsandbytes' middle value is 3.7e-9
    assert inspect.signature(CF.create_linear_map).parameters.keys() == {"signed", "total_bits", "add_zero"}


# ---------------------------------------------------------------------------
# estimate_quantiles: the offset rule (silent difference 4 of issue 13)


def exact_quantiles(A: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return torch.quantile(A.double(), levels.double()).float()


QUANTILE_LIMIT = 0.035  # bitsandbytes' bound for few-quantile estimates (issue 13)


def test_few_quantiles_default_offset_is_half_a_level():
    """15 quantiles: levels linspace(1/30, 29/30), not linspace(1/512, 511/512) (issue 13 measured error 1.27)."""
    torch.manual_seed(0)
    A = torch.randn(1 << 20)
    levels = torch.linspace(1 / 30, 29 / 30, 15, dtype=torch.float64)
    error = (F.estimate_quantiles(A, num_quantiles=15) - exact_quantiles(A, levels)).abs().max()
    assert error < QUANTILE_LIMIT, float(error)  # measured 0.0016 (1.04 with offset 1/512)
    explicit = F.estimate_quantiles(A, offset=1 / 512, num_quantiles=15)  # an explicit offset is kept
    assert abs(float(explicit[0]) - float(torch.quantile(A, 1 / 512))) < QUANTILE_LIMIT


def test_compat_estimate_quantiles_follows_bitsandbytes_rule():
    """bitsandbytes: offset 1/512 -> 1/(2n) when n < 256, then n of the 256 grid quantiles at linspace(0, 255, n)."""
    torch.manual_seed(0)
    A = torch.randn(1 << 20)
    grid = torch.linspace(1 / 30, 1 - 1 / 30, 256, dtype=torch.float64)
    picked = grid[torch.linspace(0, 255, 15).long()]
    estimate = CF.estimate_quantiles(A, num_quantiles=15)
    assert estimate.shape == (15,)
    assert (estimate - exact_quantiles(A, picked)).abs().max() < QUANTILE_LIMIT
    # Passing 1/512 is indistinguishable from the default in bitsandbytes, so it is overridden too;
    # any other offset is kept.
    assert torch.equal(CF.estimate_quantiles(A, offset=1 / 512, num_quantiles=15), estimate)
    kept = CF.estimate_quantiles(A, offset=0.01, num_quantiles=15)
    assert abs(float(kept[0]) - float(torch.quantile(A, 0.01))) < QUANTILE_LIMIT
    out = torch.empty(256)
    assert torch.equal(CF.estimate_quantiles(A, out, num_quantiles=15), estimate)
    assert torch.equal(out, CF.estimate_quantiles(A, offset=1 / 30))  # out gets the 256-quantile grid


def test_quantile_map_uses_the_offset_rule():
    """create_quantile_map(A, 4): its outer codes sit at the 1/30 and 29/30 quantiles (not 1/512's)."""
    torch.manual_seed(0)
    A = torch.randn(1 << 18)
    code = CF.create_quantile_map(A, total_bits=4)
    nonzero = code[code != 0]
    expected = exact_quantiles(A, torch.tensor([1 / 30, 29 / 30]))
    scale = expected.abs().max()
    assert torch.allclose(nonzero[[0, -1]], expected / scale, atol=0.02)


# ---------------------------------------------------------------------------
# quantize_blockwise / dequantize_blockwise against bitsandbytes


def assert_never_farther(A: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor, absmax: torch.Tensor, blocksize: int):
    """Where the codes differ, ours is the nearest code to s = x * (1 / absmax) (float32) and theirs is not nearer."""
    n = A.numel()
    scales = absmax.repeat_interleave(blocksize)[:n]
    s = A.reshape(-1).float() * (torch.ones_like(scales) / scales)
    code = F.create_dynamic_map().double()
    ours, theirs = ours.reshape(-1).long(), theirs.reshape(-1).long()
    assert torch.equal(ours, nearest_code_index(s, midpoint_thresholds(F.create_dynamic_map())))
    assert torch.all((code[ours] - s.double()).abs() <= (code[theirs] - s.double()).abs())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [256, 4096, 16384, 65536])
def test_quantize_blockwise_against_bitsandbytes(dtype, blocksize):
    torch.manual_seed(0)
    A = (torch.randn(3 * 65536 + 17) * torch.rand(1) * 10).to(dtype)
    codes, state = CF.quantize_blockwise(A, blocksize=blocksize)
    bnb_codes, bnb_state = BF.quantize_blockwise(A, blocksize=blocksize)
    assert same_bits(state.absmax, bnb_state.absmax)
    assert state.blocksize == blocksize and state.dtype == dtype and same_bits(state.code, bnb_state.code)
    assert (codes != bnb_codes).float().mean() < 0.005  # measured 0.0015-0.0018 (bitsandbytes' CPU lookup table)
    assert_never_farther(A, codes, bnb_codes, state.absmax, blocksize)
    # Decoding is bit-identical: bitsandbytes' codes and state through dist8bit, and ours through bitsandbytes.
    assert same_bits(CF.dequantize_blockwise(bnb_codes, bnb_state), BF.dequantize_blockwise(bnb_codes, bnb_state))
    assert same_bits(CF.dequantize_blockwise(codes, state), BF.dequantize_blockwise(codes, state))
    raw = CF.dequantize_blockwise(codes, absmax=state.absmax, blocksize=blocksize)
    assert same_bits(raw, BF.dequantize_blockwise(codes, absmax=state.absmax, blocksize=blocksize))


def test_default_blocksizes():
    """bitsandbytes' function defaults to 4096 (its optimizers to 256); dist8bit.functional keeps 256."""
    A = torch.randn(10_000)
    compat_codes, compat_state = CF.quantize_blockwise(A)
    _, bnb_state = BF.quantize_blockwise(A)
    assert compat_state.blocksize == bnb_state.blocksize == 4096
    assert compat_state.absmax.numel() == bnb_state.absmax.numel() == 3
    _, state = F.quantize_blockwise(A)
    assert state.blocksize == 256
    assert inspect.signature(CF.dequantize_blockwise).parameters["blocksize"].default == 4096
    # dequantize_blockwise(codes, absmax=...) also assumes 4096 (3 scales for 10,000 codes).
    restored = CF.dequantize_blockwise(compat_codes, absmax=compat_state.absmax)
    assert same_bits(restored, BF.dequantize_blockwise(compat_codes, absmax=compat_state.absmax))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_nested_matches_bitsandbytes(dtype, blocksize):
    torch.manual_seed(1)
    A = (torch.randn(1 << 20) * torch.linspace(0.01, 5, 1 << 20)).to(dtype)  # scales vary across blocks
    codes, state = CF.quantize_blockwise(A, None, None, None, blocksize, True)  # positional nested
    bnb_codes, bnb_state = BF.quantize_blockwise(A, blocksize=blocksize, nested=True)
    assert state.nested and bnb_state.nested
    assert same_bits(state.offset, bnb_state.offset)  # mean of the same float32 absmax
    assert state.state2.blocksize == bnb_state.state2.blocksize == blocksize
    assert same_bits(state.state2.absmax, bnb_state.state2.absmax)
    assert same_bits(state.state2.code, bnb_state.state2.code)
    assert state.absmax.dtype == torch.uint8 and (state.absmax != bnb_state.absmax).float().mean() < 0.01
    # Decoding either library's nested state is bit-identical in both.
    assert same_bits(CF.dequantize_blockwise(bnb_codes, bnb_state), BF.dequantize_blockwise(bnb_codes, bnb_state))
    assert same_bits(CF.dequantize_blockwise(codes, state), BF.dequantize_blockwise(codes, state))
    # Double quantization costs little accuracy: measured 6.8-10.4% more mean error than plain on
    # this data, and within 0.03% of bitsandbytes' own nested round trip (the nearest absmax code is
    # not always the one that gives the smaller error).
    plain = F.dequantize_blockwise(*F.quantize_blockwise(A, blocksize=blocksize))
    nested_error = (CF.dequantize_blockwise(codes, state).float() - A.float()).abs().mean()
    plain_error = (plain.float() - A.float()).abs().mean()
    bnb_error = (BF.dequantize_blockwise(bnb_codes, bnb_state).float() - A.float()).abs().mean()
    assert nested_error < 1.12 * plain_error, (float(nested_error), float(plain_error))
    assert nested_error <= 1.001 * bnb_error, (float(nested_error), float(bnb_error))


def test_nested_refuses_an_absmax_buffer():
    with pytest.raises(ValueError, match="nested"):
        F.quantize_blockwise(torch.randn(512), absmax=torch.empty(2), nested=True)


@pytest.mark.parametrize("blocksize", [8192, 16384, 32768, 65536])
@pytest.mark.parametrize("stochastic", [False, True])
def test_large_blocks_and_nested_agree_with_the_reference(backend, monkeypatch, blocksize, stochastic):
    """Blocksizes up to 65536 and nested states on every backend, bit for bit with the reference."""
    torch.manual_seed(2)
    A = torch.randn(5 * blocksize + 3, device=backend)
    A[7] = 40.0

    def run():
        kwargs = {"stochastic_rounding": True, "seed": 3} if stochastic else {}
        codes, state = F.quantize_blockwise(A, blocksize=blocksize, nested=True, **kwargs)
        return codes, state, F.dequantize_blockwise(codes, state)

    codes, state, restored = run()
    monkeypatch.setenv(BACKEND_ENV, "reference")
    ref_codes, ref_state, ref_restored = run()
    assert torch.equal(codes, ref_codes) and state == ref_state and same_bits(restored, ref_restored)
    assert (restored - A).abs().max() <= 0.07 * A.abs().max()


def test_optimizer_blocksize_limit_names_the_functional_range():
    assert check_blocksize(4096) == 4096
    with pytest.raises(ValueError, match=r"up to 4096.*up to 65536"):
        check_blocksize(8192)
    with pytest.raises(ValueError, match="must be one of"):
        F.quantize_blockwise(torch.randn(10), blocksize=131072)


def test_compat_raises_bitsandbytes_errors():
    with pytest.raises(ValueError, match="16/32-bit floats"):
        CF.quantize_blockwise(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="uint8"):
        CF.dequantize_blockwise(torch.zeros(4), absmax=torch.ones(1))
    with pytest.raises(ValueError, match="quant_state or absmax"):
        CF.dequantize_blockwise(torch.zeros(4, dtype=torch.uint8))


# ---------------------------------------------------------------------------
# QuantState


@pytest.mark.parametrize("nested", [False, True])
def test_quant_state_dicts_round_trip_and_interoperate(nested):
    torch.manual_seed(0)
    A = torch.randn(3, 5000, dtype=torch.bfloat16)
    codes, state = CF.quantize_blockwise(A, blocksize=256, nested=nested)
    _, bnb_state = BF.quantize_blockwise(A, blocksize=256, nested=nested)
    ours = state.as_dict()
    assert set(ours) == set(bnb_state.as_dict())  # bitsandbytes writes shape = None for block-wise states
    assert ours["dtype"] == "bfloat16" and ours["shape"] == (3, 5000) and ours["quant_type"] is None
    again = CF.QuantState.from_dict(ours, "cpu")
    assert again == state and again.nested == nested
    assert same_bits(CF.dequantize_blockwise(codes, again), CF.dequantize_blockwise(codes, state))
    # bitsandbytes reads our dict, we read its dict (with a module prefix, as in a state dict).
    assert same_bits(
        BF.dequantize_blockwise(codes, BF.QuantState.from_dict(dict(ours), "cpu")), CF.dequantize_blockwise(codes, state)
    )
    prefixed = {f"layer.weight.{key}": value for key, value in bnb_state.as_dict().items()}
    theirs = CF.QuantState.from_dict(prefixed, "cpu")
    assert theirs.nested == nested and theirs.blocksize == 256 and theirs.dtype == torch.bfloat16
    assert same_bits(CF.dequantize_blockwise(codes, theirs), BF.dequantize_blockwise(codes, bnb_state))
    # packed=False and an 8-bit state (no quant_type): the same dict, as in bitsandbytes.
    assert state.as_dict(packed=True).keys() == ours.keys()
    # The older list view.
    for index in (0, 1, 2, 3, 5):
        expected, got = bnb_state[index], state[index]
        if isinstance(expected, torch.Tensor):
            assert same_bits(got, expected)
        elif index != 1:  # bitsandbytes' block-wise state has no shape
            assert got == expected
    assert (state[4] is None) == (not nested)


def test_quant_state_packed_dict_and_errors():
    state = CF.QuantState(torch.ones(2), (4,), F.create_dynamic_map(), 64, "nf4", torch.float16)
    packed = state.as_dict(packed=True)
    assert all(isinstance(value, torch.Tensor) for value in packed.values())
    assert "quant_state.bitsandbytes__nf4" in packed
    assert CF.QuantState.from_dict(packed, "cpu") == state
    with pytest.raises(NotImplementedError, match="4-bit"):
        CF.dequantize_blockwise(torch.zeros(4, dtype=torch.uint8), state)
    with pytest.raises(ValueError, match="unknown quant state keys"):
        CF.QuantState.from_dict({**state.as_dict(), "bogus": 1}, "cpu")
    with pytest.raises(ValueError, match="lacks"):
        CF.QuantState.from_dict({"absmax": torch.ones(1), "quant_type": None}, "cpu")


def test_quant_state_to_moves_in_place():
    _, state = F.quantize_blockwise(torch.randn(1000), nested=True)
    assert state.to("cpu") is state and state.state2.absmax.device.type == "cpu"


# ---------------------------------------------------------------------------
# The compat namespace: names, signatures, nn


def signature_of(obj) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(obj).parameters.values()]


@pytest.mark.parametrize(
    "name",
    [
        "quantize_blockwise",
        "dequantize_blockwise",
        "create_dynamic_map",
        "create_fp8_map",
        "create_normal_map",
        "create_linear_map",
    ],
)
def test_functional_signatures_are_bitsandbytes(name):
    assert signature_of(getattr(CF, name)) == signature_of(getattr(BF, name))


def test_quant_state_signature_is_bitsandbytes():
    assert signature_of(CF.QuantState) == signature_of(BF.QuantState)


@pytest.mark.parametrize("name", ["quantize_4bit", "int8_linear_matmul", "optimizer_update_8bit_blockwise", "get_paged"])
def test_out_of_scope_functions_name_the_alternative(name):
    assert hasattr(BF, name)
    with pytest.raises(NotImplementedError, match=r"not provided by dist8bit.*(bitsandbytes itself|optim|Paged)"):
        getattr(CF, name)(torch.zeros(1))


@pytest.mark.parametrize("name", ["Linear8bitLt", "Linear4bit", "Params4bit", "Embedding8bit", "OutlierAwareLinear"])
def test_out_of_scope_modules_name_the_alternative(name):
    assert hasattr(bnb.nn, name)
    with pytest.raises(NotImplementedError, match=r"torch\.nn\.(Linear|Parameter|Embedding)"):
        getattr(compat.nn, name)(4, 4)
    with pytest.raises(NotImplementedError, match="matmul"):
        compat.matmul(torch.zeros(1), torch.zeros(1))


@pytest.mark.parametrize("name", ["StableEmbedding", "Embedding"])
def test_embeddings_match_bitsandbytes(name):
    ours_cls, bnb_cls = getattr(compat.nn, name), getattr(bnb.nn, name)
    assert signature_of(ours_cls)[:9] == signature_of(bnb_cls)[:9]
    torch.manual_seed(0)
    theirs = bnb_cls(50, 16, padding_idx=3)
    torch.manual_seed(0)
    ours = ours_cls(50, 16, padding_idx=3)
    assert same_bits(ours.weight.detach(), theirs.weight.detach())  # Xavier-uniform, same draws
    assert float(ours.weight.detach()[3].abs().max()) == 0.0
    tokens = torch.randint(0, 50, (4, 7))
    assert same_bits(ours(tokens), theirs(tokens))
    assert GlobalOptimManager.get_instance().overrides()[ours.weight] == {"optim_bits": 32}


def test_dist8bit_embedding_keeps_torch_init():
    """dist8bit.nn.Embedding stays torch.nn.Embedding (N(0, 1)); the compat one is Xavier-uniform like bitsandbytes'."""
    torch.manual_seed(0)
    plain = torch.nn.Embedding(1000, 64)
    torch.manual_seed(0)
    assert same_bits(Dist8bitEmbedding(1000, 64).weight.detach(), plain.weight.detach())
    assert compat.nn.Embedding(1000, 64).weight.detach().abs().max() <= (6 / (1000 + 64)) ** 0.5
