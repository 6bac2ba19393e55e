"""Small real corpora for the stream / datamodule tests (built with the real converter)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_modules.store.convert import Source, convert_sources
from data_modules.store.reader import Corpus


def _adata(rng: np.random.Generator, n: int, n_genes: int, name: str) -> ad.AnnData:
    X = (
        sp.random(n, n_genes, density=0.15, format="csr", random_state=rng, data_rvs=lambda k: rng.integers(1, 30, k))
        .astype(np.float32)
        .tolil()
    )
    X[np.arange(n), rng.integers(0, n_genes, n)] = 1.0  # no empty cell
    obs = pd.DataFrame({"cell_type": rng.choice(["T", "B", "NK"], n)}, index=[f"{name}-{i}" for i in range(n)])
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))


def make_stream_corpus(out: Path) -> Path:
    """Two datasets, 1,237 cells, uneven shards of 300 rows, a 10% cell-level validation split."""
    rng = np.random.default_rng(0)
    convert_sources(
        [Source("a", _adata(rng, 700, 120, "a")), Source("b", _adata(rng, 537, 100, "b"))],
        out,
        obs_columns=["cell_type"],
        shard_size=300,
        split={"strategy": "cell", "seed": 0, "val_fraction": 0.1},
    )
    return out


def split_ids(corpus_dir: Path, split: str = "train") -> np.ndarray:
    """Sorted global ids of the split's cells, read independently of the stream."""
    corpus = Corpus(corpus_dir)
    block = corpus.read_cells(0, corpus.n_cells)
    in_val = corpus.in_validation(block)
    return np.sort(block.cell_index[in_val if split == "val" else ~in_val])
