"""Multi-omic integration task: scIB metrics of the cell embedding on every cell, the baselines through the same
metrics, UMAPs by cell type / batch / modality availability, ``predictions.h5ad`` (and ``predictions.h5mu`` for a
MuData input) with ``obsm["X_scgpt"]``."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgpt_train.evaluation.metrics import INTEGRATION_BACKEND, integration_metrics
from scgpt_train.inference import l2_normalize
from scgpt_train.tasks.base import FineTuneTask
from scgpt_train.tasks.multiomic.baselines import (
    MULTIOMIC_BASELINES,
    multivi_embedding,
    pca_concat_embedding,
    scvi_installed,
    totalvi_embedding,
)

log = logging.getLogger(__name__)


class MultiomicIntegrationTask(FineTuneTask):
    """Metrics ``test/avg_bio``, ``test/avg_batch``, ``test/overall`` (+ parts) and ``baseline/<name>/...``.

    baselines: pca_concat | totalvi (needs a protein modality) | multivi (needs an ATAC modality).
    totalvi / multivi: keyword settings of the scvi-tools runs (epochs, latent size, threads)."""

    name = "multiomic"
    title = "multi-omic"
    known_baselines = MULTIOMIC_BASELINES

    def __init__(
        self, n_pcs: int = 50, n_neighbors: int = 15, totalvi: dict | None = None, multivi: dict | None = None, **kw
    ):
        super().__init__(**kw)
        self.n_pcs, self.n_neighbors = int(n_pcs), int(n_neighbors)
        self.totalvi_kwargs = dict(totalvi or {})
        self.multivi_kwargs = dict(multivi or {})

    def score(self, dm, outputs, output_dir: Path):
        if dm.labels is None or dm.batch_labels is None:
            raise ValueError("the multi-omic task needs data.label_key (cell types) and data.batch_key")
        labels = dm.obs[dm.label_key].astype(str).to_numpy()
        batches = dm.obs[dm.batch_key].astype(str).to_numpy()
        outputs["cell_emb"] = l2_normalize(outputs["cell_emb"])
        emb = outputs["cell_emb"]
        metrics = {f"test/{k}": v for k, v in self._metrics(emb, labels, batches).items()}
        colors = {"cell type": labels, "batch": batches, "modalities": dm.obs["modalities"].astype(str).to_numpy()}
        self.umap_figure(emb, colors, output_dir / "umap.png", "scGPT")
        embeddings, extra = self.baseline_embeddings(dm, batches)
        for name, base in embeddings.items():
            metrics.update({f"baseline/{name}/{k}": v for k, v in self._metrics(base, labels, batches).items()})
            self.umap_figure(base, colors, output_dir / f"umap_{name}.png", name)
        self._write_h5mu(dm, emb, output_dir)
        return metrics, dm.obs.copy(), {"metrics_backend": INTEGRATION_BACKEND, **extra}

    def _metrics(self, emb, labels, batches) -> dict:
        return integration_metrics(emb, labels, batches, self.n_neighbors, self.seed)

    def baseline_embeddings(self, dm, batches):
        kinds = {name: m.kind for name, m in dm.mods.items()}
        by_kind = {k: n for n, k in kinds.items()}
        embeddings, skipped, inputs = {}, {}, {}
        for name in self.baselines:
            try:
                if name == "pca_concat":
                    blocks = [(dm.expression(m), dm.mods[m].present) for m in dm.mods]
                    embeddings[name] = pca_concat_embedding(blocks, self.n_pcs, self.seed)
                    inputs[name] = f"PCA of the z-scored, equally weighted modalities {list(dm.mods)}"
                    continue
                need = {"totalvi": "protein", "multivi": "atac"}[name]
                if need not in by_kind or "rna" not in by_kind:
                    skipped[name] = f"not applicable (needs RNA + {need})"
                    continue
                if not scvi_installed():
                    skipped[name] = "not installed (scvi-tools, the `baselines` extra)"
                    continue
                rna, other = dm.counts(by_kind["rna"]), dm.counts(by_kind[need])
                if name == "totalvi":
                    names = dm.mods[by_kind["protein"]].tokens
                    embeddings[name] = totalvi_embedding(
                        rna, other, batches, self.seed, protein_names=names, **self.totalvi_kwargs
                    )
                else:
                    embeddings[name] = multivi_embedding(rna, other, batches, self.seed, **self.multivi_kwargs)
                kw = self.totalvi_kwargs if name == "totalvi" else self.multivi_kwargs
                inputs[name] = f"{name} on the stored counts of the model's features, batch covariate, settings {kw}"
            except Exception as err:  # a failing baseline must not lose the fine-tune's results
                log.exception("baseline %s failed", name)
                skipped[name] = f"failed: {type(err).__name__}: {err}"
        return embeddings, {"skipped_baselines": skipped, "baseline_inputs": inputs}

    def predictions_anndata(self, dm, obs, outputs) -> ad.AnnData:
        """All cells: X = the RNA values the model read (its genes), obs with ``has_<modality>`` / ``modalities``
        / ``split``, ``obsm["X_scgpt"]``, and each other modality's preprocessed values in ``obsm["<name>"]`` (sparse;
        feature tokens in ``uns["<name>_features"]``)."""
        rna = next((n for n, m in dm.mods.items() if m.kind == "rna"), None)
        first = rna or next(iter(dm.mods))
        obs = obs.copy()
        obs.index = obs.index.astype(str)
        var = pd.DataFrame(index=pd.Index(dm.mods[first].tokens).astype(str))
        adata = ad.AnnData(X=dm.expression(first), obs=obs, var=var)
        for name, m in dm.mods.items():
            if name != first:  # sparse (peaks can be many); feature names in uns["<name>_features"]
                adata.obsm[name] = sp.csr_matrix(m.values, dtype=np.float32)
                adata.uns[f"{name}_features"] = np.asarray(m.tokens, dtype=str)
        adata.obsm["X_scgpt"] = outputs["cell_emb"]
        return adata

    def _write_h5mu(self, dm, emb, output_dir: Path) -> None:
        if not self.write_h5ad or not str(dm.path).endswith(".h5mu"):
            return
        import mudata

        from data_modules.atomic import atomic_path

        mdata = mudata.read_h5mu(dm.path)
        mdata.obsm["X_scgpt"] = emb
        with atomic_path(output_dir / "predictions.h5mu", ".h5mu") as tmp:
            mdata.write_h5mu(tmp)
