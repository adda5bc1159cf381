"""Atomic replacement of a file or directory: readers see the old one or the new one.

Output is written to a hidden temporary sibling (same file system, so the final
rename is atomic) and moved into place only after it is complete and synced.
On any error, including KeyboardInterrupt, the temporary is removed, so an
interrupted conversion never leaves a partial checkpoint behind. (A process
killed with SIGKILL can leave a `.<name>.tmp-*` sibling, never a half-written
destination.)
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError


def check_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
    if not dst.parent.is_dir():
        raise CheckpointError(f"the directory {dst.parent} for the output does not exist; create it first")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # platforms without directory fds
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(dst: Path, overwrite: bool, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `dst`."""
    dst = Path(dst)
    check_destination(dst, overwrite)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        _sync_tree(tmp)
        if dst.exists() and (directory or dst.is_dir()):
            # os.replace cannot replace a non-empty directory: move the old one
            # aside first, then drop it once the new one is in place (between
            # the two renames `dst` is briefly absent, never partial).
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            _remove(old)
        else:
            os.replace(tmp, dst)
        _fsync_directory(dst.parent)
    except BaseException:
        _remove(tmp)
        raise


def _sync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb+") as handle:
            os.fsync(handle.fileno())
    if path.is_dir():
        _fsync_directory(path)
