"""Multi-omic baselines scored by the same scIB metrics as the model.

- ``pca_concat``: each modality's preprocessed values (RNA log1p-normalized HVGs, protein CLR / log1p, ATAC
  binary or counts) z-scored per feature over the cells that have the modality (clipped at 10), cells lacking it
  set to 0 (the mean), each block divided by sqrt(its feature count) so every modality carries the same total
  variance, concatenated, PCA.
- ``totalvi``: scvi-tools TOTALVI on the RNA counts of the model's genes + the protein counts, batch as the
  covariate (mosaic: a batch without proteins has all-zero protein rows, which totalVI treats as not measured).
- ``multivi``: scvi-tools MULTIVI on the RNA counts + the selected peaks (binary), batch as the covariate.
  totalVI / MultiVI come with the ``baselines`` extra (scvi-tools); without it they are reported as not installed.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import numpy as np
import scipy.sparse as sp

from scgpt_train.evaluation.baselines import scvi_training

log = logging.getLogger(__name__)
MULTIOMIC_BASELINES = ("pca_concat", "totalvi", "multivi")


def scvi_installed() -> bool:
    return importlib.util.find_spec("scvi") is not None


def pca_concat_embedding(blocks: list[tuple[sp.csr_matrix, np.ndarray]], n_pcs: int = 50, seed: int = 0) -> np.ndarray:
    """``blocks``: [(values (N, F_m), present (N,) bool)] -> (N, n_pcs) PCA of the scaled concatenation."""
    from sklearn.decomposition import PCA

    scaled = []
    for x, present in blocks:
        dense = np.asarray(x.todense() if sp.issparse(x) else x, dtype=np.float32)
        z = np.zeros_like(dense)
        if present.any():
            sub = dense[present]
            sd = sub.std(0)
            z[present] = np.clip((sub - sub.mean(0)) / np.where(sd > 0, sd, 1.0), -10, 10)
        scaled.append(z / np.sqrt(max(dense.shape[1], 1)))
    full = np.concatenate(scaled, axis=1)
    n = int(min(n_pcs, full.shape[0] - 1, full.shape[1]))
    return PCA(n_components=n, random_state=seed).fit_transform(full).astype(np.float32)


def totalvi_embedding(
    rna_counts, protein_counts, batches, seed: int = 0, n_latent: int = 20, max_epochs: int = 50,
    batch_size: int = 64, num_threads: int | None = 1, protein_names=None,
) -> np.ndarray:  # fmt: skip
    """(N, n_latent) totalVI latent means; proteins as ``obsm["protein_expression"]``."""
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame({"batch": pd.Categorical(np.asarray(batches).astype(str))})
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=sp.csr_matrix(rna_counts, dtype=np.float32), obs=obs)
    prot = np.asarray(sp.csr_matrix(protein_counts).todense(), dtype=np.float32)
    names = list(protein_names) if protein_names is not None else [f"p{i}" for i in range(prot.shape[1])]
    adata.obsm["protein_expression"] = pd.DataFrame(prot, index=obs.index, columns=names)
    with scvi_training(seed, num_threads) as (scvi, tmp):
        warnings.simplefilter("ignore")
        scvi.model.TOTALVI.setup_anndata(adata, batch_key="batch", protein_expression_obsm_key="protein_expression")
        model = scvi.model.TOTALVI(adata, n_latent=n_latent)
        return _train_latent(model, max_epochs, batch_size, tmp)


def multivi_embedding(
    rna_counts, atac_counts, batches, seed: int = 0, n_latent: int | None = None, max_epochs: int = 50,
    batch_size: int = 64, num_threads: int | None = 1,
) -> np.ndarray:  # fmt: skip
    """(N, d) MultiVI latent of RNA counts + peaks (binarized), batch as the covariate (a MuData: scvi-tools 1.4
    sets MultiVI up from MuData only)."""
    import anndata as ad
    import mudata
    import pandas as pd

    index = pd.Index([f"c{i}" for i in range(rna_counts.shape[0])])
    rna = ad.AnnData(sp.csr_matrix(rna_counts, dtype=np.float32), obs=pd.DataFrame(index=index))
    rna.var_names = [f"g{i}" for i in range(rna.n_vars)]
    atac = ad.AnnData(sp.csr_matrix((sp.csr_matrix(atac_counts) > 0).astype(np.float32)), obs=pd.DataFrame(index=index))
    atac.var_names = [f"p{i}" for i in range(atac.n_vars)]
    mdata = mudata.MuData({"rna": rna, "atac": atac})
    mdata.obs["batch"] = pd.Categorical(np.asarray(batches).astype(str))
    with scvi_training(seed, num_threads) as (scvi, tmp):
        warnings.simplefilter("ignore")
        scvi.model.MULTIVI.setup_mudata(mdata, batch_key="batch", modalities={"rna_layer": "rna", "atac_layer": "atac"})
        model = scvi.model.MULTIVI(mdata, n_latent=n_latent)
        return _train_latent(model, max_epochs, batch_size, tmp)


def _train_latent(model, max_epochs: int, batch_size: int, log_dir: str) -> np.ndarray:
    """Train an scvi-tools model on the CPU, without a progress bar; its latent representation (N, d) float32."""
    model.train(
        max_epochs=int(max_epochs), batch_size=int(batch_size), accelerator="cpu", devices=1,
        enable_progress_bar=False, default_root_dir=log_dir,
    )  # fmt: skip
    return np.ascontiguousarray(model.get_latent_representation(), dtype=np.float32)
