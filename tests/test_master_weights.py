"""The master_weights option at the optimizer level (dist8bit/optim/master_weights.py).

The oracle is an fp32-master run fed the same gradients: a compensated bf16
parameter with a 16-bit error buffer must restore exactly the master's float32
values (but for rounding ties), an 8-bit buffer must stay within its
derived bound, and plain bf16 (`none`) must visibly lose updates, so that the
comparison can fail. Kernel-level bit-exactness is tests/test_cpu_fused_step.py.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import dist8bit.optim as optim
from dist8bit.optim.segments import Segment
from dist8bit.quant.weight_error import compensated_values

STEPS = 40
LR = 3e-4


def _problem(numel: int = 8192, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Weights at GPT-2 scale (0.02) plus a few near 1 (norm gains), and one gradient per step."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(numel, generator=generator) * 0.02
    weights[:64] = 1.0 + 0.01 * torch.randn(64, generator=generator)
    grads = [torch.randn(numel, generator=generator) for _ in range(STEPS)]
    return weights.bfloat16().float(), grads


def _train(weights, grads, dtype, **options) -> tuple[torch.nn.Parameter, optim.AdamW8bit]:
    param = torch.nn.Parameter(weights.clone().to(dtype))
    optimizer = optim.AdamW8bit([param], lr=LR, weight_decay=0.1, **options)
    for grad in grads:
        param.grad = grad.to(dtype)
        optimizer.step()
    return param, optimizer


def _restored(param: torch.Tensor, optimizer: optim.AdamW8bit) -> torch.Tensor:
    return compensated_values(param.detach(), optimizer.state[param]["weight_error"]).view(param.shape)


def _units_in_last_place(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|bits(a) - bits(b)| for same-signed float32 values."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


def test_16_bit_errors_restore_the_fp32_master():
    weights, grads = _problem()
    master, _ = _train(weights, grads, torch.float32)
    grads_bf16 = [g.bfloat16().float() for g in grads]  # both runs see the same (bf16-exact) gradients
    master, _ = _train(weights, grads_bf16, torch.float32)
    param, optimizer = _train(weights, grads_bf16, torch.bfloat16, master_weights="compensated", error_bits=16)
    restored = _restored(param, optimizer)
    ulps = _units_in_last_place(restored, master.detach())
    # Only an exact tie (delta = 2^15, one in 2^16 writes) is clamped by one unit and drifts by a few.
    assert (ulps == 0).float().mean() > 0.999, f"{int((ulps != 0).sum())} of {ulps.numel()} differ"
    assert int(ulps.max()) <= 16
    assert torch.equal(param.detach(), master.detach().bfloat16()), "the bf16 weights are the master rounded"


def test_8_bit_errors_stay_within_their_bound_and_beat_plain_bf16():
    weights, grads = _problem()
    grads = [g.bfloat16().float() for g in grads]
    master, _ = _train(weights, grads, torch.float32)
    param, optimizer = _train(weights, grads, torch.bfloat16, master_weights="compensated", error_bits=8)
    plain, _ = _train(weights, grads, torch.bfloat16, master_weights="none")
    # Each write keeps x to within 256 float32 units (2^-15 relative; 128 away from ties); the update does not amplify a
    # perturbation of p (decay < 1, the states see only the gradients), so after STEPS writes the restored
    # value is within STEPS * 2^-15 of the largest magnitude the element had (its start, end, or in between,
    # at most STEPS * LR * 10 away: an Adam direction is a few units at most).
    largest = torch.maximum(weights.abs(), master.detach().abs()) + STEPS * LR * 10
    drift = (_restored(param, optimizer) - master.detach()).abs()
    assert bool((drift <= STEPS * 2.0**-15 * largest).all()), float((drift / largest).max())
    compensated_error = (param.detach().float() - master.detach()).abs().mean()
    plain_error = (plain.detach().float() - master.detach()).abs().mean()
    assert plain_error > 5 * compensated_error, (plain_error, compensated_error)


def test_updates_below_half_an_ulp_are_lost_by_none_and_kept_on_average_by_stochastic():
    """Weights at 1.0 (bf16 ulp 2^-7) moved by a steady 3e-4 per step: round-to-nearest never moves them,
    stochastic rounding moves their mean like the master's, compensation moves every one of them."""
    weights = torch.ones(8192)
    grads = [torch.ones(8192)] * STEPS
    master, _ = _train(weights, grads, torch.float32)
    moved = 1.0 - master.detach().mean()
    assert moved > 0.01
    plain, _ = _train(weights, grads, torch.bfloat16, master_weights="none")
    assert bool((plain.detach() == 1).all())
    stochastic, _ = _train(weights, grads, torch.bfloat16, master_weights="stochastic")
    assert float(stochastic.detach().float().mean()) == pytest.approx(float(master.detach().mean()), abs=0.05 * moved)
    compensated, _ = _train(weights, grads, torch.bfloat16, master_weights="compensated")
    assert torch.equal(compensated.detach(), master.detach().bfloat16())


