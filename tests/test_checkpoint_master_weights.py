"""`dist8bit convert` and compensated bf16 parameters (master_weights="compensated", issue 16).

Their state holds `weight_error`: int8/int16 codes, one per element, of what the last bf16 write dropped
(quant/weight_error.py). A conversion must carry them element for element whatever the states become
(per-parameter files, ZeRO flats resharded onto another rank count, DCP), re-width them or drop them only
when asked (never silently), and refuse a corrupt one naming the parameter. Oracles: an uninterrupted run
(resumes must continue it bit for bit) and the source's own codes.

ZeRO checkpoints are written here without DeepSpeed: the ranks' flat bf16 partitions (DeepSpeed's
bf16_master_weights_and_grads layout, from checkpoint/deepspeed_layout.py) are stepped by one dist8bit
AdamW per rank through set_segments, and saved in DeepSpeed's file layout; the DeepSpeed runs themselves
are tests/test_deepspeed*.py's.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from dist8bit import optim
from dist8bit.checkpoint import CheckpointError, convert
from dist8bit.checkpoint.deepspeed_layout import ZeroLayout
from dist8bit.cli import main
from dist8bit.optim.master_weights import converted_error
from dist8bit.optim.segments import Segment

SHAPES = OrderedDict([("fc1.weight", (48, 40)), ("fc1.bias", (33,)), ("fc2.weight", (24, 50))])
LR, MIN_8BIT = 1e-3, 256


def grad(index: int, numel: int, step: int) -> torch.Tensor:
    """The same gradient for an element whatever rank or flat holds it."""
    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 * step + index))


def initial_weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator).bfloat16() for name, shape in SHAPES.items()}


def convert_quiet(src, dst, **kwargs):
    return convert(src, dst, progress=False, verify=True, **kwargs)


# ------------------------------------------------------------------ per-parameter state dicts
def make_run(weights: dict[str, torch.Tensor], optim_bits: int = 8, error_bits: int = 8):
    params = [torch.nn.Parameter(w.clone()) for w in weights.values()]
    opt = optim.AdamW(
        params, lr=LR, optim_bits=optim_bits, min_8bit_size=MIN_8BIT, master_weights="compensated", error_bits=error_bits
    )
    return params, opt


def step_params(params, opt, steps: range) -> None:
    for step in steps:
        for index, param in enumerate(params):
            param.grad = grad(index, param.numel(), step).view(param.shape).bfloat16()
        opt.step()


def saved_run(tmp_path: Path, steps: int = 3, **kwargs) -> tuple[Path, list, optim.Optimizer8bit]:
    params, opt = make_run(initial_weights(), **kwargs)
    step_params(params, opt, range(steps))
    path = tmp_path / "src.pt"
    torch.save({"model": {n: p.detach() for n, p in zip(SHAPES, params, strict=True)}, "optimizer": opt.state_dict()}, path)
    return path, params, opt


def test_8bit_to_fp32_to_8bit_keeps_weight_error_and_resumes_exactly(tmp_path):
    src, params, opt = saved_run(tmp_path)
    source = torch.load(src, weights_only=True)
    assert all(source["optimizer"]["state"][k]["weight_error"].dtype == torch.int8 for k in range(3))
    assert any(bool(source["optimizer"]["state"][k]["weight_error"].any()) for k in range(3))
    fp32 = convert_quiet(src, tmp_path / "fp32.pt", to="fp32")
    assert "weight_error of 3 compensated bf16 parameters (int8) carried per element, unchanged" in fp32.summary()
    convert_quiet(tmp_path / "fp32.pt", tmp_path / "back.pt", to="8bit")
    back = torch.load(tmp_path / "back.pt", weights_only=True)["optimizer"]
    for key, entry in source["optimizer"]["state"].items():
        assert back["state"][key].keys() == entry.keys()
        for name, value in entry.items():  # 8-bit -> fp32 -> 8-bit is exact, weight_error untouched
            assert value.dtype == back["state"][key][name].dtype and torch.equal(value, back["state"][key][name]), name

    step_params(params, opt, range(3, 6))  # the uninterrupted run
    resumed_params, resumed = make_run(source["model"])
    resumed.load_state_dict(back)
    step_params(resumed_params, resumed, range(3, 6))
    for a, b in zip(params, resumed_params, strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
        assert torch.equal(opt.state[a]["weight_error"], resumed.state[b]["weight_error"])


def test_fp32_output_loads_into_torch_adamw_which_ignores_weight_error(tmp_path):
    """torch.optim has no place for weight_error but tolerates the extra entry: the fp32 output loads and steps."""
    src, *_ = saved_run(tmp_path, optim_bits=32)
    convert_quiet(src, tmp_path / "fp32.pt", to="fp32")
    params = [torch.nn.Parameter(w) for w in initial_weights().values()]
    adamw = torch.optim.AdamW(params, lr=LR)
    adamw.load_state_dict(torch.load(tmp_path / "fp32.pt", weights_only=True)["optimizer"])
    step_params(params, adamw, range(3, 4))
    assert adamw.state[params[0]]["step"] == 4
    # torch.optim casts the codes to the parameter's dtype and leaves them stale: refused back into dist8bit,
    # unless dropped
    torch.save(adamw.state_dict(), tmp_path / "torch.pt")
    with pytest.raises(CheckpointError, match=r"got torch.bfloat16 .*: --error-bits none"):
        convert(tmp_path / "torch.pt", tmp_path / "back.pt", to="8bit", optimizer="adamw", progress=False)
    with pytest.warns(UserWarning, match=r"weight_error of 3 compensated bf16 parameters \(bfloat16\) dropped"):
        convert_quiet(tmp_path / "torch.pt", tmp_path / "back.pt", to="8bit", optimizer="adamw", error_bits="none")
    assert all("weight_error" not in e for e in torch.load(tmp_path / "back.pt", weights_only=True)["state"].values())


def test_error_bits_rewidths_and_none_drops_with_a_warning(tmp_path, capsys):
    src, *_ = saved_run(tmp_path)
    codes = torch.load(src, weights_only=True)["optimizer"]["state"][0]["weight_error"]
    wide = convert_quiet(src, tmp_path / "16.pt", to="8bit", error_bits=16)
    assert "converted to int16" in wide.summary()
    widened = torch.load(tmp_path / "16.pt", weights_only=True)["optimizer"]["state"][0]["weight_error"]
    assert widened.dtype == torch.int16 and torch.equal(widened, codes.to(torch.int16) * 256)
    convert_quiet(tmp_path / "16.pt", tmp_path / "8.pt", to="fp32", error_bits=8)  # 8 -> 16 -> 8 is exact
    assert torch.equal(torch.load(tmp_path / "8.pt", weights_only=True)["optimizer"]["state"][0]["weight_error"], codes)
    assert torch.equal(converted_error(widened, 8), codes)

    with pytest.warns(UserWarning, match=r"weight_error of 3 compensated bf16 parameters \(int8\) dropped"):
        dropped = convert_quiet(src, tmp_path / "none.pt", to="fp32", error_bits="none")
    assert "less than half a bfloat16 ulp" in dropped.summary()
    state = torch.load(tmp_path / "none.pt", weights_only=True)["optimizer"]["state"]
    assert all("weight_error" not in entry for entry in state.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the command line warns and says it in its summary too
        with pytest.warns(UserWarning, match="dropped"):
            assert main(["convert", str(src), str(tmp_path / "cli.pt"), "--to", "8bit", "--error-bits", "none", "--quiet"]) == 0
    assert "dropped: each weight loses its compensation" in capsys.readouterr().out
    assert main(["convert", str(src), str(tmp_path / "kept.pt"), "--to", "8bit", "--quiet"]) == 0
    with pytest.raises(CheckpointError, match="--error-bits must be 8, 16 or none"):
        convert(src, tmp_path / "x.pt", to="8bit", error_bits=4)


def test_4bit_state_takes_the_parameter_shape_from_weight_error(tmp_path):
    """Packed 4-bit codes do not say the parameter's shape; a compensated parameter's weight_error does."""
    params, opt = make_run(initial_weights(), optim_bits=4)
    step_params(params, opt, range(2))
    torch.save(opt.state_dict(), tmp_path / "4bit.pt")  # no model, no param_names beside it
    convert_quiet(tmp_path / "4bit.pt", tmp_path / "fp32.pt", to="fp32")
    state = torch.load(tmp_path / "fp32.pt", weights_only=True)["state"]
    assert [tuple(state[k]["exp_avg"].shape) for k in range(3)] == list(SHAPES.values())
    bare = opt.state_dict()  # without it the shape is unknown: refused, as before
    bare["state"][0] = {k: v for k, v in bare["state"][0].items() if k != "weight_error"}
    torch.save(bare, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="does not say the parameter's shape"):
        convert(tmp_path / "bare.pt", tmp_path / "x.pt", to="fp32", progress=False)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda e: e.float(), r"must be an int8 or int16 tensor.* got torch.float32"),
        (lambda e: e.view(torch.uint8), "got torch.uint8"),
        (lambda e: e.reshape(-1)[:-1], r"of 1920 elements .* got torch.int8 with 1919 elements"),
        (lambda e: [1, 2], "got list"),
    ],
)
def test_corrupt_weight_error_is_refused_naming_the_parameter(tmp_path, corrupt, message):
    src, *_ = saved_run(tmp_path, steps=1)
    checkpoint = torch.load(src, weights_only=True)
    checkpoint["optimizer"]["state"][0]["weight_error"] = corrupt(checkpoint["optimizer"]["state"][0]["weight_error"])
    torch.save(checkpoint, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"\['optimizer'\]: parameter 0: weight_error .*" + message):
        convert(tmp_path / "bad.pt", tmp_path / "out.pt", to="fp32", progress=False)
    assert not (tmp_path / "out.pt").exists()
    if isinstance(checkpoint["optimizer"]["state"][0]["weight_error"], torch.Tensor):  # a tensor may be dropped unchecked
        with pytest.warns(UserWarning, match="dropped"):
            convert_quiet(tmp_path / "bad.pt", tmp_path / "out.pt", to="fp32", error_bits="none")


# ------------------------------------------------------------------ ZeRO flats
def load_rank_file(directory: Path, rank: int) -> dict:
    from dist8bit.checkpoint import deepspeed_format  # DeepSpeed's classes are allowed for weights_only

    return deepspeed_format.load_file(directory / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")


class ZeroRun:
    """Every rank's dist8bit AdamW over its bf16 ZeRO flats (stage 2: one flat, stage 3: one per sub-group)."""

    def __init__(self, stage: int, world: int, weights: dict[str, torch.Tensor], min_8bit_size: int) -> None:
        self.stage, self.world = stage, world
        self.layout = ZeroLayout.build(stage, [OrderedDict((n, torch.Size(s)) for n, s in SHAPES.items())], world)
        self.sources = {name: torch.empty(shape) for name, shape in SHAPES.items()}  # parameter identities
        self.ranks = []
        for rank in range(world):
            flats = []
            for flat in self.layout.flats(rank):
                tensor = torch.zeros(flat.size, dtype=torch.bfloat16)
                for piece in flat.pieces:
                    tensor[piece.start : piece.start + piece.length] = weights[piece.name].reshape(-1)[self._span(piece)]
                flats.append((flat, tensor))
            opt = optim.AdamW8bit([t for _, t in flats], lr=LR, min_8bit_size=min_8bit_size, master_weights="compensated")
            for flat, tensor in flats:
                segments = [Segment(self.sources[p.name], p.start, p.length, p.param_offset, self._numel(p)) for p in flat.pieces]
                opt.set_segments(tensor, segments)
            self.ranks.append((flats, opt))

    @staticmethod
    def _span(piece) -> slice:
        return slice(piece.param_offset, piece.param_offset + piece.length)

    @staticmethod
    def _numel(piece) -> int:
        return int(torch.Size(SHAPES[piece.name]).numel())

    def step(self, steps: range) -> None:
        for step in steps:
            for flats, opt in self.ranks:
                for flat, tensor in flats:
                    tensor.grad = torch.zeros_like(tensor)
                    for piece in flat.pieces:
                        full = grad(list(SHAPES).index(piece.name), self._numel(piece), step)
                        tensor.grad[piece.start : piece.start + piece.length] = full[self._span(piece)].bfloat16()
                opt.step()

    def gather(self, error: bool = False) -> dict[str, torch.Tensor]:
        """Whole parameters (bf16 bits as int16), or their weight_error codes."""
        out = {name: torch.zeros(int(torch.Size(shape).numel()), dtype=torch.int16) for name, shape in SHAPES.items()}
        for flats, opt in self.ranks:
            for flat, tensor in flats:
                source = opt.state[tensor]["weight_error"] if error else tensor.view(torch.int16)
                for piece in flat.pieces:
                    out[piece.name][self._span(piece)] = source[piece.start : piece.start + piece.length].to(torch.int16)
        return out

    def save(self, directory: Path) -> None:
        """DeepSpeed's files: model states (param_shapes, dp_world_size) and one optimizer file per rank."""
        directory.mkdir(parents=True)
        shapes = [OrderedDict((n, torch.Size(s)) for n, s in SHAPES.items())]
        model = {"param_shapes": shapes, "dp_world_size": self.world, "module": {}}
        names = (
            [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(self.world)]
            if self.stage == 3
            else ["mp_rank_00_model_states.pt"]
        )
        for name in names:
            torch.save(model, directory / name)
        base_key, weights_key = self.keys()
        for rank, (flats, opt) in enumerate(self.ranks):
            weights = [t.detach().clone() if self.stage == 3 else t.detach()[: f.used].clone() for f, t in flats]
            osd = {base_key: opt.state_dict(), weights_key: weights, "zero_stage": self.stage, "partition_count": self.world}
            config = {
                "zero_optimization": {"stage": self.stage},
                "bf16": {"enabled": True, "bf16_master_weights_and_grads": True},
            }
            torch.save(
                {"optimizer_state_dict": osd, "ds_config": config}, directory / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            )

    def keys(self) -> tuple[str, str]:
        if self.stage == 3:
            return "optimizer_state_dict", "fp32_flat_groups"
        return "base_optimizer_state", "single_partition_of_fp32_groups"

    @classmethod
    def load(cls, directory: Path, stage: int, world: int, min_8bit_size: int) -> ZeroRun:
        """A run on `world` ranks resumed from converted files (their bf16 partitions and optimizer states)."""
        run = cls(stage, world, {n: torch.zeros(s, dtype=torch.bfloat16) for n, s in SHAPES.items()}, min_8bit_size)
        base_key, weights_key = run.keys()
        for rank, (flats, opt) in enumerate(run.ranks):
            saved = load_rank_file(directory, rank)
            osd = saved["optimizer_state_dict"]
            for (_, tensor), weights in zip(flats, osd[weights_key], strict=True):
                assert weights.dtype == torch.bfloat16  # the bf16 partitions stay bf16 (no fp32 master appears)
                tensor.data[: weights.numel()] = weights
            opt.load_state_dict(osd[base_key])
        return run


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_reshard_moves_each_elements_error_and_resumes_exactly(tmp_path, stage):
    """2 ranks -> 3 ranks: every element's weight_error moves with it, and the 3-rank resume continues the
    uninterrupted 2-rank run bit for bit. Every parameter is under min_8bit_size, so its state is 32-bit and
    its update per element: nothing but a misplaced error code or weight could make the runs differ."""
    run = ZeroRun(stage, 2, initial_weights(), min_8bit_size=1 << 20)
    run.step(range(3))
    run.save(tmp_path / "two")
    report = convert_quiet(tmp_path / "two", tmp_path / "three", to="8bit", world_size=3)
    assert "weight_error of 3 compensated bf16 parameters (int8) carried per element" in report.summary()
    resumed = ZeroRun.load(tmp_path / "three", stage, 3, min_8bit_size=1 << 20)
    for name, codes in run.gather(error=True).items():
        assert torch.equal(resumed.gather(error=True)[name], codes), name
    run.step(range(3, 5))
    resumed.step(range(3, 5))
    for (name, weights), errors in zip(run.gather().items(), run.gather(error=True).values(), strict=True):
        assert torch.equal(resumed.gather()[name], weights), name
        assert torch.equal(resumed.gather(error=True)[name], errors), name


