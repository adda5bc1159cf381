"""dist8bit.compat.bitsandbytes.optim against the real bitsandbytes 0.50.2, on CPU.

Per-step parity ("lockstep"): before every step the bitsandbytes optimizer is
given the compat optimizer's parameters and states, both take the same
gradient, and their results are compared; so each step is checked from
identical inputs and nothing hides in accumulated drift. bitsandbytes runs on
CPU in float32, float16 and bfloat16 (its CPU update functions are plain
PyTorch in float32 and write the parameter back in its dtype).
"""

from __future__ import annotations

import inspect
import warnings
from types import SimpleNamespace

import bitsandbytes
import pytest
import torch

import dist8bit.compat.bitsandbytes as compat
import dist8bit.functional as F
import dist8bit.optim as d8

BLOCKSIZE = 256  # bitsandbytes' optimizers quantize in blocks of 256
BIG, SMALL = (24, 200), (40, 50)  # 4800 elements (19 blocks, the last partial): 8-bit; 2000 (< 4096): 32-bit state
STEPS = 20
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# name -> (keyword arguments, state slots as (dist8bit name, bitsandbytes state number, index in that state))
ADAM_SLOTS = (("exp_avg", 1, None), ("exp_avg_sq", 2, None))
ALGORITHMS = {
    "Adam": ({"lr": 1e-2, "weight_decay": 0.1}, ADAM_SLOTS),
    "AdamW": ({"lr": 1e-2, "weight_decay": 0.1}, ADAM_SLOTS),
    "Lion": ({"lr": 1e-3, "weight_decay": 0.1}, (("exp_avg", 1, None),)),
    "SGD": ({"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-2}, (("momentum_buffer", 1, None),)),
    "RMSprop": ({"lr": 1e-3, "weight_decay": 1e-2}, (("square_avg", 1, None),)),
    "Adagrad": ({"lr": 1e-2, "weight_decay": 1e-2}, (("sum", 1, None),)),
    "LAMB": ({"lr": 1e-2, "weight_decay": 1e-2}, ADAM_SLOTS),
    "LARS": ({"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-4}, (("momentum_buffer", 1, None),)),
    "AdEMAMix": (
        {"lr": 1e-3, "t_alpha": 10, "t_beta3": 10},
        (("exp_avg", 1, 0), ("exp_avg_slow", 1, 1), ("exp_avg_sq", 2, None)),
    ),
}
SIGNED = {"exp_avg": True, "exp_avg_slow": True, "momentum_buffer": True, "exp_avg_sq": False, "square_avg": False, "sum": False}
# bitsandbytes' 8-bit RMSprop and Adagrad store their non-negative state with the *signed* map (dist8bit:
# unsigned), so its codes cannot hold dist8bit's state; their 8-bit update is its 32-bit arithmetic on the
# dequantized state (bitsandbytes/backends/cpu/ops.py), so the 32-bit class is their 8-bit reference.
REFERENCE_IS_32BIT = {"RMSprop", "Adagrad"}

# Tolerances. 32-bit states: the same float32 operations in another order: a few float32 ulps (4e-6 = 32
# ulps) of the value, or of the state's largest value where an EMA cancels to near 0. Parameters from identical inputs: float32
# rounding of the step (relative 4e-6 of |p|, atol 1e-8 where p is near 0), or one ulp of a 16-bit
# parameter (its float32 result may fall on the other side of a rounding midpoint).
STATE_RTOL = 4e-6
PARAM_RTOL = {torch.float32: 4e-6, torch.float16: torch.finfo(torch.float16).eps, torch.bfloat16: torch.finfo(torch.bfloat16).eps}
PARAM_ATOL = {torch.float32: 1e-8, torch.float16: 1e-7, torch.bfloat16: 1e-7}


def bnb_class(name: str, bits: int):
    """bitsandbytes' optimizer for `name` at `bits`. Its AdEMAMix32bit (and PagedAdEMAMix32bit) allocates a
    parameter-shaped first state where its update reads two and fails on CPU ("output with shape [200]
    doesn't match the broadcast shape [24, 200]"); AdEMAMix(optim_bits=32) is its working 32-bit path."""
    if (name, bits) == ("AdEMAMix", 32):
        return lambda params, **kwargs: bitsandbytes.optim.AdEMAMix(params, optim_bits=32, **kwargs)
    return getattr(bitsandbytes.optim, f"{name}{bits}bit")


def compat_class(name: str, bits: int) -> type:
    return getattr(compat.optim, f"{name}{bits}bit")


def widest_gap(signed: bool) -> float:
    return F.create_dynamic_map(signed=signed).double().sort().values.diff().max().item()


def block_absmax(values: torch.Tensor) -> torch.Tensor:
    flat = values.detach().reshape(-1).abs().float()
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCKSIZE))
    return padded.view(-1, BLOCKSIZE).amax(dim=1).repeat_interleave(BLOCKSIZE)[: flat.numel()].view(values.shape)


def compat_state(optimizer, param: torch.Tensor, name: str) -> torch.Tensor:
    """A compat state as float32 values."""
    state = optimizer.state[param]
    if name in state:
        return state[name]
    code = F.create_dynamic_map(signed=SIGNED[name])
    return F.dequantize_blockwise(state[name + "_codes"], absmax=state[name + "_absmax"], code=code, blocksize=BLOCKSIZE).view(
        param.shape
    )


def bnb_slot(state: dict, number: int, index: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    values, absmax = state[f"state{number}"], state.get(f"absmax{number}")
    if index is not None:
        values, absmax = values[index], None if absmax is None else absmax[index]
    return values, absmax


def bnb_state(optimizer, param: torch.Tensor, slot: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """A bitsandbytes state as float32 values (8-bit: decoded with its own map), and each element's
    block scale: the stored absmax (8-bit), else the block's largest |value|."""
    _, number, index = slot
    values, absmax = bnb_slot(optimizer.state[param], number, index)
    if values.dtype == torch.float32:
        return values, block_absmax(values)
    code = optimizer.state[param][f"qmap{number}"]
    decoded = F.dequantize_blockwise(values, absmax=absmax, code=code, blocksize=BLOCKSIZE).view(param.shape)
    return decoded, absmax.repeat_interleave(BLOCKSIZE)[: param.numel()].view(param.shape)


def give_bnb_the_compat_state(reference, ref_param, optimizer, param, slots) -> None:
    """Start bitsandbytes' next step from the compat optimizer's parameter and state."""
    with torch.no_grad():
        ref_param.copy_(param)
    for slot in slots:
        name, number, index = slot
        values, absmax = bnb_slot(reference.state[ref_param], number, index)
        state = optimizer.state[param]
        if values.dtype == torch.uint8:  # same map (checked by the comparisons): the codes and scales as they are
            values.copy_(state[name + "_codes"])
            absmax.copy_(state[name + "_absmax"])
        else:
            values.copy_(compat_state(optimizer, param, name))


def lockstep(name: str, bits: int, dtype: torch.dtype, steps: int = STEPS):
    """Yields (compat optimizer, its params, bitsandbytes optimizer, its params) after each step."""
    kwargs, slots = ALGORITHMS[name]
    torch.manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(shape) * 0.1).to(dtype)) for shape in (BIG, SMALL)]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = compat_class(name, bits)(params, **kwargs)
    reference_bits = 32 if name in REFERENCE_IS_32BIT else bits
    reference = bnb_class(name, reference_bits)(ref_params, **kwargs)
    for step in range(steps):
        if step:
            for p, r in zip(params, ref_params, strict=True):
                give_bnb_the_compat_state(reference, r, optimizer, p, slots)
        for p, r in zip(params, ref_params, strict=True):
            grad = (torch.randn(p.shape) * 0.01).to(dtype)
            p.grad, r.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
        yield optimizer, params, reference, ref_params


def state_tolerance(name: str, scale: torch.Tensor, both_quantized: bool) -> torch.Tensor:
    """How far the compat's 8-bit state may be from bitsandbytes' after one step from the same state.

    dist8bit rounds to the nearest code: at most half the widest gap of the map times the block's absmax
    from the float32 value. bitsandbytes' CPU quantizer picks a neighbouring code, not always the nearest
    (docs/quantization.md), so two 8-bit states of one value may be one whole gap apart; against a
    32-bit reference half a gap is the bound. `scale` is the reference's own block absmax (so a wrong
    scale in the compat's state cannot widen its tolerance); 1e-3 covers float32 rounding of the value and
    of the code midpoints.
    """
    gap = widest_gap(SIGNED[name]) * (1.0 if both_quantized else 0.5)
    return gap * (1 + 1e-3) * scale + 1e-12


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_each_step_matches_bitsandbytes(name, bits, dtype):
    _, slots = ALGORITHMS[name]
    eight_bit_states = 0
    for optimizer, params, reference, ref_params in lockstep(name, bits, dtype):
        for p, r in zip(params, ref_params, strict=True):
            torch.testing.assert_close(p, r, rtol=PARAM_RTOL[dtype], atol=PARAM_ATOL[dtype], msg=f"{name}")
            for slot in slots:
                mine, (theirs, scale) = compat_state(optimizer, p, slot[0]), bnb_state(reference, r, slot)
                if f"{slot[0]}_codes" in optimizer.state[p]:
                    eight_bit_states += 1
                    tolerance = state_tolerance(slot[0], scale, both_quantized=name not in REFERENCE_IS_32BIT)
                    outside = int(((mine - theirs).abs() > tolerance).sum())
                    assert outside == 0, (name, slot[0], outside)
                else:
                    atol = STATE_RTOL * theirs.abs().max().item()
                    torch.testing.assert_close(mine, theirs, rtol=STATE_RTOL, atol=atol, msg=f"{name} {slot[0]}")
    # 8-bit runs keep the big parameter's state 8-bit and the small one's 32-bit, as bitsandbytes does
    assert eight_bit_states == (STEPS * len(slots) if bits == 8 else 0)


def test_the_8bit_state_check_fails_on_a_wrong_state():
    """The 8-bit state bound has teeth: a state zeroed or 1.5 times too large fails it on most elements."""
    *_, (optimizer, params, reference, ref_params) = lockstep("Adam", 8, torch.float32, steps=3)
    for slot in ALGORITHMS["Adam"][1]:
        theirs, scale = bnb_state(reference, ref_params[0], slot)
        mine = compat_state(optimizer, params[0], slot[0])
        tolerance = state_tolerance(slot[0], scale, both_quantized=True)
        assert not ((mine - theirs).abs() > tolerance).any()
        for wrong in (torch.zeros_like(mine), mine * 1.5):
            outside = int(((wrong - theirs).abs() > tolerance).sum())
            assert outside > theirs.numel() // 2, (slot[0], outside)


# ------------------------------------------------------------------ signatures
BNB_CLASSES = sorted(n for n, v in vars(bitsandbytes.optim).items() if isinstance(v, type) and n != "GlobalOptimManager")


def test_every_bitsandbytes_optimizer_exists_with_its_positional_signature():
    """Names, order and defaults of bitsandbytes' parameters; dist8bit only adds keyword-only ones."""
    assert "GlobalOptimManager" in vars(bitsandbytes.optim) and compat.optim.GlobalOptimManager is d8.GlobalOptimManager
    for name in BNB_CLASSES:
        theirs = [(p.name, p.default) for p in inspect.signature(getattr(bitsandbytes.optim, name)).parameters.values()]
        ours = inspect.signature(getattr(compat.optim, name)).parameters.values()
        assert [(p.name, p.default) for p in ours if p.kind is not p.KEYWORD_ONLY] == theirs, name


def test_positional_arguments_land_where_bitsandbytes_puts_them():
    p = torch.nn.Parameter(torch.zeros(64, 80))
    optimizer = compat.optim.Adam([p], 2e-3, (0.8, 0.9), 1e-6, 0.5, False, 8, None, 1000, False)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (2e-3, (0.8, 0.9), 1e-6, 0.5)
    assert (group["optim_bits"], group["min_8bit_size"], group["is_paged"]) == (8, 1000, False)
    lars = compat.optim.LARS([p], 0.1, 0.9, 0, 1e-4, False, 32, None, 4096, 0.05)
    assert (lars.param_groups[0]["momentum"], lars.param_groups[0]["max_unorm"]) == (0.9, 0.05)
    with pytest.raises(TypeError, match="percentile_clipping"):  # bitsandbytes < 0.45 had it in is_paged's place
        compat.optim.Adam([p], 1e-3, (0.9, 0.999), 1e-8, 0, False, 32, None, 4096, 100)


def test_optim_bits_args_and_errors_follow_bitsandbytes():
    p = torch.nn.Parameter(torch.zeros(64, 80))
    for bits in (8, 32):  # 32: bitsandbytes 0.50.2's default; 8: what older releases and many recipes pass
        assert compat.optim.AdamW8bit([p], optim_bits=bits).param_groups[0]["optim_bits"] == 8
    with pytest.warns(UserWarning, match="ignored"):
        assert compat.optim.Adam32bit([p], optim_bits=8).param_groups[0]["optim_bits"] == 32
    for cls in (bitsandbytes.optim.Adagrad8bit, compat.optim.Adagrad8bit):
        with pytest.raises(ValueError):
            cls([p], optim_bits=32)
    for cls in (bitsandbytes.optim.SGD, compat.optim.SGD):
        with pytest.raises(NotImplementedError):
            cls([p], 0.1)  # momentum=0
    with pytest.raises(ValueError):
        compat.optim.Adam8bit([p], amsgrad=True)
    with pytest.raises(ValueError):
        compat.optim.Adagrad([p], lr_decay=0.1)
    args = SimpleNamespace(optim_bits=8, min_8bit_size=100, max_unorm=0.0, skip_zeros=False)
    group = compat.optim.Adam([p], args=args).param_groups[0]  # bitsandbytes reads these fields, not the arguments
    assert (group["optim_bits"], group["min_8bit_size"]) == (8, 100)
    with pytest.raises(ValueError, match="skip_zeros"):
        compat.optim.Adam([p], args=SimpleNamespace(optim_bits=32, skip_zeros=True))
    with pytest.warns(UserWarning, match="nesterov"):
        compat.optim.SGD([p], 0.1, 0.9, nesterov=True)


# ------------------------------------------------------- silent differences
def _run(make, steps: int = 10, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Final parameter of a fixed 10-step run (same start and gradients for every optimizer)."""
    torch.manual_seed(1)
    p = torch.nn.Parameter((torch.randn(BIG) * 0.1).to(dtype))
    grads = [torch.randn(BIG).to(dtype) * 0.01 for _ in range(steps)]
    optimizer = make([p])
    for grad in grads:
        p.grad = grad.clone()
        optimizer.step()
    return p.detach().clone()


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# Far: at least 100 times the 32-bit parity tolerance of these runs (params ~0.1, so 4e-7).
FAR = 4e-5


def test_adam_decays_weights_decoupled_like_bitsandbytes():
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    theirs = _run(lambda ps: bitsandbytes.optim.Adam(ps, **kwargs))
    assert _distance(_run(lambda ps: compat.optim.Adam(ps, **kwargs)), theirs) < 4e-7
    assert _distance(_run(lambda ps: torch.optim.AdamW(ps, **kwargs)), theirs) < 4e-7
    assert _distance(_run(lambda ps: d8.Adam(ps, **kwargs)), theirs) > FAR  # dist8bit's own Adam: L2, as torch's


def test_lars_is_momentum_sgd_with_the_update_norm_clipped():
    kwargs = {"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-4}
    theirs = _run(lambda ps: bitsandbytes.optim.LARS(ps, **kwargs))
    assert _distance(_run(lambda ps: compat.optim.LARS(ps, **kwargs)), theirs) < 4e-7
    assert _distance(_run(lambda ps: d8.LARS(ps, **kwargs)), theirs) > FAR  # dist8bit's own LARS
    assert _distance(_run(lambda ps: d8.SGD(ps, **kwargs)), theirs) > FAR  # the clipping is active here


def test_default_max_unorm_is_bitsandbytes():
    p = torch.nn.Parameter(torch.zeros(4))
    assert compat.optim.LAMB([p]).defaults["max_unorm"] == 1.0
    assert compat.optim.LARS([p], 0.1, 0.9).defaults["max_unorm"] == 0.02
    kwargs = {"lr": 1e-2, "weight_decay": 1e-2}
    theirs = _run(lambda ps: bitsandbytes.optim.LAMB(ps, **kwargs))
    assert _distance(_run(lambda ps: compat.optim.LAMB(ps, **kwargs)), theirs) < 4e-7
    assert _distance(_run(lambda ps: compat.optim.LAMB(ps, max_unorm=0.0, **kwargs)), theirs) > FAR
    assert _distance(_run(lambda ps: d8.LAMB(ps, **kwargs)), theirs) > FAR  # dist8bit's own LAMB (trust ratio)


def test_8bit_lamb_and_lars_never_clip_like_bitsandbytes():
    """bitsandbytes' 8-bit update has no max_unorm: LAMB8bit is AdamW8bit and LARS8bit is SGD8bit there."""
    lamb = {"lr": 1e-2, "weight_decay": 1e-2}
    assert _distance(_run(lambda ps: compat.optim.LAMB8bit(ps, **lamb)), _run(lambda ps: compat.optim.AdamW8bit(ps, **lamb))) == 0
    assert (
        _distance(_run(lambda ps: compat.optim.LAMB32bit(ps, **lamb)), _run(lambda ps: compat.optim.AdamW32bit(ps, **lamb))) > FAR
    )
    lars = {"lr": 1e-2, "momentum": 0.9}
    assert _distance(_run(lambda ps: compat.optim.LARS8bit(ps, **lars)), _run(lambda ps: compat.optim.SGD8bit(ps, **lars))) == 0


def test_pytorch_lars_matches_bitsandbytes():
    kwargs = {"lr": 1e-2, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-4, "nesterov": False}
    theirs = _run(lambda ps: bitsandbytes.optim.PytorchLARS(ps, **kwargs))
    assert _distance(_run(lambda ps: compat.optim.PytorchLARS(ps, **kwargs)), theirs) < 4e-7


# ------------------------------------------------------------ a whole script
def bitsandbytes_script(bnb) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[torch.Tensor]]:
    """A typical bitsandbytes training script, written against the module it is given."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64))
    initial = [p.detach().clone() for p in model.parameters()]
    manager = bnb.optim.GlobalOptimManager.get_instance()
    manager.register_parameters(model.parameters())
    optimizer = bnb.optim.Adam(model.parameters(), 0.001, (0.9, 0.995), 1e-8, 0.0, False, 8, None, 4096)
    manager.override_config(model[0].weight, "optim_bits", 32)
    data = torch.randn(32, 64)
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(model(data), data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer, initial


def test_a_bitsandbytes_script_runs_unchanged():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about in a plain script
        model, optimizer, initial = bitsandbytes_script(compat)
    try:
        real_model, *_ = bitsandbytes_script(bitsandbytes)
    finally:  # bitsandbytes keys overrides by id(): a later tensor could inherit this one
        bitsandbytes.optim.GlobalOptimManager.get_instance().initialize()
    assert "exp_avg" in optimizer.state[model[0].weight]  # the override: 32-bit state (6144 elements)
    assert "exp_avg_codes" in optimizer.state[model[2].weight]  # 8-bit state (6144 elements)
    assert "exp_avg" in optimizer.state[model[0].bias]  # below min_8bit_size
    for mine, theirs, start in zip(model.parameters(), real_model.parameters(), initial, strict=True):
        # The runs differ by the rounding of 8-bit states only (bitsandbytes picks a non-nearest code for
        # some values), which the layers pass on to each other's gradients: on average the parameters are
        # 1% of their movement apart at most (measured: 0.15% for the 8-bit layer, <= 0.04% for the others).
        moved = (theirs - start).abs().mean().item()
        assert (mine - theirs).abs().mean().item() < 0.01 * moved
