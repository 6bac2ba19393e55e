"""Writing a corpus: cells in, fixed-size HDF5 shards out, each written atomically."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np

from data_modules.atomic import atomic_path, write_text_atomic
from data_modules.store.format import (
    BLOCK_CELLS,
    BLOCK_ELEMENTS,
    CHECKSUM,
    CHECKSUM_GROUP,
    DATA,
    FORMAT_VERSION,
    INDICES,
    INDPTR,
    MANIFEST_DIGEST,
    MANIFEST_NAME,
    OBS_GROUP,
    SHARD_DIR,
    SOURCE_ROW,
    VOCAB_NAME,
    CorpusFormatError,
    block_digests,
    cell_block_digests,
    file_sha256,
    index_dtype,
    manifest_digest,
    narrowest_count_dtype,
    shard_name,
)
from data_modules.store.split import split_membership
from data_modules.vocab import GeneVocab


def _dataset(f: h5py.File, name: str, data: np.ndarray, checksums: bool, indptr: np.ndarray | None = None) -> None:
    """A contiguous dataset and, with ``checksums``, the digest of each of its blocks in ``checksums/<name>``: of
    the entries of ``BLOCK_CELLS`` cells when ``indptr`` is given (indices / data), else of ``BLOCK_ELEMENTS``
    elements (format.block_digests / cell_block_digests; the reader checks them on every read)."""
    f.create_dataset(name, data=data)
    if checksums:
        block = BLOCK_ELEMENTS if indptr is None else BLOCK_CELLS
        digests = block_digests(data, block) if indptr is None else cell_block_digests(data, indptr, block)
        f.create_dataset(f"{CHECKSUM_GROUP}/{name}", data=digests).attrs["block"] = block


def write_shard(
    path: Path,
    indptr: np.ndarray,
    gene_ids: np.ndarray,
    counts: np.ndarray,
    obs: dict[str, np.ndarray],
    allow_float: bool,
    source_row: np.ndarray | None = None,
    vocab_size: int = 1 << 31,
    exact_dtypes: bool = False,
    checksums: bool = True,
) -> dict:
    """Write one shard to a temp file, fsync, then rename. Returns its manifest entry.

    ``checksums``: the digest of every block of every dataset (format.CHECKSUM, checked on every read);
    without, the datasets only (the format before checksums). ``exact_dtypes`` keeps the given dtypes (used
    for the journal's pending-cells file).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(indptr) - 1
    cdtype = counts.dtype if exact_dtypes else narrowest_count_dtype(counts, allow_float)
    idtype = gene_ids.dtype if exact_dtypes else index_dtype(vocab_size)
    # The HDF5 file is assembled in memory and written with plain file I/O: a full disk while HDF5 itself writes
    # can crash the process when the file is closed (seen with h5py 3.16 / HDF5 2.0: a segfault in close) instead
    # of raising; a plain write raises OSError (ENOSPC), which atomic_path turns into DiskFullError.
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["n_cells"] = n
        if checksums:
            f.attrs["checksums"] = CHECKSUM
        indptr = np.asarray(indptr, dtype=np.int64)
        _dataset(f, INDPTR, indptr, checksums)
        _dataset(f, INDICES, np.asarray(gene_ids).astype(idtype, copy=False), checksums, indptr)
        _dataset(f, DATA, np.asarray(counts).astype(cdtype, copy=False), checksums, indptr)
        rows = np.full(n, -1, dtype=np.int64) if source_row is None else np.asarray(source_row, dtype=np.int64)
        _dataset(f, SOURCE_ROW, rows, checksums)
        f.create_group(OBS_GROUP)
        for k, v in obs.items():
            _dataset(f, f"{OBS_GROUP}/{k}", np.asarray(v, dtype=np.int32), checksums)
    image = image.getbuffer()  # a view: the shard is held once in memory
    with atomic_path(path) as tmp:  # fsynced and renamed into place
        with open(tmp, "wb") as fh:
            fh.write(image)
    sha = hashlib.sha256(image).hexdigest()
    entry = {
        "n_cells": int(n),
        "nnz": int(indptr[-1]),
        "bytes": len(image),
        "sha256": sha,
        "dtype": np.dtype(cdtype).name,
    }
    if checksums:
        entry["checksums"] = CHECKSUM
    return entry


def read_pending(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    with h5py.File(path, "r") as f:
        return (
            f[INDPTR][:],
            f[INDICES][:],
            f[DATA][:],
            {k: f[OBS_GROUP][k][:] for k in f[OBS_GROUP]},
            f[SOURCE_ROW][:],
        )


class CorpusWriter:
    """Accumulates cells (CSR rows over vocab ids + obs labels) and flushes full shards.

    Memory is bounded by one shard plus one added chunk: about
    ``(shard_size + chunk) * nnz_per_cell * (index + count bytes)``.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        vocab: GeneVocab,
        obs_columns: list[str],
        shard_size: int = 16384,
        allow_float: bool = False,
        creation: dict | None = None,
        checksums: bool = True,
    ):
        self.out = Path(out)
        self.checksums = checksums
        self.vocab = vocab
        self.obs_columns = list(obs_columns)
        if "dataset" not in self.obs_columns:
            self.obs_columns.insert(0, "dataset")
        self.shard_size = int(shard_size)
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.allow_float = allow_float
        self.creation = dict(creation or {})
        self.categories: dict[str, dict[str, int]] = {c: {} for c in self.obs_columns}
        self.shards: list[dict] = []
        self.datasets: list[dict] = []
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]] = []
        self._pending_cells = 0
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / SHARD_DIR).mkdir(exist_ok=True)

    @property
    def n_cells_written(self) -> int:
        return sum(s["n_cells"] for s in self.shards)

    def codes(self, column: str, labels: np.ndarray) -> np.ndarray:
        """(n,) int32 codes of ``labels`` in the column's category table (new labels appended)."""
        table = self.categories[column]
        uniq, inverse = np.unique(np.asarray(labels).astype(str), return_inverse=True)
        lut = np.array([table.setdefault(u, len(table)) for u in uniq], dtype=np.int32)
        return lut[inverse.reshape(-1)]

    _codes = codes

    def add_cells(
        self,
        indptr: np.ndarray,
        gene_ids: np.ndarray,
        counts: np.ndarray,
        obs: dict[str, np.ndarray],
        source_row: np.ndarray | None = None,
        coded: bool = False,
    ) -> int:
        """Append cells in CSR form; ``obs`` maps every obs column to (n,) labels (or codes if ``coded``).

        Returns the number of shards flushed by this call.
        """
        n = len(indptr) - 1
        missing = [c for c in self.obs_columns if c not in obs]
        if missing:
            raise CorpusFormatError(f"cells lack obs columns {missing}")
        codes = {c: (np.asarray(obs[c], dtype=np.int32) if coded else self.codes(c, obs[c])) for c in self.obs_columns}
        rows = np.full(n, -1, dtype=np.int64) if source_row is None else np.asarray(source_row, dtype=np.int64)
        indptr = np.asarray(indptr, dtype=np.int64)
        if n:
            self._pending.append((indptr, gene_ids, counts, codes, rows))
            self._pending_cells += n
        flushed = 0
        while self._pending_cells >= self.shard_size:
            self._flush(self.shard_size)
            flushed += 1
        return flushed

    def register_dataset(self, info: dict) -> None:
        self.datasets.append(info)

    def _take_pending(self, n: int):
        """Pop exactly ``n`` cells off the pending queue as one CSR array set."""
        parts, taken = [], 0
        while taken < n:
            indptr, gids, cnts, codes, rows = self._pending[0]
            m = len(indptr) - 1
            k = min(m, n - taken)
            lo, hi, end = int(indptr[0]), int(indptr[k]), int(indptr[-1])
            parts.append(
                (indptr[: k + 1] - lo, gids[lo:hi], cnts[lo:hi], {c: v[:k] for c, v in codes.items()}, rows[:k])
            )
            if k == m:
                self._pending.pop(0)
            else:
                self._pending[0] = (
                    indptr[k:] - indptr[k],
                    gids[hi:end],
                    cnts[hi:end],
                    {c: v[k:] for c, v in codes.items()},
                    rows[k:],
                )
            taken += k
        lengths = np.concatenate([np.diff(p[0]) for p in parts])
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        gids = np.concatenate([p[1] for p in parts])
        cnts = np.concatenate([p[2] for p in parts])
        codes = {c: np.concatenate([p[3][c] for p in parts]) for c in self.obs_columns}
        rows = np.concatenate([p[4] for p in parts])
        self._pending_cells -= n
        return indptr, gids, cnts, codes, rows

    def _flush(self, n: int) -> None:
        indptr, gids, cnts, codes, rows = self._take_pending(n)
        index = len(self.shards)
        try:
            entry = write_shard(
                self.out / shard_name(index),
                indptr,
                gids,
                cnts,
                codes,
                self.allow_float,
                source_row=rows,
                vocab_size=len(self.vocab),
                checksums=self.checksums,
            )
        except CorpusFormatError as e:
            raise CorpusFormatError(f"{e}: pass allow_float=True (--allow-normalized) for normalized values") from None
        self.shards.append({"path": shard_name(index), **entry})

    # journal support ------------------------------------------------------------------
    def save_pending(self, path: Path) -> int:
        """Write the not-yet-flushed cells to ``path`` (atomically); returns how many."""
        if self._pending_cells:
            indptr, gids, cnts, codes, rows = self._take_pending(self._pending_cells)
            self._pending = [(indptr, gids, cnts, codes, rows)]
            self._pending_cells = len(indptr) - 1
        else:
            indptr, gids, cnts, rows = (
                np.zeros(1, np.int64),
                np.zeros(0, np.int32),
                np.zeros(0, np.float32),
                np.zeros(0, np.int64),
            )
            codes = {c: np.zeros(0, np.int32) for c in self.obs_columns}
        write_shard(path, indptr, gids, cnts, codes, True, source_row=rows, exact_dtypes=True)
        return self._pending_cells

    def state(self) -> dict:
        return {"shards": self.shards, "categories": {c: list(t) for c, t in self.categories.items()}}

    def restore(self, state: dict, pending_path: Path | None) -> None:
        self.shards = list(state["shards"])
        self.categories = {c: {lab: i for i, lab in enumerate(state["categories"][c])} for c in self.obs_columns}
        self._pending, self._pending_cells = [], 0
        if pending_path is not None:
            indptr, gids, cnts, codes, rows = read_pending(pending_path)
            self.add_cells(indptr, gids, cnts, codes, source_row=rows, coded=True)

    # finishing ------------------------------------------------------------------------
    def finish(self, split: dict | None = None, extra: dict | None = None) -> dict:
        """Flush the last (short) shard, write vocab.json and manifest.json (atomically, last)."""
        if self._pending_cells:
            self._flush(self._pending_cells)
        if not self.shards:
            raise CorpusFormatError("no cells were written: every input cell was empty or filtered out")
        self.vocab.to_json(self.out / VOCAB_NAME)
        split = resolve_split(split, self.categories["dataset"])
        n_val = self._count_validation(split)
        n_cells = self.n_cells_written
        split.update(n_val=n_val, n_train=n_cells - n_val)
        manifest = {
            "format_version": FORMAT_VERSION,
            "n_cells": n_cells,
            "nnz": sum(s["nnz"] for s in self.shards),
            "n_genes": len(self.vocab.genes),
            "shard_size": self.shard_size,
            "counts": "normalized" if self.allow_float else "raw",
            "shards": self.shards,
            "vocab": {
                "path": VOCAB_NAME,
                "size": len(self.vocab),
                "sha256": file_sha256(self.out / VOCAB_NAME),
                "keyed_by": self.vocab.keyed_by,
            },
            "datasets": self.datasets,
            "obs_columns": {c: list(t) for c, t in self.categories.items()},
            "split": split,
            "creation": {"created_unix": time.time(), **self.creation},
            **(extra or {}),
        }
        write_manifest(self.out, manifest)
        return manifest

    def _count_validation(self, split: dict) -> int:
        n, offset = 0, 0
        for s in self.shards:
            with h5py.File(self.out / s["path"], "r") as f:
                ids = np.arange(offset, offset + s["n_cells"], dtype=np.int64)
                n += int(split_membership(split, ids, f[OBS_GROUP]["dataset"][:]).sum())
            offset += s["n_cells"]
        return n


def write_manifest(root: Path, manifest: dict) -> None:
    """``manifest`` sealed with its own digest (format.manifest_digest), written atomically (last)."""
    manifest.pop(MANIFEST_DIGEST, None)
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    write_text_atomic(Path(root) / MANIFEST_NAME, json.dumps(manifest, indent=1))


def resolve_split(split: dict | None, dataset_table: dict[str, int]) -> dict:
    """Validate a split request and add what readers need (dataset codes)."""
    split = dict(split or {"strategy": "cell", "seed": 0, "val_fraction": 0.003})
    strategy = split.setdefault("strategy", "cell")
    if strategy == "cell":
        split.setdefault("seed", 0)
        frac = float(split.setdefault("val_fraction", 0.003))
        if not 0.0 <= frac < 1.0:
            raise CorpusFormatError(f"val_fraction must be in [0, 1), got {frac}")
    elif strategy == "dataset":
        names = list(split.get("val_datasets", []))
        unknown = [d for d in names if d not in dataset_table]
        if unknown or not names:
            raise CorpusFormatError(
                f"validation datasets {unknown or names} are not in the corpus; --val-datasets takes dataset "
                f"names from: {list(dataset_table)}"
            )
        split["val_datasets"] = names
        split["val_dataset_codes"] = [dataset_table[d] for d in names]
    elif strategy != "none":
        raise CorpusFormatError(f"unknown split strategy {strategy!r}; use 'cell', 'dataset' or 'none'")
    return split
