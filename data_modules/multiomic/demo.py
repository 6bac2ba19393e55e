"""The CPU demo data: real CITE-seq PBMCs (200 cells, 16,727 genes, 14 ADTs) from the scvi-tools 1.4.2 sdist
(``tests/test_data/pbmc_10k_protein_v3.h5ad``; fetched by ``scgpt_train.resources.pypi.fetch_citeseq_demo``).

- Coarse cell types gated from the ADTs, on Seurat's per-cell CLR of the 14 ADT counts with one threshold
  (``GATE`` = 1.5, the gap between the negative and positive modes of every gating marker in this file), in this
  order: CD19+ CD3- -> B cell; CD3+ -> T cell; CD14+ -> CD14 monocyte; CD56+ -> NK cell; CD16+ -> CD16 monocyte;
  else other.
- Two pseudo-batches (A / B, half of every cell type each, seeded) with a documented batch effect in B, kept as
  integer counts: each gene's counts binomially thinned with capture probability ``min(1, 0.5 * exp(N(0, 0.5)))``
  and each ADT's counts scaled by ``exp(N(0, 0.5))`` and rounded.
- ``mosaic=True``: batch B's proteins removed (zero rows in ``obsm["protein_expression"]`` and
  ``obs["has_Protein"] = False``), so B is RNA-only and A is paired.
Written in the scvi-tools paired layout (``obsm["protein_expression"]`` + ``uns["protein_names"]``).
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_modules.atomic import atomic_path
from data_modules.demo import demo_builder
from data_modules.preprocess import stratified_split

CITESEQ_FILE = "pbmc_10k_protein_v3.h5ad"
GATE = 1.5
GATES = (  # (label, positive markers, negative markers), first match wins
    ("B cell", ("CD19",), ("CD3",)),
    ("T cell", ("CD3",), ()),
    ("CD14 monocyte", ("CD14",), ()),
    ("NK cell", ("CD56",), ()),
    ("CD16 monocyte", ("CD16",), ()),
)


def adt_clr(counts: np.ndarray) -> np.ndarray:
    """Seurat's margin-1 CLR of (cells, ADTs) counts: log1p(x / exp(mean_j log1p(x_j)))."""
    x = np.asarray(counts, dtype=np.float64)
    return np.log1p(x / np.exp(np.log1p(x).mean(axis=1, keepdims=True)))


def gate_cell_types(counts: np.ndarray, names: list[str]) -> np.ndarray:
    """(cells,) coarse labels from ADT counts by ``GATES`` on the CLR values (names without ``_TotalSeqB``)."""
    clr = adt_clr(counts)
    col = {n.split("_")[0]: j for j, n in enumerate(names)}
    missing = [m for _, pos, neg in GATES for m in pos + neg if m not in col]
    if missing:
        raise ValueError(f"ADT gating needs markers {sorted(set(missing))}; the file has {sorted(col)}")
    labels = np.full(len(clr), "other", dtype=object)
    open_ = np.ones(len(clr), dtype=bool)
    for label, pos, neg in GATES:
        hit = open_.copy()
        for m in pos:
            hit &= clr[:, col[m]] > GATE
        for m in neg:
            hit &= clr[:, col[m]] <= GATE
        labels[hit] = label
        open_ &= ~hit
    return labels.astype(str)


def make_citeseq_demo(source: str | os.PathLike, mosaic: bool = False, seed: int = 0) -> ad.AnnData:
    """The demo AnnData (see the module docstring) from the scvi-tools test file at ``source``."""
    src = ad.read_h5ad(source)
    names = [str(n) for n in src.uns["protein_names"]]
    prot = np.asarray(src.obsm["protein_expression"], dtype=np.float64)
    labels = gate_cell_types(prot, names)
    rng = np.random.default_rng(seed)
    _, in_b = stratified_split(labels, 0.5, seed)
    is_b = np.zeros(src.n_obs, dtype=bool)
    is_b[in_b] = True
    x = sp.csr_matrix(src.X, dtype=np.float64)
    capture = np.minimum(1.0, 0.5 * np.exp(rng.normal(0.0, 0.5, src.n_vars)))  # (genes,)
    xb = x[is_b].tocoo()
    xb.data = rng.binomial(xb.data.astype(np.int64), capture[xb.col]).astype(np.float64)
    x = sp.vstack([x[~is_b], xb.tocsr()], format="csr")
    x.eliminate_zeros()
    order = np.concatenate([np.flatnonzero(~is_b), np.flatnonzero(is_b)])
    prot = prot[order]
    b_rows = np.arange(int((~is_b).sum()), src.n_obs)
    prot[b_rows] = np.round(prot[b_rows] * np.exp(rng.normal(0.0, 0.5, prot.shape[1])))
    obs = src.obs.iloc[order].copy()
    obs["cell_type"] = labels[order]
    obs["batch"] = np.where(is_b[order], "B", "A")
    obs["has_Protein"] = True
    if mosaic:
        prot[b_rows] = 0.0
        obs.loc[obs["batch"] == "B", "has_Protein"] = False
    out = ad.AnnData(X=x.astype(np.float32), obs=obs, var=pd.DataFrame(index=src.var_names.copy()))
    out.obsm["protein_expression"] = prot.astype(np.float32)
    out.uns["protein_names"] = np.asarray(names)
    return out


@demo_builder
def build_citeseq_demo(path: str | os.PathLike, source: str | os.PathLike, mosaic: bool = False) -> Path:
    """Write the demo file to ``path`` (``source``: the fetched scvi-tools test file)."""
    if not Path(source).is_file():
        raise FileNotFoundError(
            f'{source} does not exist: fetch it with `.venv/bin/python -c "from scgpt_train.resources.pypi import '
            'fetch_citeseq_demo; fetch_citeseq_demo()"` (downloads the scvi-tools 1.4.2 sdist from PyPI)'
        )
    adata = make_citeseq_demo(source, mosaic=mosaic)
    with atomic_path(path, ".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return Path(path)
