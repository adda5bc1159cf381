"""dist8bit convert with 4-bit states (issue 15): round trips, 8-bit <-> 4-bit, odd-length ZeRO
pieces, shapes of packed codes, and refusals. DeepSpeed end to end (AdamW4bit ZeRO 2 -> 1 rank)
is in tests/test_checkpoint_convert.py (the `zero` fixture); DCP in tests/test_checkpoint_dcp.py."""

from __future__ import annotations

import copy

import pytest
import torch
from test_checkpoint_convert import assert_same_state_dicts, clone, load, run, train
from test_segments import AWKWARD, awkward_segments, flat_optimizer, step_flat

import dist8bit.functional as F
import dist8bit.optim as d8
from dist8bit import cli
from dist8bit.checkpoint import CheckpointError, codec
from dist8bit.checkpoint.in_memory import MemorySink
from dist8bit.optim.state import state_map
from dist8bit.quant.maps import create_dynamic_map_4bit, create_linear_map_4bit

# (33, 129) and 4501 elements are odd (a half-used last byte); 10 stays 32-bit (below min_8bit_size)
SHAPES = [(33, 129), (4501,), (10,)]
KINDS_4BIT = {
    "adamw": (d8.AdamW4bit, {"lr": 1e-2, "weight_decay": 0.01}),
    "sgd": (d8.SGD4bit, {"lr": 1e-2, "momentum": 0.9}),
    "rmsprop": (d8.RMSprop4bit, {"lr": 1e-3, "momentum": 0.5}),
    "adagrad": (d8.Adagrad4bit, {"lr": 1e-2}),
    "lion": (d8.Lion4bit, {"lr": 1e-3}),
    "ademamix": (d8.AdEMAMix4bit, {"lr": 1e-3}),
}
BLOCKSIZE_4BIT = 128


@pytest.fixture(autouse=True)
def step_anywhere(monkeypatch):
    """The checkpoints are under test, not the kernels: the reference backend (every kernel's
    bit-identical oracle) steps 4-bit states on every machine."""
    monkeypatch.setenv("DIST8BIT_BACKEND", "reference")


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator) * 0.1) for s in SHAPES]


def shapes_of(params) -> dict[int, tuple[int, ...]]:
    return {index: tuple(p.shape) for index, p in enumerate(params)}


def trained(kind: str, steps: int = 4):
    cls, kwargs = KINDS_4BIT[kind]
    params = make_params()
    optimizer = cls(params, **kwargs)
    train(params, optimizer, steps)
    return params, optimizer


# ------------------------------------------------------------------ the codec
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("numel", [1, 127, 128, 129, 4501])
def test_4bit_codec_is_exact_on_dequantized_values(signed, numel):
    """Odd counts leave the last high nibble 0; decode -> encode gives back the very codes and scales."""
    code = state_map(signed, 4)
    values = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    values = values if signed else values.square()
    codes, absmax = codec.quantize_exact(values, code, BLOCKSIZE_4BIT)
    assert codes.numel() == (numel + 1) // 2
    if numel % 2:
        assert int(codes[-1]) >> 4 == 0
    decoded = codec.dequantize(codes, absmax, code, BLOCKSIZE_4BIT, numel)
    # genuine data: the optimizer's own encoding, except where a block has an exact one (a lone
    # negative element in the last block: -0.8875 x a larger scale), which is then never worse
    expected, state = F.quantize_blockwise(values, code=code, blocksize=BLOCKSIZE_4BIT)
    plain = F.dequantize_blockwise(expected, state)
    assert bool(((decoded - values).abs() <= (plain - values).abs()).all())
    if numel == 4501:
        assert torch.equal(absmax, state.absmax) and torch.equal(codes, expected)
    again = codec.quantize_exact(decoded, code, BLOCKSIZE_4BIT)
    assert torch.equal(again[0], codes) and torch.equal(again[1], absmax)


