"""Public quantization API on every backend: accuracy bars, shapes, dtypes, errors."""

from __future__ import annotations

import pytest
import torch

import dist8bit.functional as F

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [64, 128, 256, 512, 1024, 2048, 4096]
# Round-trip bounds for randn(1024, 1024) with the signed dynamic map: bitsandbytes'
# own bounds at blocksize 256, tighter for smaller blocks (measured + ~5% margin).
ERROR_BOUNDS = {
    64: (0.0080, 0.0150),
    128: (0.0085, 0.0157),
    256: (0.0090, 0.0162),
    512: (0.0095, 0.0167),
    1024: (0.0099, 0.0172),
    2048: (0.0103, 0.0176),
    4096: (0.0106, 0.0179),
}


def round_trip_errors(A: torch.Tensor, blocksize: int) -> tuple[float, float]:
    codes, state = F.quantize_blockwise(A, blocksize=blocksize)
    restored = F.dequantize_blockwise(codes, state)
    assert restored.dtype == A.dtype and restored.shape == A.shape
    err = (A.float() - restored.float()).abs()
    return float(err.mean()), float((err / (A.float().abs() + 1e-8)).mean())


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_accuracy_bars(backend, dtype):
    torch.manual_seed(0)
    A = torch.randn(1024, 1024, device=backend).to(dtype)
    previous = (0.0, 0.0)
    for blocksize in BLOCKSIZES:
        abs_err, rel_err = round_trip_errors(A, blocksize)
        abs_bound, rel_bound = ERROR_BOUNDS[blocksize]
        assert abs_err < abs_bound and rel_err < rel_bound, (blocksize, abs_err, rel_err)
        if blocksize == 256:
            assert abs_err < 0.011 and rel_err < 0.018  # bitsandbytes' test bounds
        assert abs_err > previous[0] and rel_err > previous[1], "smaller blocks must be more accurate"
        previous = (abs_err, rel_err)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (255,), (257,), (3, 5, 7), (1000, 3)])
