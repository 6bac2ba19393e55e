"""kNN graph over genes, Leiden at several resolutions, programs and within-program cosine networks."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgpt_train.tasks.gene_programs.common import DEFAULT_RESOLUTIONS, MIN_PROGRAM_GENES, GeneProgramError


def knn_connectivities(x: np.ndarray, n_neighbors: int = 15, metric: str = "euclidean", seed: int = 0):
    """scanpy's kNN graph of the rows of ``x`` (``sc.pp.neighbors(use_rep="X")``): (n, n) CSR connectivities."""
    import anndata as ad
    import scanpy as sc

    if metric not in ("euclidean", "cosine"):
        raise GeneProgramError(f"--metric must be euclidean or cosine, got {metric!r}")
    a = ad.AnnData(X=np.asarray(x, dtype=np.float32))
    k = int(min(n_neighbors, max(2, a.n_obs - 1)))
    sc.pp.neighbors(a, n_neighbors=k, use_rep="X", metric=metric, random_state=seed)
    return a.obsp["connectivities"].tocsr()


def leiden_labels(connectivities, resolution: float, seed: int = 0) -> np.ndarray:
    """(n,) int cluster of every node: ``sc.tl.leiden`` (leidenalg, scanpy's defaults) with ``random_state=seed``."""
    import anndata as ad
    import scanpy as sc

    n = connectivities.shape[0]
    a = ad.AnnData(X=sp.csr_matrix((n, 1), dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sc.tl.leiden(a, resolution=float(resolution), random_state=seed, adjacency=connectivities, flavor="leidenalg")
    return a.obs["leiden"].astype(int).to_numpy()


def programs_from_labels(
    genes: Sequence[str], labels: np.ndarray, resolution: float, min_genes: int = MIN_PROGRAM_GENES
) -> dict[str, list[str]]:
    """{name: genes} of the clusters with >= ``min_genes`` genes, largest first (ties: first gene), named
    ``r<resolution>_<k>``."""
    groups: dict[int, list[str]] = {}
    for g, lab in zip(genes, labels, strict=True):
        groups.setdefault(int(lab), []).append(g)
    kept = sorted((sorted(v) for v in groups.values() if len(v) >= min_genes), key=lambda v: (-len(v), v[0]))
    tag = f"{resolution:g}"
    return {f"r{tag}_{k}": v for k, v in enumerate(kept)}


def leiden_programs(
    x: np.ndarray,
    genes: Sequence[str],
    resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
    n_neighbors: int = 15,
    metric: str = "euclidean",
    min_genes: int = MIN_PROGRAM_GENES,
    seed: int = 0,
) -> tuple[dict[float, dict[str, list[str]]], dict[float, np.ndarray]]:
    """Programs per resolution ({resolution: {name: genes}}) and the Leiden labels per resolution."""
    conn = knn_connectivities(x, n_neighbors, metric, seed)
    programs, labels = {}, {}
    for r in resolutions:
        labels[float(r)] = leiden_labels(conn, r, seed)
        programs[float(r)] = programs_from_labels(genes, labels[float(r)], r, min_genes)
    return programs, labels


def cosine_network(emb: np.ndarray, genes: Sequence[str], programs: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Every gene pair within each program with the cosine similarity of their embeddings."""
    pos = {g: i for i, g in enumerate(genes)}
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    rows = []
    for name, members in programs.items():
        idx = np.array([pos[g] for g in members])
        sim = unit[idx] @ unit[idx].T
        a, b = np.triu_indices(len(idx), 1)
        rows.append(
            pd.DataFrame(
                {
                    "program": name,
                    "gene_a": np.asarray(members)[a],
                    "gene_b": np.asarray(members)[b],
                    "cosine": sim[a, b],
                }
            )
        )
    return (
        pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["program", "gene_a", "gene_b", "cosine"])
    )
