"""bitsandbytes 0.50.2 optimizer state dicts load directly into dist8bit optimizers (on CPU).

Each case trains with the real bitsandbytes for 5 steps, saves `state_dict()`
through torch.save / torch.load(weights_only=True), loads it into dist8bit's
equivalent (dist8bit.optim and dist8bit.compat.bitsandbytes), checks the
loaded states against bitsandbytes' own (decoded with its own map), then runs
5 more steps on both from the same gradients and compares the parameters.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import dist8bit.compat.bitsandbytes as compat
import dist8bit.functional as F
import dist8bit.optim as d8
from dist8bit.checkpoint import codec, convert

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes

BLOCKSIZE = 256  # bitsandbytes' optimizers and dist8bit's default
BIG, SMALL = (24, 200), (40, 50)  # 4800 elements (19 blocks, the last partial): 8-bit; 2000 (< 4096): 32-bit state
STEPS = 5

# bitsandbytes name -> (keyword arguments, dist8bit.optim equivalent, whether it computes bitsandbytes'
# rule, state slots as (dist8bit name, bitsandbytes state number, index in that state))
ADAM_SLOTS = (("exp_avg", 1, None), ("exp_avg_sq", 2, None))
CASES = {
    "Adam": ({"lr": 1e-2, "weight_decay": 0.1}, "AdamW", True, ADAM_SLOTS),  # bitsandbytes' Adam decays decoupled
    "AdamW": ({"lr": 1e-2, "weight_decay": 0.1}, "AdamW", True, ADAM_SLOTS),
    "Lion": ({"lr": 1e-3, "weight_decay": 0.1}, "Lion", True, (("exp_avg", 1, None),)),
    "SGD": ({"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-2}, "SGD", True, (("momentum_buffer", 1, None),)),
    "RMSprop": ({"lr": 1e-3, "weight_decay": 1e-2}, "RMSprop", True, (("square_avg", 1, None),)),
    "Adagrad": ({"lr": 1e-2, "weight_decay": 1e-2}, "Adagrad", True, (("sum", 1, None),)),
    "AdEMAMix": (
        {"lr": 1e-3, "t_alpha": 10, "t_beta3": 10},
        "AdEMAMix",
        True,
        (("exp_avg", 1, 0), ("exp_avg_slow", 1, 1), ("exp_avg_sq", 2, None)),
    ),
    # dist8bit's own LAMB and LARS have a trust ratio (docs/optimizers.md): their states load, their steps differ.
    "LAMB": ({"lr": 1e-2, "weight_decay": 1e-2}, "LAMB", False, ADAM_SLOTS),
    "LARS": ({"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-4}, "LARS", False, (("momentum_buffer", 1, None),)),
}
SIGNED = {"exp_avg": True, "exp_avg_slow": True, "momentum_buffer": True, "exp_avg_sq": False, "square_avg": False, "sum": False}


def bnb_class(name: str, bits: int, paged: bool = False):
    """bitsandbytes' class; its AdEMAMix32bit fails on CPU (see test_compat_optim), AdEMAMix(optim_bits=32) works."""
    if (name, bits) == ("AdEMAMix", 32):
        return lambda params, **kwargs: bitsandbytes.optim.AdEMAMix(params, optim_bits=32, **kwargs)
    return getattr(bitsandbytes.optim, f"{'Paged' if paged else ''}{name}{bits}bit")


def gradients(seed: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator) for shape in (BIG, SMALL)] for _ in range(STEPS)]


def run(optimizer, params, grads) -> None:
    for step in grads:
        for param, grad in zip(params, step, strict=True):
            param.grad = grad.clone()
        optimizer.step()


def clone(params) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def saved_and_loaded(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def trained_bnb(name: str, bits: int, paged: bool = False):
    """A bitsandbytes optimizer after STEPS steps, its parameters, and its state dict as a file gives it back."""
    kwargs = CASES[name][0]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape) * 0.1) for shape in (BIG, SMALL)]
    optimizer = bnb_class(name, bits, paged)(params, **kwargs)
    run(optimizer, params, gradients(1))
    return optimizer, params, saved_and_loaded(optimizer.state_dict())