@needs_deepspeed
def test_zero_8bit_reshard_and_back_keeps_weight_error_and_rewidths(tmp_path):
    """8-bit states 2 -> 3 -> 2 ranks (states requantized where blocks moved, within the quantizer's bound:
    --verify) give back every rank's weight_error and bf16 weights bit for bit; --to fp32 (DeepSpeed's
    torch-style flats) keeps them too; --error-bits 16 rewrites each flat's codes at int16, padding included."""
    run = ZeroRun(2, 2, initial_weights(), min_8bit_size=MIN_8BIT)
    run.step(range(3))
    run.save(tmp_path / "two")
    convert_quiet(tmp_path / "two", tmp_path / "three", to="8bit", world_size=3)
    convert_quiet(tmp_path / "three", tmp_path / "back", to="8bit", world_size=2)
    convert_quiet(tmp_path / "two", tmp_path / "fp32", to="fp32")
    convert_quiet(tmp_path / "two", tmp_path / "wide", to="8bit", error_bits=16)
    for rank in range(2):
        two, *others = (load_rank_file(tmp_path / d, rank)["optimizer_state_dict"] for d in ("two", "back", "fp32", "wide"))
        codes = two["base_optimizer_state"]["state"][0]["weight_error"]
        assert codes.dtype == torch.int8 and bool(codes.any())
        for other in others:
            assert torch.equal(two["single_partition_of_fp32_groups"][0], other["single_partition_of_fp32_groups"][0])
            assert other["single_partition_of_fp32_groups"][0].dtype == torch.bfloat16
        back, fp32, wide = (other["base_optimizer_state"]["state"][0]["weight_error"] for other in others)
        assert back.dtype == fp32.dtype == torch.int8 and torch.equal(back, codes) and torch.equal(fp32, codes)
        assert wide.dtype == torch.int16 and torch.equal(wide, converted_error(codes, 16))


