"""gpu-check step 1: build and load the CPU and CUDA extensions, timing each.

Run as `python -m dist8bit.bench.gpu_check_build`. The CPU extension is built
too because every later step needs it (tests/conftest.py builds it at
collection; the benchmarks time CPU rows): building it here keeps its time
out of the test and benchmark budgets. Prints one `GPU_CHECK_RESULT {json}`
line and exits 1 if either build failed (after trying both).
"""

from __future__ import annotations

import json
import time
import traceback

from ..backends import build
from .gpu_check_parse import RESULT_MARK


def _timed(kind: str, loader) -> tuple[float | None, str | None]:
    begin = time.perf_counter()
    try:
        path = loader()
    except Exception as error:  # every build failure is reported, then the other build still runs
        traceback.print_exc()
        return None, f"{kind}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    seconds = time.perf_counter() - begin
    print(f"{kind} extension: {path} ({seconds:.1f} s)", flush=True)
    return seconds, None


def main() -> int:
    result: dict[str, object] = {"cache_root": str(build.cache_root())}
    errors = []
    for kind, loader in (("cpu", build.load_cpu_extension), ("cuda", build.load_cuda_extension)):
        seconds, error = _timed(kind, loader)
        result[f"{kind}_build_s"] = seconds
        if error:
            errors.append(error)
    result["errors"] = errors
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
