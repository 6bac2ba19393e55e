"""Baselines on the same reference / query split.

Baselines, on the same reference / query split: HVG+PCA kNN (log-normalized values of the genes the model
reads, ``n_hvg`` highly variable genes (scanpy "seurat" flavour) and a ``n_pcs``-component PCA fitted on the
reference, the query projected; the same k-NN vote) and L1 logistic regression (liblinear, C by stratified CV)
on those HVGs. With a corpus reference they use a seeded sample of at most ``baseline_max_cells`` reference
cells (contiguous runs of 64 cells at random offsets), so their memory stays bounded too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgpt_train.tasks.reference_map.common import BASELINES, DEFAULT_K, ReferenceMapError
from scgpt_train.tasks.reference_map.index import IndexSpec, KnnIndex, knn_vote

# baselines on the same split


def hvg_mask(x_ref_log: sp.csr_matrix, n_hvg: int) -> np.ndarray:
    """(G,) bool: the ``n_hvg`` most variable genes of the reference (scanpy "seurat" flavour on log values)."""
    import anndata as ad
    import scanpy as sc

    g = x_ref_log.shape[1]
    if n_hvg >= g:
        return np.ones(g, dtype=bool)
    probe = ad.AnnData(X=x_ref_log, var=pd.DataFrame(index=[f"g{i}" for i in range(g)]))
    table = sc.pp.highly_variable_genes(probe, n_top_genes=n_hvg, flavor="seurat", inplace=False)
    return np.asarray(table["highly_variable"], dtype=bool)


def run_baselines(
    x_ref: sp.csr_matrix,
    y_ref: np.ndarray,
    x_query: sp.csr_matrix,
    baselines: Sequence[str] = BASELINES,
    k: int = DEFAULT_K,
    n_hvg: int = 2000,
    n_pcs: int = 50,
    l1_c_grid: Sequence[float] | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict]:
    """Predicted labels of the query per baseline and what each used. ``x_ref`` / ``x_query``: log-normalized
    values over the same genes; ``y_ref``: str labels (no missing)."""
    from sklearn.decomposition import PCA

    from scgpt_train.evaluation.baselines import PAPER_C_GRID, l1_logistic_regression

    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ReferenceMapError(f"--baselines are {BASELINES}, got {sorted(unknown)}")
    hvg = hvg_mask(x_ref, n_hvg)
    xr, xq = x_ref[:, hvg], x_query[:, hvg]
    preds, info = {}, {"n_hvg": int(hvg.sum()), "n_reference_cells": int(x_ref.shape[0])}
    names, y_codes = np.unique(np.asarray(y_ref).astype(str), return_inverse=True)
    if "hvg_pca_knn" in baselines:
        n = int(min(n_pcs, xr.shape[0] - 1, xr.shape[1]))
        pca = PCA(n_components=n, random_state=seed).fit(xr.toarray())
        zr, zq = pca.transform(xr.toarray()).astype(np.float32), pca.transform(xq.toarray()).astype(np.float32)
        spec = IndexSpec("sklearn", "flat", zr.shape[1], seed=seed)
        index = KnnIndex(spec)
        index.add(zr, y_codes, np.arange(len(zr)))
        index.finalize()
        dist, nb = index.search(zq, k)
        code, _ = knn_vote(nb, dist, index.labels, len(names))
        preds["hvg_pca_knn"] = names[code]
        info["hvg_pca_knn"] = {"n_pcs": n, "k": int(k), "pca_fit_on": "reference"}
    if "l1_lr" in baselines:
        grid = tuple(l1_c_grid) if l1_c_grid else PAPER_C_GRID
        if len(names) < 2:
            preds["l1_lr"] = np.full(xq.shape[0], names[0], dtype=object)
            info["l1_lr"] = {"C": None, "note": "one reference label"}
        else:
            pred, c = l1_logistic_regression(xr, y_ref, xq, grid, 5, seed)
            preds["l1_lr"] = np.asarray(pred, dtype=object)
            info["l1_lr"] = {"C": c, "c_grid": [float(v) for v in grid]}
    return preds, info


def align_genes(
    ref: sp.csr_matrix, ref_ids: np.ndarray, query: sp.csr_matrix, query_ids: np.ndarray
) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """The columns of both matrices for the vocabulary ids they share (in ascending id order)."""
    shared = np.intersect1d(ref_ids, query_ids)
    if len(shared) == 0:
        raise ReferenceMapError("the reference and the query share no gene of the checkpoint's vocabulary")
    r = np.searchsorted(ref_ids, shared) if np.all(np.diff(ref_ids) > 0) else _positions(ref_ids, shared)
    q = np.searchsorted(query_ids, shared) if np.all(np.diff(query_ids) > 0) else _positions(query_ids, shared)
    return ref[:, r].tocsr(), query[:, q].tocsr(), shared


def _positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    pos = {int(v): i for i, v in enumerate(ids)}
    return np.array([pos[int(v)] for v in wanted], dtype=np.int64)