def test_4bit_signed_map_needs_the_scale_recovery():
    """The signed 4-bit map's most negative value is -0.8875: a plain requantization of a block whose
    extreme is negative shrinks its scale, so the round trip needs codec's recovery (as 8-bit does)."""
    code = create_dynamic_map_4bit(True)
    assert -1.0 < float(code.min()) < -0.85
    values = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    codes, absmax = codec.quantize_exact(values, code, BLOCKSIZE_4BIT)
    decoded = codec.dequantize(codes, absmax, code, BLOCKSIZE_4BIT, values.numel())
    _, plain = F.quantize_blockwise(decoded, code=code, blocksize=BLOCKSIZE_4BIT)
    assert not torch.equal(plain.absmax, absmax)
    again = codec.quantize_exact(decoded, code, BLOCKSIZE_4BIT)
    assert torch.equal(again[0], codes) and torch.equal(again[1], absmax)


def test_error_bound_of_the_4bit_maps():
    """Half the widest gap, or a range end's distance to the nearest code: the linear map has no 0,
    so a zero second moment decodes to 1/16 of its block's scale."""
    assert codec.error_bound(create_linear_map_4bit()) == 1 / 16
    signed = create_dynamic_map_4bit(True).double()
    assert codec.error_bound(create_dynamic_map_4bit(True)) == pytest.approx(float((signed[1:] - signed[:-1]).max()) / 2)


# ------------------------------------------------------------------ torch-convention state dicts
@pytest.mark.parametrize("kind", list(KINDS_4BIT))
def test_4bit_to_fp32_to_4bit_is_bit_exact(tmp_path, kind):
    params, optimizer = trained(kind)
    original = optimizer.state_dict()
    assert original["param_groups"][0]["optim_bits"] == 4 and original["state"][0]["step"] == 4
    torch.save(original, tmp_path / "4bit.pt")
    report = run(tmp_path / "4bit.pt", tmp_path / "fp32.pt", to="fp32", shapes=shapes_of(params), verify=True)
    assert report.source_format == "dist8bit-4bit" and report.max_error == 0.0
    fp32 = load(tmp_path / "fp32.pt")
    assert all(v.shape == params[k].shape for k, s in fp32["state"].items() for n, v in s.items() if n != "step")
    report = run(tmp_path / "fp32.pt", tmp_path / "back.pt", to="4bit", verify=True)
    assert report.target.startswith("dist8bit-4bit (blocksize 128)")
    back = load(tmp_path / "back.pt")
    assert_same_state_dicts(original, back)  # codes and scales, bit for bit
    cls, kwargs = KINDS_4BIT[kind]
    cls(clone(params), **kwargs).load_state_dict(back)


def test_4bit_round_trip_resumes_exactly_and_fp32_loads_into_torch(tmp_path):
    params, optimizer = trained("adamw", 3)
    torch.save(optimizer.state_dict(), tmp_path / "4bit.pt")
    run(tmp_path / "4bit.pt", tmp_path / "fp32.pt", to="fp32", shapes=shapes_of(params))
    run(tmp_path / "fp32.pt", tmp_path / "back.pt", to="4bit")
    resumed = clone(params)
    again = d8.AdamW4bit(resumed, lr=1e-2, weight_decay=0.01)
    again.load_state_dict(load(tmp_path / "back.pt"))
    train(params, optimizer, 3, seed=2)
    train(resumed, again, 3, seed=2)
    for a, b in zip(params, resumed, strict=True):
        assert torch.equal(a, b)
    reference = torch.optim.AdamW(clone(params), lr=1e-2, weight_decay=0.01)
    reference.load_state_dict(load(tmp_path / "fp32.pt"))  # torch names and the parameters' shapes
    reference.step()


