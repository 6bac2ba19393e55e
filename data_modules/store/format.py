"""Names and constants of the corpus format (documented in docs/corpus_format.md)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from data_modules.errors import UserInputError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
VOCAB_NAME = "vocab.json"
SHARD_DIR = "shards"
VERIFIED_CACHE = ".verified.json"  # shards whose sha256 a training run checked (data_modules/store/integrity.py)
JOURNAL_DIR = ".journal"  # progress of an unfinished conversion; removed when the manifest is written
UNKNOWN_LABEL = "unknown"  # obs label of a cell whose dataset lacks the column (or has NaN there)

# datasets inside every shard
INDPTR = "indptr"  # (n_cells+1,) int64
INDICES = "indices"  # (nnz,) vocab ids: uint16 when the vocab has <= 65,536 tokens, else int32
DATA = "data"  # (nnz,) counts: uint16 / uint32 when integral, float32 (normalized input) / float64
SOURCE_ROW = "source_row"  # (n_cells,) int64 row in the source file (h5ad row / Census soma_joinid)
OBS_GROUP = "obs"  # obs/<column>: (n_cells,) int32 codes into manifest["obs_columns"][column]

# per-block checksums, checked on every read (docs/corpus_format.md "Checksums"): the datasets stay contiguous; for each
# one, CHECKSUM_GROUP/<dataset path> holds the xxh3-64 digest of every block (its attr "block"): for indices / data the
# entries of BLOCK_CELLS cells, for the per-cell arrays (indptr, source_row, obs codes) BLOCK_ELEMENTS elements
CHECKSUM = "xxh3_64"
CHECKSUM_GROUP = "checksums"
BLOCK_CELLS = 64  # divides the loader's block sizes (data.block_size 32 in the demo config is the one exception)
BLOCK_ELEMENTS = 1024  # a few KB: one or two blocks per loader read, so few hash calls
MANIFEST_DIGEST = "manifest_sha256"  # sha256 of the manifest's canonical JSON without this key


class CorpusFormatError(UserInputError):
    """A corpus directory, shard or input that does not follow the format."""


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:06d}.h5"


def index_dtype(vocab_size: int) -> np.dtype:
    """Narrowest dtype for vocab ids."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def narrowest_count_dtype(data: np.ndarray, allow_float: bool) -> np.dtype:
    """Smallest dtype that holds every value exactly: uint16, uint32, float64 (huge integers),
    else float32 for non-integer (normalized) values when ``allow_float``."""
    if data.size == 0:
        return np.dtype(np.uint16)
    is_int = bool(np.all(np.mod(data, 1) == 0))
    if is_int and data.min() >= 0:
        hi = data.max()
        if hi <= np.iinfo(np.uint16).max:
            return np.dtype(np.uint16)
        if hi <= np.iinfo(np.uint32).max:
            return np.dtype(np.uint32)
        return np.dtype(np.float64)
    if not allow_float and not is_int:
        raise CorpusFormatError("non-integer counts need allow_float")
    return np.dtype(np.float32)


def block_digests(values: np.ndarray, block: int) -> np.ndarray:
    """(ceil(n / block),) uint64: xxh3-64 of the bytes of each ``block`` elements of 1-D ``values``."""
    import xxhash

    raw = memoryview(np.ascontiguousarray(values)).cast("B")
    step = block * values.dtype.itemsize
    return np.array([xxhash.xxh3_64_intdigest(raw[i : i + step]) for i in range(0, len(raw), step)], dtype=np.uint64)


def cell_block_digests(values: np.ndarray, indptr: np.ndarray, block: int) -> np.ndarray:
    """(ceil(n_cells / block),) uint64: xxh3-64 of the entries (``values``, CSR order) of each ``block`` cells."""
    import xxhash

    raw = memoryview(np.ascontiguousarray(values)).cast("B")
    size, n = values.dtype.itemsize, len(indptr) - 1
    starts = range(0, n, block)
    return np.array(
        [xxhash.xxh3_64_intdigest(raw[indptr[a] * size : indptr[min(a + block, n)] * size]) for a in starts],
        dtype=np.uint64,
    )


def manifest_digest(manifest: dict) -> str:
    """sha256 of ``manifest`` (without its own digest) as canonical JSON: covers every table it holds."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
