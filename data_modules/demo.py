"""The embedded demo corpus, built from real single-cell data that ships inside installed packages.

Two real datasets, joined by the union of their gene sets (as the paper joins studies):
- ``pbmc68k_reduced`` (scanpy): 700 PBMCs x 765 genes, log-normalized values from ``.raw``
  (stored as float32: binning is a per-cell rank, so normalization does not change the bins);
  cell types from ``obs.bulk_labels``.
- celltypist's ``sample_cell_by_gene.csv``: 559 cells x 32,786 genes, raw counts (stored as uint16).
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_modules.atomic import atomic_dir
from data_modules.store.convert import Source, convert_sources

DEMO_SPLIT = {"strategy": "cell", "seed": 0, "val_fraction": 0.1}


def pbmc68k_adata() -> ad.AnnData:
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    raw = adata.raw.to_adata()
    raw.X = sp.csr_matrix(raw.X, dtype=np.float32)
    raw.obs = adata.obs[["bulk_labels"]].rename(columns={"bulk_labels": "cell_type"}).astype(str)
    return raw


def celltypist_sample_path() -> Path:
    import celltypist

    path = Path(celltypist.__file__).parent / "data" / "samples" / "sample_cell_by_gene.csv"
    if not path.exists():
        raise FileNotFoundError(f"celltypist's sample data is missing at {path}; reinstall celltypist (make setup)")
    return path


def celltypist_adata() -> ad.AnnData:
    table = pd.read_csv(celltypist_sample_path(), index_col=0)
    adata = ad.AnnData(
        X=sp.csr_matrix(table.to_numpy(dtype=np.float32)),
        obs=pd.DataFrame(index=table.index.astype(str)),
        var=pd.DataFrame(index=table.columns.astype(str)),
    )
    adata.obs["cell_type"] = "unlabelled"
    return adata


def build_demo_corpus(out: str | os.PathLike, shard_size: int = 256) -> Path:
    """Build the demo corpus at ``out`` (atomically: built in a temp dir, then renamed)."""
    out = Path(out)
    if (out / "manifest.json").exists():
        return out
    with atomic_dir(out) as tmp:  # a concurrent builder that finishes first wins; ours is then discarded
        convert_sources(
            [Source("pbmc68k_reduced", pbmc68k_adata()), Source("celltypist_sample", celltypist_adata())],
            tmp,
            obs_columns=["cell_type"],
            allow_float=True,
            shard_size=shard_size,
            split=DEMO_SPLIT,
        )
    return out
