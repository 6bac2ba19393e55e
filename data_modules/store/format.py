"""Names and constants of the corpus format (documented in docs/corpus_format.md)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
VOCAB_NAME = "vocab.json"
SHARD_DIR = "shards"


class CorpusFormatError(ValueError):
    """A corpus directory or shard that does not follow the format."""


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:06d}.h5"


def narrowest_count_dtype(data: np.ndarray, allow_float: bool) -> np.dtype:
    """Smallest dtype that holds every value exactly: uint16, uint32, else float32."""
    if data.size == 0:
        return np.dtype(np.uint16)
    is_int = np.all(np.mod(data, 1) == 0)
    if is_int and data.min() >= 0:
        hi = data.max()
        if hi <= np.iinfo(np.uint16).max:
            return np.dtype(np.uint16)
        if hi <= np.iinfo(np.uint32).max:
            return np.dtype(np.uint32)
    if not allow_float and not is_int:
        raise CorpusFormatError("non-integer counts need allow_float")
    return np.dtype(np.float32)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_tmp(path: Path) -> Path:
    """Temporary sibling path used for write-then-rename."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")
