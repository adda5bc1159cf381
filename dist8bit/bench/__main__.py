"""python -m dist8bit.bench {quantize,optim,offload,quantiles,paged,convert,gpu-check} [--out DIR] ..."""

from __future__ import annotations

import argparse

from . import convert, gpu_check, offload, optim, paged, quantiles, quantize

BENCHMARKS = {
    "quantize": (quantize, "quantize/dequantize throughput per backend vs bitsandbytes and copy bandwidth"),
    "optim": (optim, "AdamW step time and state memory vs torch, bitsandbytes and torchao"),
    "offload": (offload, "ZeRO-Offload host step: fp32 master + 8-bit state vs DeepSpeedCPUAdam and torch fused AdamW"),
    "quantiles": (quantiles, "estimate_quantiles vs torch.quantile and a full sort"),
    "paged": (paged, "paged optimizer states: overhead when everything fits, step time with a fraction evicted"),
    "convert": (convert, "checkpoint conversion throughput and peak memory on a synthetic AdamW checkpoint"),
    "gpu-check": (gpu_check, "build, GPU tests, benchmarks, paging and one-GPU launcher runs in one bounded run"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dist8bit.bench", description=__doc__)
    commands = parser.add_subparsers(dest="benchmark", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        module.add_arguments(commands.add_parser(name, help=help_text, description=module.__doc__))
    args = parser.parse_args(argv)
    BENCHMARKS[args.benchmark][0].run(args)


if __name__ == "__main__":
    main()
