"""`dist8bit plan`: its arguments and what it prints (the rest of the command line is in dist8bit/cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..optim.master_weights import MODES
from ..quant.weight_error import ERROR_DTYPES
from .bytes_model import (
    DEFAULT_ERROR_BITS,
    KEEPS_MASTER,
    MIXED_PRECISION,
    OFFLOADS,
    STRATEGIES,
    Cluster,
    Option,
    largest_fitting_params,
    plan,
)
from .model_shapes import PRESETS, ModelShape, gpt_shapes, model_from_params, preset
from .report import breakdown_table, gib, option_rows, options_table, parse_bytes, plot_largest
from .state_bytes import parse_optimizer


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", choices=sorted(PRESETS), help="a preset model shape (default llama-7b)")
    model.add_argument("--params", type=float, help="a parameter count (e.g. 7e9): width x width matrices of --width")
    model.add_argument("--layers", type=int, help="a GPT (launch/model.py) of --layers, --width and --vocab")
    parser.add_argument("--width", type=int, default=4096, help="model width for --layers / --params (default 4096)")
    parser.add_argument("--vocab", type=int, default=50257, help="vocabulary for --layers (default 50257)")
    parser.add_argument("--stable-embedding", action="store_true", help="the token embedding keeps 32-bit state")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="zero3")
    parser.add_argument(
        "--optim", default="adamw8bit", help="optimizer and state precision: adamw8bit, adamw32bit, lion8bit, ..."
    )
    parser.add_argument("--mixed-precision", choices=sorted(MIXED_PRECISION), default="bf16")
    parser.add_argument("--offload", choices=OFFLOADS, default="none", help="optimizer: master, states, fp32 grads on the host")
    parser.add_argument(
        "--master-weights",
        choices=MODES,
        default=KEEPS_MASTER,
        help="fp32: an fp32 master copy (default); none/stochastic/compensated: bf16 weights the optimizer writes itself",
    )
    parser.add_argument(
        "--error-bits",
        type=int,
        choices=sorted(ERROR_DTYPES),
        help=f"bits per parameter of the compensated error buffer (default {DEFAULT_ERROR_BITS})",
    )
    parser.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU (default 80GiB)")
    parser.add_argument("--host-memory", help="host memory of one node (default: not a limit)")
    parser.add_argument("--reserve", default="0GiB", help="GPU memory kept for activations, buffers and the CUDA context")
    parser.add_argument("--plot", type=Path, help="write a PNG of the largest model each option fits")


def model_of(args: argparse.Namespace) -> ModelShape:
    if args.params is not None:
        model = model_from_params(int(args.params), args.width)
    elif args.layers is not None:
        model = gpt_shapes(f"gpt {args.layers}x{args.width} vocab {args.vocab}", args.layers, args.width, args.vocab)
    else:
        model = preset(args.model or "llama-7b")
    return model.with_stable_embedding() if args.stable_embedding else model


def error_bits_of(args: argparse.Namespace) -> int:
    """--error-bits, refused with any other mode than compensated (it would silently mean nothing)."""
    if args.error_bits is None:
        return DEFAULT_ERROR_BITS
    if args.master_weights != "compensated":
        raise ValueError(
            f"--error-bits sizes the error buffer of --master-weights compensated; --master-weights "
            f"{args.master_weights} keeps none"
        )
    return args.error_bits


def run_plan(args: argparse.Namespace) -> int:
    try:
        model = model_of(args)
        family, precision = parse_optimizer(args.optim)
        cluster = Cluster(args.gpus * args.nodes, args.nodes)
        option = Option(
            args.strategy,
            family,
            precision.name,
            args.mixed_precision,
            args.offload,
            args.master_weights,
            error_bits_of(args),
        )
        gpu_memory = parse_bytes(args.gpu_memory) - parse_bytes(args.reserve)
        host_memory = parse_bytes(args.host_memory) if args.host_memory else None
        result = plan(model, cluster, option)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"model: {model.name}, {model.num_params:,} parameters (largest module {model.largest_module_params:,})")
    print(f"cluster: {args.nodes} node(s) x {args.gpus} GPU(s); option: {option.label}\n")
    print(breakdown_table(result))
    rows = option_rows(model, cluster, option, gpu_memory, host_memory)
    print(f"\nevery option ({family}, {args.mixed_precision}; largest model on {gib(gpu_memory):.0f} GiB per GPU):")
    print(options_table(rows))
    if args.plot is not None and plot_largest(rows, args.plot, f"{model.name} on {args.nodes}x{args.gpus} GPUs"):
        print(f"\nplot: {args.plot}")
    largest = largest_fitting_params(result, gpu_memory, host_memory)
    print(
        f"\nsummary: {option.label} needs {gib(result.gpu_total):.2f} GiB per GPU "
        f"({result.gpu_total / model.num_params:.3f} B/param; states {gib(result.gpu['states']):.2f} GiB"
        f"{error_summary(result.gpu['error'])}) and "
        f"{gib(result.host_total * cluster.gpus_per_node):.2f} GiB per host; "
        f"{'fits' if largest >= model.num_params else 'does not fit'} {gib(gpu_memory):.0f} GiB GPUs, "
        f"largest model {largest / 1e9:.2f}B parameters"
    )
    return 0


def error_summary(error: int) -> str:
    """The summary's error-buffer clause, only where there is one (the fp32-master line stays as it was)."""
    return f", error {gib(error):.2f} GiB" if error else ""