def bnb_values(state: dict, number: int, index: int | None, shape) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A bitsandbytes state slot as float32 values (8-bit: decoded with its own map) and its per-element block scale."""
    values, absmax = state[f"state{number}"], state.get(f"absmax{number}")
    if index is not None:
        values, absmax = values[index], None if absmax is None else absmax[index]
    if values.dtype == torch.float32:
        return values, None
    decoded = F.dequantize_blockwise(values, absmax=absmax, code=state[f"qmap{number}"], blocksize=BLOCKSIZE)
    return decoded.view(shape), absmax.repeat_interleave(BLOCKSIZE)[: values.numel()].view(shape)


def dist8bit_values(state: dict, name: str, shape) -> torch.Tensor:
    if name in state:
        return state[name]
    code = F.create_dynamic_map(signed=SIGNED[name])
    return F.dequantize_blockwise(state[name + "_codes"], absmax=state[name + "_absmax"], code=code, blocksize=BLOCKSIZE).view(
        shape
    )


def assert_states_match(bnb_state: dict, state: dict, slots, shape) -> None:
    """32-bit: the very values. 8-bit: bit for bit where both use the same map (the codes are copied);
    where bitsandbytes used the signed map for a non-negative state (RMSprop, Adagrad), within the
    unsigned map's rounding bound (codec.error_bound: half its widest gap) of each block's scale; a value
    on a midpoint sits exactly on the bound, so the float32 rounding of both decodes (an ulp each) is added."""
    for name, number, index in slots:
        expected, scale = bnb_values(bnb_state, number, index, shape)
        actual = dist8bit_values(state, name, shape)
        assert (name in state) == (scale is None), f"{name}: precision changed on load"
        if scale is None or bnb_state[f"qmap{number}"].equal(F.create_dynamic_map(signed=SIGNED[name])):
            assert torch.equal(actual, expected), f"{name}: max diff {(actual - expected).abs().max()}"
        else:
            ulps = 2 * torch.finfo(torch.float32).eps * expected.abs()
            bound = codec.error_bound(F.create_dynamic_map(signed=SIGNED[name])) * scale + ulps
            assert bool(((actual - expected).abs() <= bound).all()), f"{name}: off by more than one rounding"
    assert float(state["step"]) == bnb_state["step"]


def target(module, name: str, bits: int, params, paged: bool = False):
    kwargs = CASES[name][0]
    return getattr(module, f"{'Paged' if paged else ''}{name}{bits}bit")(params, **kwargs)


# Continuation bounds, relative to the largest movement bitsandbytes' own 5 steps made (max |p_end - p_start|).
# 32-bit: the same float32 operations in another order from identical states, so float32 rounding
# (measured: up to 2.3e-5 of the movement, for LARS whose clipping norms are summed in another order).
# 8-bit: both start from the same codes but round each new state to codes differently (bitsandbytes'
# CPU lookup is not always nearest, and it keeps RMSprop/Adagrad on the signed map); a code gap in a
# moment changes an update by a few percent of itself (measured: up to 2.2% of the movement). A resume
# from a fresh state lands at least 64% of the movement away (asserted), so both bounds tell a lost state.
RELATIVE_BOUND = {32: 1e-4, 8: 0.05}


def max_difference(a, b) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("module", [d8, compat.optim], ids=["optim", "compat"])
def test_bitsandbytes_state_dict_loads_and_continues(module, name, bits):
    reference, ref_params, state_dict = trained_bnb(name, bits)
    params, start = clone(ref_params), clone(ref_params)
    equivalent, same_rule, slots = CASES[name][1:]
    class_name = name if module is compat.optim else equivalent
    optimizer = target(module, class_name, bits, params)
    optimizer.load_state_dict(state_dict)
    for ref_param, param in zip(ref_params, params, strict=True):
        assert_states_match(reference.state[ref_param], optimizer.state[param], slots, param.shape)
    assert optimizer.param_groups[0]["lr"] == reference.param_groups[0]["lr"]
    if module is d8 and not same_rule:
        return
    grads = gradients(2)
    run(reference, ref_params, grads)
    run(optimizer, params, grads)
    fresh = clone(start)
    run(target(module, class_name, bits, fresh), fresh, grads)
    moved, error, fresh_error = (
        max_difference(ref_params, start),
        max_difference(params, ref_params),
        max_difference(fresh, ref_params),
    )
    assert error <= RELATIVE_BOUND[bits] * moved, f"{error:.3g} after moving {moved:.3g}"
    assert fresh_error > RELATIVE_BOUND[bits] * moved  # the bound can tell a lost state


@pytest.mark.parametrize("module", [d8, compat.optim], ids=["optim", "compat"])
@pytest.mark.parametrize("name", ["AdamW", "Lion"])
def test_paged_state_dicts_load(module, name):
    """Paged classes keep the same state dict (paging is where the state lives, not what it is)."""
    reference, ref_params, state_dict = trained_bnb(name, 8, paged=True)
    params = clone(ref_params)
    optimizer = target(module, name, 8, params, paged=True)
    optimizer.load_state_dict(state_dict)
    for ref_param, param in zip(ref_params, params, strict=True):
        assert_states_match(reference.state[ref_param], optimizer.state[param], CASES[name][3], param.shape)


def test_the_state_comparison_catches_a_moved_code():
    """The oracle fails on one code off by one, and on a requantized state off by more than a rounding."""
    reference, ref_params, state_dict = trained_bnb("AdamW", 8)
    optimizer = d8.AdamW8bit(clone(ref_params))
    optimizer.load_state_dict(state_dict)
    param = optimizer.param_groups[0]["params"][0]
    optimizer.state[param]["exp_avg_codes"].view(-1)[7] += 1
    with pytest.raises(AssertionError, match="exp_avg"):
        assert_states_match(reference.state[ref_params[0]], optimizer.state[param], ADAM_SLOTS, param.shape)
    reference, ref_params, state_dict = trained_bnb("RMSprop", 8)
    optimizer = d8.RMSprop8bit(clone(ref_params))
    optimizer.load_state_dict(state_dict)
    param = optimizer.param_groups[0]["params"][0]
    codes = optimizer.state[param]["square_avg_codes"].view(-1)
    codes[codes.argmax()] -= 2
    with pytest.raises(AssertionError, match="square_avg"):
        assert_states_match(reference.state[ref_params[0]], optimizer.state[param], (("square_avg", 1, None),), param.shape)


@pytest.mark.parametrize(
    ("source", "into", "fits"),
    [
        ("Lion", d8.AdamW8bit, "Lion, SGD or LARS"),
        ("SGD", compat.optim.RMSprop8bit, "Lion, SGD or LARS"),  # RMSprop's state is never negative
        ("Adagrad", d8.SGD8bit, "Adagrad"),
        ("AdamW", d8.AdEMAMix8bit, "Adam, AdamW or LAMB"),
        ("AdEMAMix", compat.optim.AdamW8bit, "AdEMAMix"),
    ],
)
def test_a_kind_mismatch_names_it_and_the_offline_command(source, into, fits):
    _, params, state_dict = trained_bnb(source, 8)
    kwargs = {"momentum": 0.9} if into is d8.SGD8bit else {}
    with pytest.raises(ValueError, match=f"fits bitsandbytes' {fits}, but {into.__name__} keeps") as error:
        into(clone(params), lr=1e-3, **kwargs).load_state_dict(state_dict)
    assert "dist8bit convert SRC DST --to 8bit --optimizer KIND" in str(error.value)


def test_a_state_dict_saved_before_the_first_step_loads():
    """No per-parameter state yet: the dict is recognised by bitsandbytes' group keys (alpha, t_alpha, t_beta3
    are what torch-style loading stumbled on) and its hyper-parameters come along."""
    params = [torch.nn.Parameter(torch.zeros(BIG))]
    state_dict = saved_and_loaded(bitsandbytes.optim.Adam8bit(params, lr=0.123, betas=(0.8, 0.9)).state_dict())
    optimizer = d8.AdamW8bit(clone(params))
    optimizer.load_state_dict(state_dict)
    assert optimizer.param_groups[0]["lr"] == 0.123 and tuple(optimizer.param_groups[0]["betas"]) == (0.8, 0.9)
    assert not optimizer.state


def test_loading_bitsandbytes_adam_into_torch_style_adam_warns_about_the_decay():
    _, params, state_dict = trained_bnb("Adam", 8)
    with pytest.warns(UserWarning, match="L2 weight decay"):
        d8.Adam8bit(clone(params)).load_state_dict(state_dict)


def test_in_memory_loading_is_dist8bit_convert(tmp_path):
    """Offline conversion with the kind named gives the very state the in-memory load gives."""
    _, ref_params, state_dict = trained_bnb("RMSprop", 8)
    torch.save(state_dict, tmp_path / "bnb.pt")
    with pytest.raises(ValueError, match="fits bitsandbytes' RMSprop: pass --optimizer rmsprop"):
        convert(tmp_path / "bnb.pt", tmp_path / "never.pt", to="8bit", progress=False)
    convert(tmp_path / "bnb.pt", tmp_path / "d8.pt", to="8bit", optimizer="rmsprop", progress=False)
    offline, in_memory = d8.RMSprop8bit(clone(ref_params)), d8.RMSprop8bit(clone(ref_params))
    offline.load_state_dict(torch.load(tmp_path / "d8.pt", weights_only=True))
    in_memory.load_state_dict(state_dict)
    for a, b in zip(offline.param_groups[0]["params"], in_memory.param_groups[0]["params"], strict=True):
        assert offline.state[a].keys() == in_memory.state[b].keys()
        for key in offline.state[a]:
            assert torch.equal(offline.state[a][key], in_memory.state[b][key]), key


def test_an_optimizer_over_shards_refuses_it():
    """A ZeRO-style flat partition holds pieces of parameters; bitsandbytes' whole-parameter states do not fit it."""
    from dist8bit.optim.segments import Segment

    _, params, state_dict = trained_bnb("AdamW", 8)
    whole = torch.nn.Parameter(torch.zeros(BIG[0] * BIG[1] + SMALL[0] * SMALL[1]))
    optimizer = d8.AdamW8bit([whole])
    first = BIG[0] * BIG[1]
    segments = [
        Segment(params[0], 0, first, 0, first),
        Segment(params[1], first, whole.numel() - first, 0, whole.numel() - first),
    ]
    optimizer.set_segments(whole, segments)
    state_dict["param_groups"][0]["params"] = [0]
    state_dict["state"] = {0: state_dict["state"][0]}
    with pytest.raises(ValueError, match="sharded parameters"):
        optimizer.load_state_dict(state_dict)