@needs_deepspeed
def test_zero_corrupt_weight_error_is_refused_naming_the_flat_and_parameters(tmp_path):
    run = ZeroRun(2, 2, initial_weights(), min_8bit_size=MIN_8BIT)
    run.step(range(1))
    run.save(tmp_path / "two")
    path = tmp_path / "two" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    saved = torch.load(path, weights_only=True)
    state = saved["optimizer_state_dict"]["base_optimizer_state"]["state"][0]
    state["weight_error"] = state["weight_error"][:-3]
    torch.save(saved, path)
    where = r"rank_1_mp_rank_00_optim_states.pt flat 0 \(parameters fc1.bias, fc1.weight, fc2.weight\): weight_error"
    with pytest.raises(CheckpointError, match=where + r".* of 1578 elements .* got torch.int8 with 1575"):
        convert(tmp_path / "two", tmp_path / "out", to="fp32", progress=False)


# ------------------------------------------------------------------ DCP
def test_dcp_weight_error_is_carried_rewidthed_and_checked(tmp_path):
    import torch.distributed.checkpoint as dcp

    *_, opt = saved_run(tmp_path, optim_bits=32)
    state = opt.state_dict()
    names = list(SHAPES)
    optim_sd = {
        "state": {names[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[k] for k in g["params"]]} for g in state["param_groups"]],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no process group: DCP says so
        dcp.save({"optim": optim_sd}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    report = convert_quiet(tmp_path / "dcp", tmp_path / "out", to="8bit", error_bits=16)
    assert "weight_error of 3 compensated bf16 parameters (int8) converted to int16" in report.summary()
    loaded = {"optim": {"state": {n: {"weight_error": torch.empty(SHAPES[n], dtype=torch.int16)} for n in names}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(loaded, checkpoint_id=str(tmp_path / "out"), no_dist=True)
    for key, name in enumerate(names):
        expected = converted_error(state["state"][key]["weight_error"], 16)
        assert torch.equal(loaded["optim"]["state"][name]["weight_error"], expected), name

    optim_sd["state"][names[2]]["weight_error"] = optim_sd["state"][names[2]]["weight_error"][:5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"optim": optim_sd}, checkpoint_id=str(tmp_path / "bad"), no_dist=True)
    with pytest.raises(CheckpointError, match=r"parameter 'fc2.weight': weight_error .* of 1200 elements"):
        convert(tmp_path / "bad", tmp_path / "bad-out", to="fp32", progress=False)