def test_4bit_shapes_come_from_param_names_and_the_model(tmp_path):
    """Packed codes do not say their parameter's shape: a group's param_names and the model's state
    dict in the same checkpoint do; with neither (and no shapes=), the conversion is refused."""
    params, optimizer = trained("adamw", 2)
    sd = optimizer.state_dict()
    sd["param_groups"][0]["param_names"] = ["w", "b", "c"]
    model = {"w": params[0].detach(), "b": params[1].detach(), "c": params[2].detach()}
    torch.save({"model": model, "optimizer": sd}, tmp_path / "named.pt")
    run(tmp_path / "named.pt", tmp_path / "named-fp32.pt", to="fp32", verify=True)
    assert load(tmp_path / "named-fp32.pt")["optimizer"]["state"][0]["exp_avg"].shape == SHAPES[0]
    torch.save(optimizer.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="does not say the parameter's shape"):
        run(tmp_path / "bare.pt", tmp_path / "bare-fp32.pt", to="fp32")
    with pytest.raises(CheckpointError, match="is shaped"):
        run(tmp_path / "named.pt", tmp_path / "x.pt", to="fp32", shapes={2: (5, 2)})  # 10 elements, dense (10,)


def decoded(state: dict, name: str, bits: int, blocksize: int, numel: int) -> torch.Tensor:
    code = state_map(name != "exp_avg_sq", bits)
    return codec.dequantize(state[name + "_codes"].reshape(-1), state[name + "_absmax"], code, blocksize, numel)


def test_8bit_and_4bit_convert_both_ways_as_the_maps_imply(tmp_path):
    """8-bit -> 4-bit is the 4-bit quantizer (blocksize 128) on the decoded 8-bit values, within the 4-bit
    map's bound; 4-bit -> 8-bit is the 8-bit quantizer (blocksize 256) on the decoded 4-bit values."""
    params = make_params()
    eight = d8.AdamW8bit(params, lr=1e-2)
    train(params, eight, 4)
    torch.save(eight.state_dict(), tmp_path / "8bit.pt")
    down = run(tmp_path / "8bit.pt", tmp_path / "4bit.pt", to="4bit", verify=True)
    assert 0 < down.bound_ratio <= 1.0
    run(tmp_path / "4bit.pt", tmp_path / "up.pt", to="8bit", shapes=shapes_of(params), verify=True)
    source, four, up = (load(tmp_path / n) for n in ("8bit.pt", "4bit.pt", "up.pt"))
    assert four["param_groups"][0]["blocksize"] == 128 and up["param_groups"][0]["blocksize"] == 256
    for key in (0, 1):
        numel = params[key].numel()
        for name in ("exp_avg", "exp_avg_sq"):
            values = decoded(source["state"][key], name, 8, 256, numel)
            codes, absmax = codec.quantize_exact(values, state_map(name == "exp_avg", 4), 128)
            assert torch.equal(four["state"][key][name + "_codes"], codes), (key, name)
            assert torch.equal(four["state"][key][name + "_absmax"], absmax), (key, name)
            values4 = decoded(four["state"][key], name, 4, 128, numel)
            codes, absmax = codec.quantize_exact(values4, state_map(name == "exp_avg", 8), 256)
            assert torch.equal(up["state"][key][name + "_codes"].reshape(-1), codes), (key, name)
            assert torch.equal(up["state"][key][name + "_absmax"], absmax), (key, name)
    assert torch.equal(four["state"][2]["exp_avg"], source["state"][2]["exp_avg"])  # small tensor stays fp32
    d8.AdamW4bit(clone(params), lr=1e-2).load_state_dict(four)
    d8.AdamW8bit(clone(params), lr=1e-2).load_state_dict(up)


def test_mismatched_or_corrupt_4bit_state_is_refused(tmp_path):
    params, optimizer = trained("adamw", 2)
    shapes = shapes_of(params)
    cases = {}
    sd = copy.deepcopy(optimizer.state_dict())  # state_dict() shares the optimizer's per-parameter dicts
    sd["state"][0]["exp_avg_codes"] = torch.zeros(params[0].numel(), dtype=torch.uint8)  # 8-bit-sized codes
    cases["8-bit-sized codes"] = (sd, "take 2129 bytes of 4-bit codes")
    sd = copy.deepcopy(optimizer.state_dict())
    sd["state"][1]["exp_avg_sq_absmax"] = sd["state"][1]["exp_avg_sq_absmax"][:-1]  # truncated scales
    cases["truncated scales"] = (sd, "need 36 absmax scales")
    sd = copy.deepcopy(optimizer.state_dict())
    sd["param_groups"][0]["optim_bits"] = 8  # packed codes in a group that says 8-bit
    cases["group says 8-bit"] = (sd, r"shaped \(2129,\) but the parameter is \(33, 129\) \(is optim_bits=8")
    for label, (state_dict, message) in cases.items():
        torch.save(state_dict, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=message):
            run(tmp_path / "bad.pt", tmp_path / f"{label}.pt", to="fp32", shapes=shapes)
        assert not (tmp_path / f"{label}.pt").exists()


