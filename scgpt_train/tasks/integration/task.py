"""Batch integration: embed every cell, score with scIB metrics; the baselines on the same cells and genes
(HVG+PCA, Harmony on that PCA, scVI on the raw counts of the same genes) through the same metrics."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scgpt_train.evaluation.baselines import (
    available_baselines,
    harmony_embedding,
    has_integer_values,
    hvg_pca_embedding,
    scvi_embedding,
)
from scgpt_train.evaluation.metrics import INTEGRATION_BACKEND, integration_metrics
from scgpt_train.inference import l2_normalize
from scgpt_train.tasks.base import FineTuneTask

log = logging.getLogger(__name__)

INTEGRATION_BASELINES = ("hvg_pca", "harmony", "scvi")


class IntegrationTask(FineTuneTask):
    """Metrics on all cells (``test/avg_bio``, ``test/avg_batch``, ``test/overall`` and the parts; baselines
    under ``baseline/<name>/...``), ``umap.png`` (by cell type and batch; ``umap_<baseline>.png`` for the
    baselines), ``predictions.h5ad`` with ``obsm["X_scgpt"]`` (L2-normalized cell embeddings, as the official
    tutorials evaluate them).

    n_pcs: PCs of the HVG+PCA baseline (Harmony corrects the same PCs).
    harmony: keyword arguments of ``harmonypy.run_harmony`` (theta, max_iter_harmony, ...).
    scvi: settings of :func:`scgpt_train.evaluation.baselines.scvi_embedding` (model size, epochs, threads).
    Harmony / scVI are skipped (and listed in ``metrics.json`` under ``skipped_baselines`` with the reason)
    when their packages are not installed or when they fail; the fine-tune's metrics are kept either way."""

    name = title = "integration"
    known_baselines = INTEGRATION_BASELINES

    def __init__(
        self, n_pcs: int = 50, n_neighbors: int = 15, harmony: dict | None = None, scvi: dict | None = None, **kw
    ):
        super().__init__(**kw)
        self.n_pcs, self.n_neighbors = int(n_pcs), int(n_neighbors)
        self.harmony_kwargs = {str(k): v for k, v in (harmony or {}).items()}
        self.scvi_kwargs = {str(k): v for k, v in (scvi or {}).items()}

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
        embeddings, extra = self.baseline_embeddings(dm, idx, output_dir)
        for name, base in embeddings.items():
            b = integration_metrics(base, labels[idx], batches[idx], self.n_neighbors, self.seed)
            metrics.update({f"baseline/{name}/{k}": v for k, v in b.items()})
            self.umap_figure(base, colors, output_dir / f"umap_{name}.png", name)
        obs = dm.obs.copy()
        return metrics, obs, {"metrics_backend": INTEGRATION_BACKEND, **extra}

    def baseline_embeddings(self, dm, idx: np.ndarray, output_dir: Path | None = None):
        """({baseline: (cells, d) embedding of the cells ``idx``}, report) for the configured baselines.

        The report holds ``skipped_baselines`` ({name: reason}) and ``baseline_inputs`` (what each one saw)."""
        batches = dm.obs[dm.batch_key].astype(str).to_numpy()[idx]
        installed = available_baselines()
        embeddings: dict[str, np.ndarray] = {}
        skipped: dict[str, str] = {}
        inputs: dict[str, str] = {}
        pcs = None
        for name in self.baselines:
            if name != "hvg_pca" and not installed.get(name):
                skipped[name] = "package not installed"
                continue
            try:
                if name in ("hvg_pca", "harmony") and pcs is None:
                    pcs = hvg_pca_embedding(dm.expression("all")[idx], self.n_pcs, self.seed)
                if name == "hvg_pca":
                    embeddings[name] = pcs
                    inputs[name] = f"PCA ({pcs.shape[1]} PCs) of the model's preprocessed values"
                elif name == "harmony":
                    embeddings[name] = harmony_embedding(pcs, batches, self.seed, **self.harmony_kwargs)
                    inputs[name] = f"Harmony on the HVG+PCA embedding ({pcs.shape[1]} PCs), batch key {dm.batch_key}"
                elif name == "scvi":
                    counts = raw_counts(dm)[idx]
                    integer = has_integer_values(counts)
                    if not integer:
                        log.warning("scVI: the model genes' stored values are not integer counts (used as given)")
                    log_dir = None if output_dir is None else Path(output_dir) / "scvi"
                    embeddings[name] = scvi_embedding(
                        counts, batches, self.seed, **{"log_dir": log_dir, **self.scvi_kwargs}
                    )
                    inputs[name] = (
                        f"scVI on the stored values of the model's {counts.shape[1]} genes "
                        + ("(integer counts)" if integer else "(NOT integer counts: used as given)")
                        + f", batch key {dm.batch_key}, settings {self.scvi_kwargs}"
                    )
            except Exception as err:  # a failing baseline must not lose the fine-tune's results
                log.exception("baseline %s failed", name)
                skipped[name] = f"failed: {type(err).__name__}: {err}"
        return embeddings, {"skipped_baselines": skipped, "baseline_inputs": inputs}


def raw_counts(dm) -> sp.csr_matrix:
    """(all cells, model genes) values as stored before normalization: the data module's files read again
    the way it reads them (``preprocess.use_raw`` / ``gene_column``; ``counts_layer`` when set, else X),
    the reference's rows then the query's, genes mapped to the model's columns through the vocabulary."""
    import anndata as ad

    from data_modules.preprocess import read_input

    cfg = dm.preprocess_cfg
    column_of_id = {int(g): p for p, g in enumerate(dm.gene_ids)}
    blocks = []
    for path in [dm.path] + ([dm.query_path] if dm.query_path else []):
        data = read_input(ad.read_h5ad(path), cfg)
        x = data.layers[cfg.counts_layer] if cfg.counts_layer else data.X
        ids = dm.vocab.map_genes(list(data.var_names)).ids
        cols = np.array([column_of_id.get(int(i), -1) for i in ids], dtype=np.int64)
        keep = np.flatnonzero(cols >= 0)
        # (file genes, model genes) 0/1 selection: x @ select puts each kept gene in its model column
        select = sp.csr_matrix(
            (np.ones(len(keep), dtype=np.float32), (keep, cols[keep])), shape=(x.shape[1], len(dm.gene_ids))
        )
        blocks.append(sp.csr_matrix(x @ select, dtype=np.float32))
    out = sp.vstack(blocks, format="csr")
    if out.shape[0] != len(dm.split):
        raise ValueError(f"re-reading the counts gave {out.shape[0]} cells, the data module has {len(dm.split)}")
    return out