def test_state_bytes_add_one_or_two_bytes_per_bf16_parameter():
    shapes = [(768, 768), (768, 3072), (3072, 768), (50304 // 8, 768)]
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16)) for shape in shapes]
    numel = sum(p.numel() for p in params)
    per_param = {}
    for mode, bits in (("none", 8), ("compensated", 8), ("compensated", 16)):
        optimizer = optim.AdamW8bit(params, master_weights=mode, error_bits=bits)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        per_param[(mode, bits)] = optimizer.state_bytes() / numel
    assert per_param[("compensated", 8)] - per_param[("none", 8)] == pytest.approx(1.0)
    assert per_param[("compensated", 16)] - per_param[("none", 8)] == pytest.approx(2.0)
    assert per_param[("compensated", 8)] <= 3.1  # issue 16's memory bar (states + error buffer)


def test_float32_parameters_keep_no_error_buffer_in_a_compensated_group():
    matrix = torch.nn.Parameter(torch.randn(64, 128).bfloat16())
    norm = torch.nn.Parameter(torch.ones(128))
    optimizer = optim.AdamW8bit([matrix, norm], master_weights="compensated", min_8bit_size=1)
    matrix.grad, norm.grad = torch.randn_like(matrix), torch.randn_like(norm)
    optimizer.step()
    assert optimizer.state[matrix]["weight_error"].dtype == torch.int8
    assert optimizer.state[matrix]["weight_error"].shape == matrix.shape
    assert "weight_error" not in optimizer.state[norm]


def test_groups_choose_their_own_mode():
    a = torch.nn.Parameter(torch.randn(4096).bfloat16())
    b = torch.nn.Parameter(torch.randn(4096).bfloat16())
    optimizer = optim.AdamW8bit([{"params": [a], "master_weights": "compensated", "error_bits": 16}, {"params": [b]}])
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    optimizer.step()
    assert optimizer.state[a]["weight_error"].dtype == torch.int16
    assert "weight_error" not in optimizer.state[b]


@pytest.mark.parametrize(
    "dtype,options,message",
    [
        (torch.bfloat16, {"master_weights": "fp32"}, "master_weights='fp32' updates float32 master weights"),
        (torch.float16, {"master_weights": "compensated"}, "implemented for bfloat16 parameters"),
        (torch.float16, {"master_weights": "stochastic"}, "implemented for bfloat16 parameters"),
    ],
)
def test_parameters_a_mode_cannot_write_are_refused(dtype, options, message):
    param = torch.nn.Parameter(torch.zeros(16, dtype=dtype))
    optimizer = optim.AdamW8bit([param], **options)
    param.grad = torch.zeros_like(param)
    with pytest.raises(ValueError, match=message):
        optimizer.step()


