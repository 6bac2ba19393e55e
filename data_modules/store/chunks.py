"""One input chunk on its way into a corpus: the input's genes mapped onto the vocabulary (``map_reader_genes``,
``GeneReport``), its values checked (``check_values``: no NaN / inf / negatives, integers unless allowed), its
cells mapped and emptied cells dropped (``prepare_chunk``), and the per-dataset statistics (``chunk_stats``).
``convert.py`` runs the loop around them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from data_modules.store.format import CorpusFormatError, narrowest_count_dtype
from data_modules.store.sources import RawChunk
from data_modules.vocab import GeneVocab, guess_gene_key

# ---------------------------------------------------------------------------------------
# gene mapping


@dataclass
class GeneReport:
    n_genes: int
    n_genes_known: int
    unknown_sample: list[str]
    n_duplicates_dropped: int = 0

    def as_dict(self) -> dict:
        return {
            "n_genes": self.n_genes,
            "n_genes_known": self.n_genes_known,
            "n_genes_unknown": self.n_genes - self.n_genes_known,
            "unknown_genes_sample": self.unknown_sample,
            "n_duplicate_genes_dropped": self.n_duplicates_dropped,
        }


def map_reader_genes(
    reader, vocab: GeneVocab, gene_table: Mapping[str, str] | None = None, on_duplicate: str = "error"
) -> tuple[np.ndarray, GeneReport]:
    """(n_input_genes,) int64 vocab id per input column (-1 = unknown) and a report."""
    genes = reader.genes
    mapping = vocab.map_genes(genes, gene_table)
    where = getattr(reader, "path", reader.name)
    if mapping.n_known == 0:
        hint = (
            " (the input genes look like Ensembl ids and the vocab is keyed by symbols: pass --gene-table "
            "with an id->symbol table, or --gene-column with the symbol column)"
            if guess_gene_key(genes) == "ensembl" and vocab.keyed_by == "symbol" and gene_table is None
            else ""
        )
        raise CorpusFormatError(
            f"{where}: none of its {len(genes)} genes (e.g. {genes[:3]}) is in the vocabulary "
            f"(e.g. {vocab.genes[:3]}){hint}; choose the matching --gene-column or another --vocab"
        )
    ids = mapping.ids.copy()
    known_pos = np.flatnonzero(ids >= 0)
    order = np.argsort(ids[known_pos], kind="stable")
    sorted_ids = ids[known_pos][order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1]) + 1  # later occurrences of a repeated id
    n_dup = 0
    if len(dup):
        dup_pos = known_pos[order][dup]
        if on_duplicate == "error":
            names = sorted({genes[i] for i in dup_pos})
            raise CorpusFormatError(
                f"{where}: duplicate gene names {names[:10]}{' ...' if len(names) > 10 else ''} "
                f"({len(names)} names) in {getattr(reader, 'gene_source', 'the gene column')}; make them unique "
                "(`adata.var_names_make_unique()`) or choose another --gene-column (e.g. gene_ids / feature_id)"
            )
        ids[dup_pos] = -1
        n_dup = len(dup_pos)
    unknown = [genes[i] for i in np.flatnonzero(mapping.ids < 0)[:20]]
    return ids, GeneReport(len(genes), int((ids >= 0).sum()), unknown, n_dup)


# ---------------------------------------------------------------------------------------
# one chunk


@dataclass
class PreparedCells:
    indptr: np.ndarray  # (n_kept+1,) int64
    gene_ids: np.ndarray  # (nnz,) int32 vocab ids, ascending within each cell
    counts: np.ndarray  # (nnz,) input dtype
    keep: np.ndarray  # (n,) bool: cell kept
    counts_total: np.ndarray  # (n,) float64 sum of all values of the cell
    counts_lost: np.ndarray  # (n,) float64 sum of values in unknown genes
    nnz_lost: np.ndarray  # (n,) int64 non-zeros in unknown genes


def check_values(raw: RawChunk, reader, allow_float: bool) -> None:
    """Raise naming file, cell and gene for NaN / inf / negative / non-integer values."""
    data = raw.X.data
    if data.dtype.kind in "ui" and (data.dtype.kind == "u" or data.size == 0 or data.min() >= 0):
        return
    problems = [
        (
            lambda: ~np.isfinite(data),
            "NaN or infinite value",
            "counts are never NaN/inf: fix the matrix upstream (e.g. "
            "re-run the quantification) or drop the affected cells before converting",
        ),
        (
            lambda: data < 0,
            "negative value",
            "this looks like scaled or batch-corrected data; convert the raw counts "
            "instead (--use-raw or --layer counts)",
        ),
    ]
    if not allow_float:
        problems.append(
            (
                lambda: np.mod(data, 1) != 0,
                "non-integer value where raw counts are expected",
                "point the converter at raw counts (--use-raw or --layer counts), or pass "
                "--allow-normalized (allow_float=True) to store normalized values as float32",
            )
        )
    for find, what, fix in problems:  # in order: later checks assume finite values
        mask = find()
        if mask.any():
            p = int(np.argmax(mask))
            row = int(np.searchsorted(raw.X.indptr, p, side="right") - 1)
            gene = reader.genes[int(raw.X.indices[p])]
            raise CorpusFormatError(
                f"{getattr(reader, 'path', reader.name)}: {what} {data[p]!r} in cell {raw.cell_names[row]!r} "
                f"(row {int(raw.source_row[row])}), gene {gene!r} ({int(mask.sum())} such values in this chunk); {fix}"
            )


def prepare_chunk(raw: RawChunk, lut: np.ndarray, min_genes: int) -> PreparedCells:
    """Map genes to vocab ids, drop unknown genes / explicit zeros / cells below ``min_genes``."""
    X = raw.X
    n = X.shape[0]
    indptr = X.indptr.astype(np.int64)
    row = np.repeat(np.arange(n, dtype=np.int32), np.diff(indptr))  # (nnz,) cell of each entry
    gid = lut.astype(np.int32, copy=False)[X.indices]
    nonzero = X.data != 0
    keep_entry = (gid >= 0) & nonzero
    lost = (gid < 0) & nonzero
    counts_total = np.bincount(row, weights=X.data, minlength=n)
    counts_lost = np.bincount(row[lost], weights=X.data[lost], minlength=n)
    nnz_lost = np.bincount(row[lost], minlength=n)
    n_genes = np.bincount(row[keep_entry], minlength=n)
    keep_cell = n_genes >= max(int(min_genes), 1)
    keep_entry &= keep_cell[row]
    row_k, gid_k, data_k = row[keep_entry], gid[keep_entry], X.data[keep_entry]
    if len(gid_k) > 1:
        same_row = row_k[1:] == row_k[:-1]
        if np.any(same_row & (gid_k[1:] <= gid_k[:-1])):  # not ascending within a cell: sort
            order = np.argsort(row_k.astype(np.int64) * (int(lut.max()) + 1) + gid_k, kind="stable")
            row_k, gid_k, data_k = row_k[order], gid_k[order], data_k[order]
            same_row = row_k[1:] == row_k[:-1]
            if np.any(same_row & (gid_k[1:] == gid_k[:-1])):
                raise CorpusFormatError(
                    f"{raw.cell_names[0]!r}..: X holds the same gene twice in one cell (non-canonical sparse "
                    "matrix); call `adata.X.sum_duplicates()` and re-save"
                )
    lengths = n_genes[keep_cell]
    out_indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_indptr[1:])
    data_k = data_k.astype(narrowest_count_dtype(data_k, allow_float=True), copy=False)  # exact; halves pending memory
    return PreparedCells(out_indptr, gid_k, data_k, keep_cell, counts_total, counts_lost, nnz_lost)


STAT_KEYS = ("n_cells", "n_cells_dropped", "counts_total", "counts_lost_unknown_genes", "nnz_lost_unknown_genes")


def chunk_stats(cells: PreparedCells, dataset_codes: np.ndarray, n_datasets: int) -> dict[str, np.ndarray]:
    """Per-dataset-code sums over one chunk."""

    def by(weights=None, mask=None):
        codes = dataset_codes if mask is None else dataset_codes[mask]
        w = None if weights is None else (weights if mask is None else weights[mask])
        return np.bincount(codes, weights=w, minlength=n_datasets)

    return {
        "n_cells": by(mask=cells.keep),
        "n_cells_dropped": by(mask=~cells.keep),
        "counts_total": by(cells.counts_total),
        "counts_lost_unknown_genes": by(cells.counts_lost),
        "nnz_lost_unknown_genes": by(cells.nnz_lost.astype(np.float64)),
    }


def merge_stats(stats: dict, labels: list[str], part: dict[str, np.ndarray]) -> None:
    for code, label in enumerate(labels):
        entry = stats.setdefault(label, {k: 0 for k in STAT_KEYS})
        for k in STAT_KEYS:
            v = part[k][code] if code < len(part[k]) else 0
            entry[k] = entry[k] + (int(v) if k != "counts_total" and k != "counts_lost_unknown_genes" else float(v))
