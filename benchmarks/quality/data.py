"""The corpus: the Python standard library's .py files on the running machine, as bytes (vocabulary 256).

Files are listed in sorted order under `os.path.dirname(os.__file__)`, skipping installed packages; every
`HELD_OUT_EVERY`-th file goes to the held-out split, the rest to training, each split the concatenation of
its files. Both splits are
cached as uint8 .npy files whose name carries the Python version and a hash of the file list, so another
interpreter (or another machine's standard library) builds its own.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOCAB = 256
HELD_OUT_EVERY = 20
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages"})
CACHE_DIR = Path(__file__).resolve().parent / ".cache"


@dataclass(frozen=True)
class Corpus:
    """Training and held-out bytes, and where they came from."""

    train: np.ndarray
    held_out: np.ndarray
    source: str
    files: int

    def describe(self) -> dict[str, object]:
        return {"source": self.source, "files": self.files, "train_bytes": int(self.train.size),
                "held_out_bytes": int(self.held_out.size), "held_out_every": HELD_OUT_EVERY, "vocab": VOCAB}


def source_files(root: Path) -> list[Path]:
    """Every .py file under `root` outside installed packages (site-packages, dist-packages), sorted by
    relative path (deterministic across runs)."""
    files = (p for p in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(root: Path | None = None, cache_dir: Path = CACHE_DIR) -> Corpus:
    """The corpus of `root` (default: this interpreter's standard library), built once and then read from cache."""
    root = Path(os.path.dirname(os.__file__)) if root is None else root
    files = source_files(root)
    if not files:
        raise FileNotFoundError(f"no .py files under {root}")
    listing = "\n".join(f"{p.relative_to(root).as_posix()}:{p.stat().st_size}" for p in files)
    key = f"py{sys.version_info.major}{sys.version_info.minor}-{hashlib.sha256(listing.encode()).hexdigest()[:12]}"
    paths = {split: cache_dir / f"stdlib-{key}-{split}.npy" for split in ("train", "held_out")}
    if not all(p.is_file() for p in paths.values()):
        parts: dict[str, list[bytes]] = {"train": [], "held_out": []}
        for index, path in enumerate(files):
            parts["held_out" if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else "train"].append(path.read_bytes())
        cache_dir.mkdir(parents=True, exist_ok=True)
        for split, path in paths.items():
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, np.frombuffer(b"".join(parts[split]), dtype=np.uint8))
            tmp.replace(path)
    train, held_out = (np.load(paths[s], mmap_mode="r") for s in ("train", "held_out"))
    return Corpus(train=train, held_out=held_out, source=str(root), files=len(files))


class BatchSampler:
    """Random training windows: step `i` of every run with the same seed reads the same windows."""

    def __init__(self, tokens: np.ndarray, batch: int, context: int, seed: int) -> None:
        if tokens.size <= context + 1:
            raise ValueError(f"corpus of {tokens.size} bytes is too short for context {context}")
        self.tokens, self.batch, self.context = tokens, batch, context
        self.rng = np.random.default_rng(seed)

    def next(self) -> np.ndarray:
        """[batch, context + 1] int64: inputs are [:, :-1], targets [:, 1:]."""
        starts = self.rng.integers(0, self.tokens.size - self.context - 1, size=self.batch)
        return np.stack([self.tokens[s : s + self.context + 1] for s in starts]).astype(np.int64)


def held_out_windows(tokens: np.ndarray, context: int, max_tokens: int) -> np.ndarray:
    """Consecutive non-overlapping [n, context + 1] windows from the start of the held-out bytes (n ≥ 1),
    at most `max_tokens` predicted tokens in all: every context length is scored on the same text prefix."""
    available = (tokens.size - 1) // context
    if available < 1:
        raise ValueError(f"held-out split of {tokens.size} bytes is too short for context {context}")
    count = max(1, min(max_tokens // context, available))
    return np.stack([tokens[i * context : i * context + context + 1] for i in range(count)]).astype(np.int64)
