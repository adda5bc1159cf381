"""The run's precision: --dtype, --master-weights and --error-bits, checked once and applied everywhere.

Three ways to train:

    --dtype fp32                          float32 parameters, float32 compute (the default; unchanged)
    --dtype bf16 --master-weights fp32    float32 parameters (the master) and bfloat16 compute under
                                          torch.autocast; under DeepSpeed, its "bf16" mode (bf16
                                          parameters, DeepSpeed's own fp32 master partition)
    --dtype bf16 --master-weights none|stochastic|compensated
                                          bfloat16 parameters and compute, no master copy: the
                                          optimizer writes the bf16 weights itself (see
                                          dist8bit/optim/master_weights.py and docs/master_weights.md);
                                          under DeepSpeed ZeRO 1-3 over bf16 partitions, ZeRO 0 over
                                          the bf16 model (launch/strategies/deepspeed_engine.py)

The loss is always computed in float32 (the model casts its logits). The
default master for --dtype bf16 is "compensated" (the mode that follows the
fp32 trajectory at 1 B/param of error with --error-bits 8), except under
DeepSpeed, where it is "fp32" (DeepSpeed's own master, what its bf16 mode has
always done) unless the JSON config names a master mode or asks for bf16
master weights. Under DeepSpeed the JSON may still set --dtype, --optim and
the master, so the DeepSpeed strategy settles these flags once it has read it.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from dist8bit.optim.master_weights import MODES
from launch.optimizers import OPTIMIZERS, LaunchError, is_dist8bit

DTYPES = ("fp32", "bf16")
ERROR_BITS = (8, 16)
DEFAULT_BF16_MASTER = "compensated"
# Masters a torch (or other non-dist8bit) optimizer can train under: it writes its parameters in their own
# dtype, so "none" is what it does with bfloat16 parameters, and it has no stochastic or compensated write.
PLAIN_OPTIMIZER_MODES = ("fp32", "none")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The precision flags, in their own group of pretrain.py's parser."""
    group = parser.add_argument_group("precision (see launch/precision.py and docs/pretraining.md)")
    group.add_argument("--dtype", choices=DTYPES, default="fp32", help="parameter/compute dtype of the model")
    group.add_argument(
        "--master-weights",
        choices=MODES,
        default=None,
        help=f"how bf16 weights are updated (default: fp32 for --dtype fp32; {DEFAULT_BF16_MASTER} for bf16, "
        "fp32 under DeepSpeed)",
    )
    group.add_argument(
        "--error-bits", type=int, choices=ERROR_BITS, default=8, help="bits per parameter of the compensated error buffer"
    )


def resolve(args: argparse.Namespace) -> None:
    """Settle the precision flags now, except under DeepSpeed, whose JSON config may still set --dtype,
    --optim and the master mode: deepspeed_engine.effective_config calls `settle` once it has read it."""
    if args.strategy != "deepspeed":
        settle(args)


def settle(args: argparse.Namespace, default_bf16_master: str = DEFAULT_BF16_MASTER) -> None:
    """Settle args.master_weights (default_bf16_master where --dtype bf16 names none) and args.error_bits
    (None where no error buffer is kept), refusing combinations that cannot run, each with a one-line reason."""
    if args.master_weights is None:
        args.master_weights = "fp32" if args.dtype == "fp32" else default_bf16_master
    mode = args.master_weights
    if mode not in MODES:
        raise LaunchError(f"master_weights {mode!r} is not one of {', '.join(MODES)}")
    if args.dtype == "fp32" and mode != "fp32":
        raise LaunchError(
            f"--master-weights {mode} trains bfloat16 weights without a float32 master; add --dtype bf16 "
            "(with --dtype fp32 the parameters are float32 and are their own master)"
        )
    check_optimizer(args)
    args.error_bits = args.error_bits if mode == "compensated" else None


def check_optimizer(args: argparse.Namespace) -> None:
    """Refuse a master mode the chosen --optim cannot run (torch's AdamW has no compensated or stochastic write)."""
    if args.optim in OPTIMIZERS and not is_dist8bit(args.optim) and args.master_weights not in PLAIN_OPTIMIZER_MODES:
        raise LaunchError(
            f"--optim {args.optim} is not a dist8bit optimizer and has no {args.master_weights!r} bf16 write "
            f"(it supports --master-weights {' or '.join(PLAIN_OPTIMIZER_MODES)}); use a dist8bit optimizer such as adamw8bit"
        )


def param_dtype(args: argparse.Namespace) -> torch.dtype:
    """The dtype the launcher gives the model's parameters (DeepSpeed's bf16 mode converts them itself)."""
    return torch.bfloat16 if args.dtype == "bf16" and args.master_weights != "fp32" else torch.float32


def uses_autocast(args: argparse.Namespace) -> bool:
    """bf16 compute over float32 parameters. Not under DeepSpeed: its bf16 mode runs the model in bf16."""
    return args.dtype == "bf16" and args.master_weights == "fp32" and args.strategy != "deepspeed"


@contextlib.contextmanager
def forward_context(args: argparse.Namespace, device: torch.device) -> Iterator[None]:
    """Where the forward pass and the loss run: under torch.autocast for bf16 with an fp32 master, else as is."""
    if uses_autocast(args):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def describe(args: argparse.Namespace) -> dict[str, Any]:
    """The precision facts metrics.json records."""
    return {
        "dtype": args.dtype,
        "master_weights": args.master_weights,
        "error_bits": args.error_bits,
        "param_dtype": "bfloat16" if args.dtype == "bf16" and not uses_autocast(args) else "float32",
        "autocast": uses_autocast(args),
    }


def check_resumable(saved_args: dict[str, Any], args: argparse.Namespace, directory: Any) -> None:
    """A checkpoint continues only with the dtype and master mode it was trained with (a checkpoint from
    before these flags was fp32). --error-bits may change: the optimizer converts the saved error buffer."""
    saved = (saved_args.get("dtype", "fp32"), saved_args.get("master_weights") or "fp32")
    if saved != (args.dtype, args.master_weights):
        raise LaunchError(
            f"{directory} was trained with --dtype {saved[0]} --master-weights {saved[1]}, this run asks for --dtype "
            f"{args.dtype} --master-weights {args.master_weights}; resume with the same flags"
        )
