"""The co-expression baseline's gene features, and per-cell program scores."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgpt_train.tasks.gene_programs.common import COEXPR_PCS


def coexpression_features(
    x_log: sp.csr_matrix, n_pcs: int = COEXPR_PCS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(genes x features) of each gene's z-scored profile over cells, reduced to ``n_pcs`` components, and the
    (G,) bool mask of genes with any variance (the others have no co-expression and are left out)."""
    from sklearn.decomposition import PCA

    x = np.asarray(x_log.toarray() if sp.issparse(x_log) else x_log, dtype=np.float64).T  # (G, cells)
    sd = x.std(1)
    ok = sd > 0
    z = (x[ok] - x[ok].mean(1, keepdims=True)) / sd[ok, None]
    n = int(min(n_pcs, z.shape[0] - 1, z.shape[1]))
    feats = PCA(n_components=n, random_state=seed).fit_transform(z).astype(np.float32) if n >= 2 else z
    return feats, ok


def program_scores(x_log: sp.csr_matrix, genes: Sequence[str], programs, seed: int = 0) -> pd.DataFrame:
    """(cells x programs) ``sc.tl.score_genes`` scores (mean of the program minus a matched control set)."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(X=sp.csr_matrix(x_log, dtype=np.float32), var=pd.DataFrame(index=list(genes)))
    out = {}
    for name, members in programs.items():
        sc.tl.score_genes(a, list(members), score_name="_score", random_state=seed, ctrl_size=50)
        out[name] = a.obs["_score"].to_numpy(dtype=np.float32)
    return pd.DataFrame(out, index=a.obs_names)
