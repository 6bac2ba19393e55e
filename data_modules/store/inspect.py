"""Corpus checks and summaries: ``verify`` (structure + checksums), ``info``, ``to_anndata`` (export)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_modules.store.format import (
    CHECKSUM,
    DATA,
    FORMAT_VERSION,
    INDICES,
    INDPTR,
    JOURNAL_DIR,
    MANIFEST_NAME,
    OBS_GROUP,
    SHARD_DIR,
    SOURCE_ROW,
    CorpusFormatError,
    file_sha256,
)
from data_modules.store.integrity import metadata_problems
from data_modules.store.journal import Journal
from data_modules.store.reader import Corpus
from data_modules.vocab import SPECIAL_TOKENS


@dataclass
class VerifyReport:
    root: Path
    problems: list[str] = field(default_factory=list)  # each names the file and what is wrong
    warnings: list[str] = field(default_factory=list)
    n_shards_ok: int = 0
    unfinished: bool = False  # a conversion in progress (journal, no manifest): resumable, not damaged

    @property
    def ok(self) -> bool:
        return not self.problems


def unfinished_conversion(root: str | os.PathLike) -> str | None:
    """A sentence describing the unfinished conversion in ``root`` (no manifest, a journal), else None."""
    root = Path(root)
    if (root / MANIFEST_NAME).exists() or not (root / JOURNAL_DIR).is_dir():
        return None
    journal = Journal(root)
    progress = "no progress saved yet"
    if journal.exists():
        try:
            state = json.loads(journal.state_path.read_text())
            position = state["position"]
            progress = f"{len(state['writer']['shards'])} shard(s) done, next input {position[0]} row {position[1]}"
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            progress = f"journal {journal.state_path} unreadable"
    return (
        f"{root} holds an unfinished conversion ({progress}), not a corpus yet: it has no {MANIFEST_NAME}; "
        "rerun the same build_corpus.py command to resume it"
    )


def verify_corpus(root: str | os.PathLike, checksums: bool = True) -> VerifyReport:
    """Check the manifest, vocab and every shard (size, sha256, datasets, CSR invariants, code ranges)."""
    root = Path(root)
    report = VerifyReport(root)
    unfinished = unfinished_conversion(root)
    if unfinished is not None:
        report.unfinished = True
        report.problems.append(unfinished)
        return report
    try:
        corpus = Corpus(root)
    except (CorpusFormatError, json.JSONDecodeError, KeyError) as e:
        report.problems.append(f"{root / MANIFEST_NAME}: {e}")
        return report
    m = corpus.manifest
    report.problems.extend(metadata_problems(corpus, manifest_too=True))
    unchecked = sum(1 for s in corpus.shards if s.get("checksums") != CHECKSUM)
    if unchecked:
        report.warnings.append(
            f"{unchecked} of {corpus.n_shards} shards have no per-block checksums (written before them): add them "
            f"with `python scripts/corpus.py verify {root} --write-checksums`"
        )
    n_cat = {c: len(t) for c, t in corpus.obs_columns.items()}
    for i, entry in enumerate(corpus.shards):
        problem = _verify_shard(root / entry["path"], entry, len(corpus.vocab), n_cat, checksums)
        if problem:
            report.problems.append(f"shard {i} ({entry['path']}): {problem}")
        else:
            report.n_shards_ok += 1
    listed = {s["path"] for s in corpus.shards}
    for p in sorted((root / SHARD_DIR).glob("*")):
        if f"{SHARD_DIR}/{p.name}" not in listed:
            report.warnings.append(f"{p}: not listed in the manifest (left over from an interrupted run?)")
    if sum(s["n_cells"] for s in corpus.shards) != m["n_cells"]:
        report.problems.append(f"{root / MANIFEST_NAME}: n_cells does not equal the sum over shards")
    if m.get("format_version") != FORMAT_VERSION:
        report.problems.append(f"{root / MANIFEST_NAME}: format_version {m.get('format_version')} != {FORMAT_VERSION}")
    return report


def _verify_shard(path: Path, entry: dict, vocab_size: int, n_cat: dict[str, int], checksums: bool) -> str | None:
    if not path.exists():
        return "file is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"size {size} bytes, manifest says {entry['bytes']} (truncated or rewritten)"
    if checksums and file_sha256(path) != entry["sha256"]:
        return "sha256 differs from the manifest (corrupted bytes)"
    try:
        with h5py.File(path, "r") as f:
            for name in (INDPTR, INDICES, DATA, SOURCE_ROW, OBS_GROUP):
                if name not in f:
                    return f"dataset {name!r} is missing"
            n, nnz = entry["n_cells"], entry["nnz"]
            indptr = f[INDPTR][:]
            if len(indptr) != n + 1 or indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
                return f"indptr is not a valid CSR pointer for {n} cells / {nnz} non-zeros"
            if len(f[INDICES]) != nnz or len(f[DATA]) != nnz or len(f[SOURCE_ROW]) != n:
                return "indices / data / source_row lengths do not match the manifest"
            ids = f[INDICES][:]
            if nnz and (ids.min() < 0 or ids.max() >= vocab_size):
                return f"gene ids outside the vocabulary (0..{vocab_size - 1})"
            for col, k in n_cat.items():
                if col not in f[OBS_GROUP]:
                    return f"obs column {col!r} is missing"
                codes = f[OBS_GROUP][col][:]
                if len(codes) != n or (n and (codes.min() < 0 or codes.max() >= k)):
                    return f"obs codes of {col!r} are out of range or of the wrong length"
    except OSError as e:
        return f"cannot be read as HDF5 ({e})"
    return None


def corpus_info(root: str | os.PathLike) -> dict:
    """Sizes and per-dataset figures of a corpus (what ``scripts/corpus.py info`` prints)."""
    corpus = Corpus(root)
    m = corpus.manifest
    root = Path(root)
    disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {
        "root": str(root),
        "format_version": m["format_version"],
        "n_cells": corpus.n_cells,
        "nnz": m["nnz"],
        "mean_nnz_per_cell": m["nnz"] / max(corpus.n_cells, 1),
        "n_genes": len(corpus.vocab.genes),
        "vocab_size": len(corpus.vocab),
        "n_shards": corpus.n_shards,
        "disk_bytes": disk,
        "counts": m.get("counts"),
        "count_dtypes": sorted({s["dtype"] for s in corpus.shards}),
        "split": m["split"],
        "obs_columns": {c: len(t) for c, t in corpus.obs_columns.items()},
        "datasets": m.get("datasets", []),
    }


def parse_cell_range(text: str, n_cells: int) -> tuple[int, int]:
    """``"0:1000"`` / ``":500"`` / ``"100:"`` -> (start, stop), checked against the corpus size."""
    try:
        a, b = text.split(":")
        start = int(a) if a else 0
        stop = int(b) if b else n_cells
    except ValueError:
        raise CorpusFormatError(f"--cells {text!r}: expected START:STOP, e.g. 0:1000") from None
    if not 0 <= start < stop <= n_cells:
        raise CorpusFormatError(f"--cells {text!r} is outside the corpus (0:{n_cells})")
    return start, stop


def to_anndata(
    corpus: Corpus | str | os.PathLike, start: int = 0, stop: int | None = None, genes: str = "all"
) -> ad.AnnData:
    """Cells ``start:stop`` as AnnData: X = stored counts (CSR), var = vocab genes, obs = decoded labels.

    ``genes="all"`` keeps every vocab gene (column order = vocab id order), ``"present"``
    only those with a non-zero in the slice.
    """
    corpus = corpus if isinstance(corpus, Corpus) else Corpus(corpus)
    stop = corpus.n_cells if stop is None else stop
    block = corpus.read_cells(start, stop)
    id_to_token = corpus.vocab.id_to_token
    gene_vocab_ids = np.array([i for i, t in enumerate(id_to_token) if t not in SPECIAL_TOKENS], dtype=np.int64)
    if genes == "present":
        gene_vocab_ids = np.intersect1d(gene_vocab_ids, np.unique(block.gene_ids))
    elif genes != "all":
        raise ValueError(f"genes must be 'all' or 'present', got {genes!r}")
    col_of_id = np.full(len(id_to_token), -1, dtype=np.int64)
    col_of_id[gene_vocab_ids] = np.arange(len(gene_vocab_ids))
    dtype = np.result_type(np.float32, *[np.dtype(s["dtype"]) for s in corpus.shards])
    X = sp.csr_matrix(
        (block.counts.astype(dtype), col_of_id[block.gene_ids], block.indptr), shape=(len(block), len(gene_vocab_ids))
    )
    obs = pd.DataFrame(index=pd.Index(block.cell_index.astype(str), name="cell_id"))
    for col, categories in corpus.obs_columns.items():
        obs[col] = pd.Categorical.from_codes(block.obs[col], categories=categories)
    obs["source_row"] = _source_rows(corpus, start, stop)
    var = pd.DataFrame({"vocab_id": gene_vocab_ids}, index=pd.Index([id_to_token[i] for i in gene_vocab_ids]))
    return ad.AnnData(X=X, obs=obs, var=var)


def _source_rows(corpus: Corpus, start: int, stop: int) -> np.ndarray:
    parts = []
    for shard in range(corpus.n_shards):
        s0, s1 = int(corpus.shard_offsets[shard]), int(corpus.shard_offsets[shard + 1])
        if s1 <= start or s0 >= stop:
            continue
        parts.append(corpus.read_source_rows(shard, max(start - s0, 0), min(stop, s1) - s0))
    return np.concatenate(parts)