def test_shapes_and_dtypes_round_trip(backend, dtype, shape):
    torch.manual_seed(0)
    A = torch.randn(shape, device=backend).to(dtype)
    codes, state = F.quantize_blockwise(A, blocksize=64)
    assert codes.shape == A.shape and codes.dtype == torch.uint8
    assert state.absmax.shape == (-(-A.numel() // 64),) and state.absmax.dtype == torch.float32
    assert state.dtype == dtype and state.shape == A.shape and state.blocksize == 64
    restored = F.dequantize_blockwise(codes, state)
    assert restored.dtype == dtype and restored.shape == A.shape
    if A.numel():
        assert torch.allclose(restored.float(), A.float(), atol=0.05 * float(A.float().abs().max()), rtol=0)


def test_absmax_is_exact_block_maximum(backend):
    torch.manual_seed(0)
    A = torch.randn(1000, device=backend)
    _, state = F.quantize_blockwise(A, blocksize=128)
    expected = torch.nn.functional.pad(A.abs(), (0, 24)).view(-1, 128).amax(dim=1)
    assert torch.equal(state.absmax, expected)


def test_block_maximum_is_represented_exactly(backend):
    """The element holding the absmax decodes to +-absmax: the map has 1.0 (and -0.99 below)."""
    A = torch.tensor([0.5, -0.25, 3.0, 0.0] * 64, device=backend)
    codes, state = F.quantize_blockwise(A, blocksize=64)
    restored = F.dequantize_blockwise(codes, state)
    assert torch.equal(restored[2::4], A[2::4])
    assert torch.equal(restored[3::4], A[3::4]), "zeros stay exact"


def test_non_contiguous_input_matches_contiguous(backend):
    torch.manual_seed(0)
    A = torch.randn(64, 96, device=backend)
    view = A.t()
    codes, state = F.quantize_blockwise(view, blocksize=64)
    codes_ref, state_ref = F.quantize_blockwise(view.contiguous(), blocksize=64)
    assert torch.equal(codes, codes_ref) and torch.equal(state.absmax, state_ref.absmax)


def test_out_buffers_are_filled_in_place(backend):
    torch.manual_seed(0)
    A = torch.randn(4096, device=backend)
    out = torch.empty(4096, dtype=torch.uint8, device=backend)
    absmax = torch.empty(16, device=backend)
    codes, state = F.quantize_blockwise(A, out=out, absmax=absmax)
    assert codes.data_ptr() == out.data_ptr() and state.absmax.data_ptr() == absmax.data_ptr()
    restored = torch.empty(4096, dtype=torch.bfloat16, device=backend)
    result = F.dequantize_blockwise(codes, absmax=absmax, out=restored)
    assert result.data_ptr() == restored.data_ptr()
    assert torch.equal(result, F.dequantize_blockwise(codes, state).bfloat16())


def test_dequantize_with_explicit_absmax_and_code(backend):
    torch.manual_seed(0)
    A = torch.rand(3000, device=backend)
    code = F.create_dynamic_map(signed=False).to(backend)
    codes, state = F.quantize_blockwise(A, code=code, blocksize=512)
    by_state = F.dequantize_blockwise(codes, state)
    by_args = F.dequantize_blockwise(codes, absmax=state.absmax, code=code, blocksize=512)
    assert torch.equal(by_state, by_args)
    assert (by_state - A).abs().max() < 0.01


def test_non_finite_values_poison_only_their_block(backend):
    A = torch.ones(256 * 4, device=backend)
    A[3] = float("nan")
    A[256 + 7] = float("inf")
    A[512:768] = 0.0
    codes, state = F.quantize_blockwise(A, blocksize=256)
    assert torch.isnan(state.absmax[0]) and torch.isinf(state.absmax[1])
    assert state.absmax[2] == 0 and state.absmax[3] == 1
    restored = F.dequantize_blockwise(codes, state)
    assert not torch.isfinite(restored[:512]).any(), "a non-finite block must not decode to finite values"
    assert torch.equal(restored[512:768], A[512:768])
    assert torch.equal(restored[768:], A[768:])


def test_stochastic_rounding_is_unbiased_and_seeded(backend):
    A = torch.full((1 << 16,), 0.3, device=backend)
    A[0] = 1.0  # fixes absmax = 1 in the first block; others scale by 0.3 -> exact
    A = A.view(-1, 64)
    A[:, 0] = 1.0
    A = A.reshape(-1)
    codes_a, state = F.quantize_blockwise(A, blocksize=64, stochastic_rounding=True, seed=1)
    codes_b, _ = F.quantize_blockwise(A, blocksize=64, stochastic_rounding=True, seed=1)
    codes_c, _ = F.quantize_blockwise(A, blocksize=64, stochastic_rounding=True, seed=2)
    assert torch.equal(codes_a, codes_b) and not torch.equal(codes_a, codes_c)
    restored = F.dequantize_blockwise(codes_a, state)
    mask = A == 0.3
    nearest = F.dequantize_blockwise(*F.quantize_blockwise(A, blocksize=64))
    assert len(torch.unique(restored[mask])) == 2, "rounds to both neighbours"
    assert abs(float(restored[mask].mean()) - 0.3) < 2e-4 < abs(float(nearest[mask].mean()) - 0.3)


def test_non_blockwise_quantize_round_trip(backend):
    torch.manual_seed(0)
    A = torch.randn(5000, device=backend)
    codes, (absmax, code) = F.quantize(A)
    assert absmax.numel() == 1 and absmax.item() == A.abs().max().item()
    restored = F.dequantize(codes, (absmax, code))
    assert (restored - A).abs().mean() < 0.03
    empty_codes, (empty_absmax, _) = F.quantize(torch.empty(0, device=backend))
    assert empty_codes.numel() == 0 and empty_absmax.numel() == 0


@pytest.mark.parametrize("bad_dtype", [torch.int32, torch.int8, torch.complex64, torch.float64, torch.bool])
def test_rejects_non_float_inputs(bad_dtype):
    with pytest.raises(TypeError, match="A must be float32, float16 or bfloat16"):
        F.quantize_blockwise(torch.zeros(16, dtype=bad_dtype))


@pytest.mark.parametrize("blocksize", [0, 32, 100, 131072, 256.0, True])
def test_rejects_unsupported_blocksizes(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        F.quantize_blockwise(torch.zeros(16), blocksize=blocksize)


def test_rejects_mismatched_codes_and_absmax():
    codes, state = F.quantize_blockwise(torch.randn(1000), blocksize=256)
    with pytest.raises(ValueError, match="absmax has 4 scales but 1000 codes with blocksize=64 need 16"):
        F.dequantize_blockwise(codes, absmax=state.absmax, blocksize=64)
    with pytest.raises(ValueError, match="quant_state describes"):
        F.dequantize_blockwise(codes[:10], state)
    with pytest.raises(TypeError, match="uint8"):
        F.dequantize_blockwise(codes.int(), state)
    with pytest.raises(ValueError, match="out must have 1000 elements"):
        F.quantize_blockwise(torch.randn(1000), out=torch.empty(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="absmax must have 4 elements"):
        F.quantize_blockwise(torch.randn(1000), absmax=torch.empty(3))
    with pytest.raises(ValueError, match="needs quant_state or absmax"):
        F.dequantize_blockwise(codes)


def test_rejects_bad_maps_by_name():
    with pytest.raises(ValueError, match="code must hold exactly 256 values \\(8-bit\\) or 16 \\(4-bit\\)"):
        F.quantize_blockwise(torch.randn(16), code=torch.linspace(-1, 1, 17))
    with pytest.raises(ValueError, match="code must be sorted"):
        F.quantize_blockwise(torch.randn(16), code=torch.linspace(1, -1, 256))


def test_rejects_unsupported_devices_and_seeds():
    with pytest.raises(ValueError, match="supports CPU and CUDA tensors"):
        F.quantize_blockwise(torch.zeros(16, device="meta"))
    with pytest.raises(ValueError, match="seed is only used with stochastic_rounding"):
        F.quantize_blockwise(torch.zeros(16), seed=3)
    with pytest.raises(ValueError, match="seed must be an int"):
        F.quantize_blockwise(torch.zeros(16), stochastic_rounding=True, seed=-1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_backend_on_cpu_only_machine_is_a_clear_error(monkeypatch):
    from dist8bit.backends import load_backend

    with pytest.raises(RuntimeError, match=r"torch.cuda.is_available\(\) is False"):
        load_backend("cuda")
    monkeypatch.setenv("DIST8BIT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="DIST8BIT_BACKEND=cuda cannot run tensors on cpu"):
        F.quantize_blockwise(torch.zeros(16))
