"""The `dist8bit` command: `dist8bit convert SRC DST --to fp32|8bit|4bit ...` (docs/checkpoints.md) and
`dist8bit plan --model llama-7b --gpus 8 ...` (docs/planner.md)."""

from __future__ import annotations

import argparse
import sys


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    from .checkpoint.conversion import TARGETS

    parser.add_argument(
        "src",
        help="checkpoint to read: a torch.save file with an optimizer state dict, or a DeepSpeed or DCP checkpoint directory",
    )
    parser.add_argument("dst", help="where to write the converted checkpoint (refused if it exists, unless --overwrite)")
    parser.add_argument("--to", required=True, choices=TARGETS, help="target state precision")
    parser.add_argument(
        "--optimizer",
        help="optimizer kind (adamw, adam, sgd, lion, rmsprop, adagrad, lamb, lars, ademamix); needed for bitsandbytes",
    )
    parser.add_argument("--world-size", type=int, help="ranks of the output (DeepSpeed / DCP directories)")
    parser.add_argument(
        "--blocksize", type=int, help="block size (default: the source's at that precision, else 256 for 8bit, 128 for 4bit)"
    )
    parser.add_argument(
        "--min-8bit-size", type=int, help="parameters with fewer elements keep fp32 state (default: the source's, else 4096)"
    )
    parser.add_argument(
        "--keep-fp32",
        default="",
        help="comma-separated parameter indices whose state stays fp32 (e.g. an embedding with a 32-bit override)",
    )
    parser.add_argument(
        "--error-bits",
        choices=("8", "16", "none"),
        help="compensated bf16 parameters' weight_error: re-width it to int8/int16, or drop it (each weight loses "
        "less than half a bf16 ulp); default: carried per element as the source has it",
    )
    parser.add_argument(
        "--verify", action="store_true", help="re-read the output and check it against the source before keeping it"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_convert(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, convert

    # parameter indices (torch state dicts) or names (DeepSpeed checkpoints)
    keep = [int(k) if k.strip().isdigit() else k.strip() for k in args.keep_fp32.split(",") if k.strip()]
    try:
        report = convert(
            args.src,
            args.dst,
            to=args.to,
            optimizer=args.optimizer,
            world_size=args.world_size,
            blocksize=args.blocksize,
            min_8bit_size=args.min_8bit_size,
            keep_fp32=keep,
            error_bits=args.error_bits,
            verify=args.verify,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    from .planner.cli import add_plan_arguments, run_plan

    parser = argparse.ArgumentParser(prog="dist8bit", description="dist8bit command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert optimizer checkpoints between 4-bit, 8-bit and fp32 states")
    add_convert_arguments(convert)
    convert.set_defaults(run=run_convert)
    planner = commands.add_parser("plan", help="estimate per-GPU and per-host memory of a training run")
    add_plan_arguments(planner)
    planner.set_defaults(run=run_plan)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