@pytest.mark.parametrize(
    "options,message",
    [
        ({"master_weights": "kahan"}, "master_weights must be one of"),
        ({"error_bits": 4}, "error_bits must be 8 or 16"),
        ({"error_bits": True}, "error_bits must be 8 or 16"),
        ({"master_weights": "compensated", "stochastic_rounding": True}, "pass only master_weights"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        optim.AdamW8bit([torch.nn.Parameter(torch.zeros(4))], **options)


def test_stochastic_rounding_flag_still_means_stochastic():
    optimizer = optim.AdamW8bit([torch.nn.Parameter(torch.zeros(4))], stochastic_rounding=True)
    assert optimizer.defaults["master_weights"] == "stochastic" and optimizer.stochastic_rounding


def _save(optimizer) -> dict:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_a_checkpoint_resumes_exactly():
    weights, grads = _problem(numel=4096)
    reference, _ = _train(weights, grads, torch.bfloat16, master_weights="compensated")
    param, optimizer = _train(weights, grads[: STEPS // 2], torch.bfloat16, master_weights="compensated")
    saved = _save(optimizer)
    resumed_param = torch.nn.Parameter(param.detach().clone())
    resumed = optim.AdamW8bit([resumed_param], lr=LR, weight_decay=0.1, master_weights="compensated")
    resumed.load_state_dict(saved)
    for grad in grads[STEPS // 2 :]:
        resumed_param.grad = grad.bfloat16()
        resumed.step()
    assert torch.equal(resumed_param.detach().view(torch.int16), reference.detach().view(torch.int16))


def test_loading_converts_error_bits_and_drops_errors_with_a_warning():
    weights, grads = _problem(numel=4096)
    param, optimizer = _train(weights, grads[:3], torch.bfloat16, master_weights="compensated", error_bits=16)
    saved = _save(optimizer)
    wide = saved["state"][0]["weight_error"]

    narrow_param = torch.nn.Parameter(param.detach().clone())
    narrow = optim.AdamW8bit([narrow_param], master_weights="compensated", error_bits=8)
    narrow.load_state_dict(saved)
    loaded = narrow.state[narrow_param]["weight_error"]
    assert loaded.dtype == torch.int8
    assert torch.equal(loaded.long(), ((wide.long() + 128) >> 8).clamp(-127, 127))

    plain_param = torch.nn.Parameter(param.detach().clone())
    plain = optim.AdamW8bit([plain_param], master_weights="none")
    with pytest.warns(UserWarning, match="compensated-weight errors .* are dropped"):
        plain.load_state_dict(saved)
    assert "weight_error" not in plain.state[plain_param]


def test_a_corrupt_error_buffer_is_refused():
    weights, grads = _problem(numel=4096)
    param, optimizer = _train(weights, grads[:2], torch.bfloat16, master_weights="compensated")
    saved = _save(optimizer)
    saved["state"][0]["weight_error"] = torch.zeros(17, dtype=torch.int8)
    fresh = optim.AdamW8bit([torch.nn.Parameter(param.detach().clone())], master_weights="compensated")
    with pytest.raises(ValueError, match="weight_error must be an int8 or int16 tensor of 4096 elements"):
        fresh.load_state_dict(saved)


def test_a_resumed_state_without_errors_starts_them_at_zero():
    weights, grads = _problem(numel=4096)
    param, optimizer = _train(weights, grads[:2], torch.bfloat16, master_weights="none")
    compensated = optim.AdamW8bit([param], master_weights="compensated")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compensated.load_state_dict(_save(optimizer))
    param.grad = grads[2].bfloat16()
    compensated.step()
    assert compensated.state[param]["weight_error"].dtype == torch.int8


def test_flat_buffers_match_per_parameter_steps():
    """A ZeRO-style flat bf16 partition (set_segments) keeps one error buffer over the whole flat
    buffer and updates each segment exactly as the separate parameters would be."""
    generator = torch.Generator().manual_seed(3)
    shapes = [(64, 80), (96,), (50, 100)]
    values = [torch.randn(shape, generator=generator).bfloat16() for shape in shapes]
    grads = [[torch.randn(shape, generator=generator).bfloat16() for shape in shapes] for _ in range(4)]
    separate = [torch.nn.Parameter(v.clone()) for v in values]
    separate_optimizer = optim.AdamW8bit(separate, lr=1e-3, master_weights="compensated", min_8bit_size=1)
    flat = torch.nn.Parameter(torch.cat([v.reshape(-1) for v in values]))
    flat_optimizer = optim.AdamW8bit([flat], lr=1e-3, master_weights="compensated", min_8bit_size=1)
    segments, start = [], 0
    for source in separate:
        segments.append(Segment(source, start=start, length=source.numel(), param_offset=0, logical_numel=source.numel()))
        start += source.numel()
    flat_optimizer.set_segments(flat, segments)
    for step_grads in grads:
        for p, g in zip(separate, step_grads, strict=True):
            p.grad = g
        flat.grad = torch.cat([g.reshape(-1) for g in step_grads])
        separate_optimizer.step()
        flat_optimizer.step()
    assert torch.equal(flat.detach(), torch.cat([p.detach().reshape(-1) for p in separate]))
    assert flat_optimizer.state[flat]["weight_error"].numel() == flat.numel()
    separate_errors = torch.cat([separate_optimizer.state[p]["weight_error"].reshape(-1) for p in separate])
    assert torch.equal(flat_optimizer.state[flat]["weight_error"], separate_errors)
