"""AnnData -> corpus conversion (first version: in-memory or backed AnnData, row chunks)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from data_modules.store.format import CorpusFormatError
from data_modules.store.writer import CorpusWriter
from data_modules.vocab import GeneVocab


@dataclass
class Source:
    """One input dataset: an AnnData (or h5ad path) and how to read it."""

    name: str
    adata: ad.AnnData | str | os.PathLike
    gene_column: str | None = None  # var column with gene symbols / ids; None = var_names
    use_raw: bool = False  # read .raw (X and var) instead of X
    obs_map: dict[str, str] | None = None  # corpus obs column -> this dataset's obs column


def _open(src: Source) -> ad.AnnData:
    if isinstance(src.adata, ad.AnnData):
        return src.adata
    path = Path(src.adata)
    try:
        return ad.read_h5ad(path, backed="r")
    except Exception as e:  # truncated / corrupt files surface as many h5py error types
        raise CorpusFormatError(f"cannot read {path} as h5ad ({type(e).__name__}: {e}); re-download or re-export it") from None


def _genes(adata: ad.AnnData, src: Source) -> list[str]:
    var = adata.raw.var if src.use_raw else adata.var
    if src.gene_column is None:
        return [str(g) for g in var.index]
    if src.gene_column not in var.columns:
        raise CorpusFormatError(
            f"dataset {src.name!r}: var has no column {src.gene_column!r} (columns: {list(var.columns)}); "
            "pass --gene-column with one of them, or omit it to use var_names"
        )
    return [str(g) for g in var[src.gene_column]]


def gene_union(sources: Sequence[Source]) -> list[str]:
    genes: set[str] = set()
    for src in sources:
        genes.update(_genes(_open(src), src))
    return sorted(genes)


def convert_sources(sources: Sequence[Source], out: str | os.PathLike, vocab: GeneVocab | None = None,
                    obs_columns: Sequence[str] = (), shard_size: int = 16384, chunk_size: int = 4096,
                    allow_float: bool = False, min_genes: int = 1, split: dict | None = None) -> dict:
    """Convert AnnData sources into a corpus at ``out``; returns the manifest."""
    if vocab is None:
        vocab = GeneVocab.from_genes(gene_union(sources))
    writer = CorpusWriter(out, vocab, ["dataset", *[c for c in obs_columns if c != "dataset"]],
                          shard_size=shard_size, allow_float=allow_float,
                          creation={"chunk_size": chunk_size, "min_genes": min_genes, "allow_float": allow_float})
    for src in sources:
        adata = _open(src)
        genes = _genes(adata, src)
        mapping = vocab.map_genes(genes)
        if mapping.n_known == 0:
            raise CorpusFormatError(f"dataset {src.name!r}: none of its {len(genes)} genes is in the vocabulary")
        keep_cols = np.flatnonzero(mapping.known)
        col_ids = mapping.ids[keep_cols].astype(np.int32)
        X = adata.raw.X if src.use_raw else adata.X
        n_written = n_dropped = 0
        for lo in range(0, adata.n_obs, chunk_size):
            hi = min(lo + chunk_size, adata.n_obs)
            chunk = sp.csr_matrix(X[lo:hi])[:, keep_cols]
            chunk.eliminate_zeros()
            chunk.sort_indices()
            keep_rows = np.diff(chunk.indptr) >= min_genes
            chunk = chunk[keep_rows]
            obs = {"dataset": np.full(chunk.shape[0], src.name)}
            for col in writer.obs_columns[1:]:
                source_col = (src.obs_map or {}).get(col, col)
                vals = adata.obs[source_col].to_numpy()[lo:hi] if source_col in adata.obs else np.full(hi - lo, "unknown")
                obs[col] = np.asarray(vals).astype(str)[keep_rows]
            writer.add_cells(chunk.indptr, col_ids[chunk.indices], chunk.data, obs)
            n_written += chunk.shape[0]
            n_dropped += int((~keep_rows).sum())
        writer.register_dataset({"name": src.name, "source": str(src.adata) if not isinstance(src.adata, ad.AnnData) else "<in-memory AnnData>",
                                 "n_cells": n_written, "n_cells_dropped_empty": n_dropped,
                                 "n_genes": len(genes), "n_genes_unknown": mapping.n_unknown})
    return writer.finish(split)
