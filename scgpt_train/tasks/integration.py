"""Batch integration: embed every cell, score with scIB metrics; HVG+PCA baseline on the same cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scgpt_train.tasks.baselines import available_baselines, hvg_pca_embedding
from scgpt_train.tasks.common import FineTuneTask
from scgpt_train.tasks.metrics import INTEGRATION_BACKEND, integration_metrics

INTEGRATION_BASELINES = ("hvg_pca", "harmony", "scvi")


class IntegrationTask(FineTuneTask):
    """Metrics on all cells (``test/avg_bio``, ``test/avg_batch``, ``test/overall`` and the parts; baselines
    under ``baseline/<name>/...``), ``umap.png`` (by cell type and batch; ``umap_hvg_pca.png`` for the
    baseline), ``predictions.h5ad`` with ``obsm["X_scgpt"]`` (L2-normalized cell embeddings, as the official
    tutorials evaluate them). Harmony / scVI are skipped (and reported) when
    their packages are not installed."""

    name = "integration"

    def __init__(self, n_pcs: int = 50, n_neighbors: int = 15, **kw):
        super().__init__(**kw)
        unknown = set(self.baselines) - set(INTEGRATION_BASELINES)
        if unknown:
            raise ValueError(f"integration baselines are {INTEGRATION_BASELINES}, got {sorted(unknown)}")
        self.n_pcs, self.n_neighbors = int(n_pcs), int(n_neighbors)

    def score(self, dm, outputs, output_dir: Path):
        if dm.labels is None or dm.batch_labels is None:
            raise ValueError("the integration task needs data.label_key (cell types) and data.batch_key")
        idx = dm.indices("eval")
        labels = dm.obs[dm.label_key].astype(str).to_numpy()
        batches = dm.obs[dm.batch_key].astype(str).to_numpy()
        outputs["cell_emb"] = l2_normalize(outputs["cell_emb"])  # as the official tutorials evaluate
        emb = outputs["cell_emb"][idx]
        scores = integration_metrics(emb, labels[idx], batches[idx], self.n_neighbors, self.seed)
        metrics = {f"test/{k}": v for k, v in scores.items()}
        colors = {"cell type": labels[idx], "batch": batches[idx]}
        self.umap_figure(emb, colors, output_dir / "umap.png", "scGPT")
        extra = {"metrics_backend": INTEGRATION_BACKEND, "skipped_baselines": {}}
        installed = available_baselines()
        for name in self.baselines:
            if name == "hvg_pca":
                base = hvg_pca_embedding(dm.expression("eval"), self.n_pcs, self.seed)
            elif not installed.get(name):
                extra["skipped_baselines"][name] = "package not installed"
                continue
            else:
                base = run_optional_baseline(name, dm, idx, self.seed)
            b = integration_metrics(base, labels[idx], batches[idx], self.n_neighbors, self.seed)
            metrics.update({f"baseline/{name}/{k}": v for k, v in b.items()})
            self.umap_figure(base, colors, output_dir / f"umap_{name}.png", name)
        obs = dm.obs.copy()
        return metrics, obs, extra


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def run_optional_baseline(name: str, dm, idx: np.ndarray, seed: int) -> np.ndarray:
    """Harmony on the HVG+PCA embedding, or scVI on the expression (only called when installed)."""
    batches = dm.obs[dm.batch_key].astype(str).to_numpy()[idx]
    if name == "harmony":
        import harmonypy
        import pandas as pd

        pcs = hvg_pca_embedding(dm.expression("eval"), 50, seed)
        ho = harmonypy.run_harmony(pcs, pd.DataFrame({"batch": batches}), ["batch"], random_state=seed)
        z = np.asarray(ho.Z_corr)
        return (z.T if z.shape[0] != len(idx) else z).astype(np.float32)
    if name == "scvi":
        import anndata as ad
        import scvi

        a = ad.AnnData(X=np.expm1(dm.expression("eval").toarray()).round().astype(np.float32))
        a.obs["batch"] = batches
        scvi.settings.seed = seed
        scvi.model.SCVI.setup_anndata(a, batch_key="batch")
        model = scvi.model.SCVI(a, n_latent=30)
        model.train(max_epochs=100)
        return model.get_latent_representation().astype(np.float32)
    raise ValueError(f"unknown baseline {name!r}")
