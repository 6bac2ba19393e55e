"""Writing a corpus: cells in, fixed-size HDF5 shards out, each written atomically."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import h5py
import numpy as np

from data_modules.store.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_DIR,
    VOCAB_NAME,
    CorpusFormatError,
    atomic_tmp,
    file_sha256,
    narrowest_count_dtype,
    shard_name,
)
from data_modules.store.split import split_membership
from data_modules.vocab import GeneVocab


def write_shard(path: Path, indptr: np.ndarray, gene_ids: np.ndarray, counts: np.ndarray,
                obs: dict[str, np.ndarray], allow_float: bool) -> dict:
    """Write one shard (contiguous datasets) to a temp file, then rename. Returns its manifest entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = narrowest_count_dtype(counts, allow_float)
    tmp = atomic_tmp(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["n_cells"] = len(indptr) - 1
            f.create_dataset("indptr", data=indptr.astype(np.int64))
            f.create_dataset("indices", data=gene_ids.astype(np.int32))
            f.create_dataset("data", data=counts.astype(dtype))
            g = f.create_group("obs")
            for k, v in obs.items():
                g.create_dataset(k, data=v.astype(np.int32))
        sha = file_sha256(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {
        "n_cells": int(len(indptr) - 1),
        "nnz": int(indptr[-1]),
        "bytes": path.stat().st_size,
        "sha256": sha,
        "dtype": dtype.name,
    }


class CorpusWriter:
    """Accumulates cells (CSR rows over vocab ids + obs labels) and flushes full shards.

    Memory is bounded by one shard: ``shard_size`` cells of CSR data.
    """

    def __init__(self, out: str | os.PathLike, vocab: GeneVocab, obs_columns: list[str],
                 shard_size: int = 16384, allow_float: bool = False, creation: dict | None = None):
        self.out = Path(out)
        self.vocab = vocab
        self.obs_columns = list(obs_columns)
        if "dataset" not in self.obs_columns:
            self.obs_columns.insert(0, "dataset")
        self.shard_size = int(shard_size)
        self.allow_float = allow_float
        self.creation = dict(creation or {})
        self.categories: dict[str, dict[str, int]] = {c: {} for c in self.obs_columns}
        self.shards: list[dict] = []
        self.datasets: list[dict] = []
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]] = []
        self._pending_cells = 0
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / SHARD_DIR).mkdir(exist_ok=True)

    def _codes(self, column: str, labels: np.ndarray) -> np.ndarray:
        table = self.categories[column]
        uniq, inverse = np.unique(np.asarray(labels).astype(str), return_inverse=True)
        lut = np.array([table.setdefault(u, len(table)) for u in uniq], dtype=np.int32)
        return lut[inverse]

    def add_cells(self, indptr: np.ndarray, gene_ids: np.ndarray, counts: np.ndarray,
                  obs: dict[str, np.ndarray]) -> None:
        """Append cells in CSR form; ``obs`` maps every obs column to (n,) labels (strings)."""
        n = len(indptr) - 1
        missing = [c for c in self.obs_columns if c not in obs]
        if missing:
            raise CorpusFormatError(f"cells lack obs columns {missing}")
        codes = {c: self._codes(c, obs[c]) for c in self.obs_columns}
        self._pending.append((np.asarray(indptr, dtype=np.int64), gene_ids, counts, codes))
        self._pending_cells += n
        while self._pending_cells >= self.shard_size:
            self._flush(self.shard_size)

    def register_dataset(self, info: dict) -> None:
        self.datasets.append(info)

    def _take_pending(self, n: int):
        """Pop exactly ``n`` cells off the pending queue as one CSR array set."""
        parts, taken = [], 0
        while taken < n:
            indptr, gids, cnts, codes = self._pending[0]
            m = len(indptr) - 1
            k = min(m, n - taken)
            lo, hi = int(indptr[0]), int(indptr[k])
            parts.append((indptr[: k + 1] - lo, gids[lo:hi], cnts[lo:hi], {c: v[:k] for c, v in codes.items()}))
            if k == m:
                self._pending.pop(0)
            else:
                rest = indptr[k:] - indptr[k]
                self._pending[0] = (rest, gids[hi : int(indptr[-1])], cnts[hi : int(indptr[-1])],
                                    {c: v[k:] for c, v in codes.items()})
            taken += k
        lengths = np.concatenate([np.diff(p[0]) for p in parts])
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        gids = np.concatenate([p[1] for p in parts])
        cnts = np.concatenate([p[2] for p in parts])
        codes = {c: np.concatenate([p[3][c] for p in parts]) for c in self.obs_columns}
        self._pending_cells -= n
        return indptr, gids, cnts, codes

    def _flush(self, n: int) -> None:
        indptr, gids, cnts, codes = self._take_pending(n)
        index = len(self.shards)
        entry = write_shard(self.out / shard_name(index), indptr, gids, cnts, codes, self.allow_float)
        entry["path"] = shard_name(index)
        self.shards.append(entry)

    def finish(self, split: dict | None = None) -> dict:
        """Flush the last (short) shard, write vocab.json and manifest.json (atomically, last)."""
        if self._pending_cells:
            self._flush(self._pending_cells)
        if not self.shards:
            raise CorpusFormatError("no cells were written: every input cell was empty or filtered out")
        self.vocab.to_json(self.out / VOCAB_NAME)
        split = dict(split or {"strategy": "cell", "seed": 0, "val_fraction": 0.003})
        if split.get("strategy") == "dataset":
            names = split.get("val_datasets", [])
            table = self.categories["dataset"]
            unknown = [d for d in names if d not in table]
            if unknown:
                raise CorpusFormatError(f"validation datasets {unknown} are not in the corpus (known: {list(table)})")
            split["val_dataset_codes"] = [table[d] for d in names]
        n_val = self._count_validation(split)
        n_cells = sum(s["n_cells"] for s in self.shards)
        split.update(n_val=n_val, n_train=n_cells - n_val)
        manifest = {
            "format_version": FORMAT_VERSION,
            "n_cells": n_cells,
            "nnz": sum(s["nnz"] for s in self.shards),
            "shard_size": self.shard_size,
            "shards": self.shards,
            "vocab": {"path": VOCAB_NAME, "size": len(self.vocab), "sha256": file_sha256(self.out / VOCAB_NAME)},
            "datasets": self.datasets,
            "obs_columns": {c: list(t) for c, t in self.categories.items()},
            "split": split,
            "creation": {"created_unix": time.time(), **self.creation},
        }
        tmp = atomic_tmp(self.out / MANIFEST_NAME)
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.out / MANIFEST_NAME)
        return manifest

    def _count_validation(self, split: dict) -> int:
        n, offset = 0, 0
        for s in self.shards:
            with h5py.File(self.out / s["path"], "r") as f:
                ids = np.arange(offset, offset + s["n_cells"], dtype=np.int64)
                n += int(split_membership(split, ids, f["obs"]["dataset"][:]).sum())
            offset += s["n_cells"]
        return n
