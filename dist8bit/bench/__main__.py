"""python -m dist8bit.bench [--cpu-kernels native|avx2|avx512-novbmi|portable] {quantize,optim,offload,quantiles,paged,convert,gpu-check} [--out DIR] ..."""

from __future__ import annotations

import argparse

from ..backends import use_cpu_variant
from ..backends.build import CPU_VARIANT_FLAGS
from . import convert, gpu_check, offload, optim, paged, quantiles, quantize, report

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
    parser.add_argument(
        "--cpu-kernels",
        choices=["native", *CPU_VARIANT_FLAGS],
        default="native",
        help="time another build of the CPU kernels: avx2 = the path of x86 CPUs without AVX-512 "
        "(built with -mno-avx512f), avx512-novbmi = AVX-512 without VBMI (Skylake-SP/Cascade Lake), "
        "portable = the scalar loops; recorded in the JSON's machine",
    )
    commands = parser.add_subparsers(dest="benchmark", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        module.add_arguments(commands.add_parser(name, help=help_text, description=module.__doc__))
    args = parser.parse_args(argv)
    if args.cpu_kernels != "native":
        use_cpu_variant(args.cpu_kernels)
        report.CPU_KERNELS = args.cpu_kernels
        print(f"dist8bit CPU operators run the {args.cpu_kernels} build of the kernels (--cpu-kernels)")
    BENCHMARKS[args.benchmark][0].run(args)


if __name__ == "__main__":
    main()
