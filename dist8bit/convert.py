"""python -m dist8bit.convert SRC DST --to fp32|8bit [...]: the same as `dist8bit convert`."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