def test_cli_converts_to_4bit(tmp_path, capsys):
    params = make_params()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    train(params, optimizer, 2)
    torch.save(optimizer.state_dict(), tmp_path / "fp32.pt")
    assert cli.main(["convert", str(tmp_path / "fp32.pt"), str(tmp_path / "4bit.pt"), "--to", "4bit", "--quiet"]) == 0
    assert "dist8bit-4bit (blocksize 128)" in capsys.readouterr().out
    d8.AdamW4bit(clone(params), lr=1e-2).load_state_dict(load(tmp_path / "4bit.pt"))


# ------------------------------------------------------------------ ZeRO pieces of odd length
def test_zero_4bit_pieces_of_odd_length_read_and_write_bit_exact():
    """A flat (ZeRO) partition of AWKWARD sizes (17, 255, 4097: odd) stepped by AdamW4bit: every
    segment's packed run reads back as the optimizer's own values, and writing the pieces again from
    their fp32 values gives the very bytes of the packed state (padding included)."""
    from dist8bit.checkpoint import deepspeed_format
    from dist8bit.checkpoint.canonical import Dense, Pieced, Quantized
    from dist8bit.checkpoint.deepspeed_layout import Flat, Piece
    from dist8bit.checkpoint.writer import Slot
    from dist8bit.optim.segments import packed_layout, table_bits

    flat, segments, params = awkward_segments()
    optimizer = flat_optimizer(params, flat, segments, d8.AdamW4bit)
    step_flat(optimizer, flat, segments, 3)
    saved = optimizer.state_dict()
    state, group = saved["state"][0], saved["param_groups"][0]
    bits = table_bits(state["segment_table"])
    assert bits == [32 if n < 16 else 4 for n in AWKWARD]
    pieces = tuple(Piece(f"p{i}", s.start, s.length, s.param_offset) for i, s in enumerate(segments))
    read = list(deepspeed_format._state_pieces(state, Flat(0, flat.numel(), pieces), group, "4-bit flat"))
    values = {(s.start, n): v for s, _, vs in optimizer.segment_states(flat) for n, v in vs.items()}
    for piece, name, buffer in read:
        if isinstance(buffer, Quantized):
            assert buffer.bits == 4 and buffer.numel == piece.length
        got = plan_values(buffer)
        torch.testing.assert_close(got, values[(piece.start, name)], rtol=0, atol=0)
    layout = packed_layout(segments, bits, group["blocksize"])
    for name in ("exp_avg", "exp_avg_sq"):
        sources = [
            (Pieced(p.length, ((0, Dense(plan_values(b))),)), p, layout.value_offsets[i], layout.block_offsets[i])
            for i, (p, b) in enumerate((p, b) for p, n, b in read if n == name)
            if bits[i] == 4
        ]
        codes = Slot((layout.codes_numel,), torch.uint8, name + "_codes")
        absmax = Slot((layout.blocks,), torch.float32, name + "_absmax")
        sink = MemorySink()
        code = state_map(name == "exp_avg", 4)
        deepspeed_format._quantize_job(name, sources, codes, absmax, group["blocksize"], code, plan_read).run(sink)
        assert torch.equal(sink.tensor(codes), state[name + "_codes"]), name
        assert torch.equal(sink.tensor(absmax), state[name + "_absmax"]), name


def plan_values(buffer) -> torch.Tensor:
    from dist8bit.checkpoint.plan import read_values

    return read_values(buffer, 0, buffer.numel)


def plan_read(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return tensor.reshape(-1)[start:stop]
