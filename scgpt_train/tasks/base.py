"""What every fine-tuning task does after fit: best weights, inference over all cells, outputs."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from data_modules.finetune import FineTuneData
from scgpt_train.evaluation.figures import plot_umap, umap_coordinates
from scgpt_train.evaluation.report import write_h5ad, write_json
from scgpt_train.inference import load_best_weights, predict_cells

log = logging.getLogger(__name__)


def matrix_sha256(x) -> str:
    """sha256 of a (cells x genes) matrix's float32 CSR form (sorted indices, no explicit zeros): the same values
    in the same cells and columns give the same digest, whether dense or sparse."""
    m = sp.csr_matrix(x, dtype=np.float32, copy=True)
    m.eliminate_zeros()
    m.sort_indices()
    h = hashlib.sha256(np.asarray(m.shape, dtype=np.int64).tobytes())
    for a in (m.indptr.astype(np.int64), m.indices.astype(np.int64), m.data):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def value_summary(dm) -> str:
    """One line on what the data module's values are (value type and the preprocessing applied), per file."""
    from data_modules.value_types import ValueTypeReport

    return "; ".join(ValueTypeReport(**r).summary() for r in getattr(dm, "value_reports", []) or []) or "as stored"


class FineTuneTask:
    """Base: ``evaluate(trainer, module, datamodule, output_dir) -> metrics`` (rank zero only).

    use_best: reload the best checkpoint (lowest monitored validation metric) before evaluating.
    baselines: names of baselines to run on the same data and split (of the task's ``known_baselines``).
    umap: write UMAP figures; write_h5ad: write ``predictions.h5ad`` (obs ``scgpt_pred``, obsm ``X_scgpt``).
    """

    name = "task"
    title = "task"  # how error messages name the task
    known_baselines: tuple[str, ...] = ()  # the baselines the task can run (others are refused)

    def __init__(
        self,
        use_best: bool = True,
        baselines: list[str] | tuple[str, ...] = (),
        umap: bool = True,
        write_h5ad: bool = True,
        progress: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
    ):
        self.use_best, self.baselines = use_best, list(baselines or [])
        unknown = set(self.baselines) - set(self.known_baselines)
        if unknown:
            raise ValueError(f"{self.title} baselines are {self.known_baselines}, got {sorted(unknown)}")
        self.umap, self.write_h5ad, self.progress = umap, write_h5ad, progress
        self.seed, self.batch_size = int(seed), batch_size

    def evaluate(self, trainer, module, datamodule: FineTuneData, output_dir) -> dict[str, float]:
        """On rank zero: the best weights (``use_best``), :meth:`predict` on the trainer's device, :meth:`report`."""
        if trainer is not None and not trainer.is_global_zero:
            return {}
        best = load_best_weights(module, trainer) if (self.use_best and trainer is not None) else None
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        module.to(device)
        outputs = self.predict(module, datamodule, device)
        return self.report(trainer, datamodule, outputs, Path(output_dir), best)

    def predict(self, module, datamodule: FineTuneData, device) -> dict[str, np.ndarray]:
        """The prediction hook: every cell of the data module through :func:`predict_cells` (``cell_emb``, and
        ``probs`` / ``pred`` with a classifier), rows in the data module's cell order."""
        return predict_cells(
            module,
            datamodule.loader("all", masked=False, batch_size=self.batch_size),
            len(datamodule.split),
            device=device,
            progress=self.progress,
            description=f"{self.name}: predicting",
        )

    def report(
        self, trainer, datamodule: FineTuneData, outputs: dict, output_dir: Path, best: str | None
    ) -> dict[str, float]:
        """:meth:`score` the predictions; write ``metrics.json`` (and ``predictions.h5ad``); return the metrics."""
        metrics, obs, extra = self.score(datamodule, outputs, output_dir)
        metrics = {k: float(v) for k, v in metrics.items()}
        extra = {"selection": self.selection(trainer, best), **extra}
        self.show_metrics(trainer, metrics)
        write_json(
            {"task": self.name, "best_checkpoint": best, "metrics": metrics, "data": datamodule.report(), **extra},
            output_dir / "metrics.json",
        )
        if self.write_h5ad:
            write_h5ad(self.predictions_anndata(datamodule, obs, outputs), output_dir / "predictions.h5ad")
        return metrics

    @staticmethod
    def predictions_anndata(datamodule, obs, outputs: dict[str, np.ndarray]) -> ad.AnnData:
        """The input AnnData (obs_names, every gene in var order, X and layers untouched; reference then query
        cells) with the task's obs columns (``split``, predictions) added, ``obsm["X_scgpt"]``, and
        ``layers["preprocessed"]``: the values model and baselines read (``datamodule.input_anndata()``)."""
        if hasattr(datamodule, "input_anndata"):
            adata = datamodule.input_anndata()
            obs = obs.copy()
            obs.index = adata.obs_names
            adata.obs = obs
        else:  # a data module that cannot give its inputs back: the model's genes and values
            adata = ad.AnnData(X=datamodule.expression("all"), obs=obs, var=datamodule.adata.var.copy())
        adata.obsm["X_scgpt"] = outputs["cell_emb"]
        if hasattr(datamodule, "report"):  # what the values and genes were (JSON text: h5ad stores no None)
            adata.uns["scgpt_data_report"] = json.dumps(datamodule.report(), default=str)
        return adata

    def show_metrics(self, trainer, metrics: dict[str, float]) -> None:
        """Print the task's metrics beside the baselines' and hand them to the run summary (summary.json)."""
        from rich.console import Console

        from scgpt_train.callbacks import RunSummary, task_metrics_table

        for cb in getattr(trainer, "callbacks", None) or []:
            if isinstance(cb, RunSummary):
                cb.task_metrics = dict(metrics)
        table = task_metrics_table(metrics, title=f"{self.name} metrics")
        if table is not None:
            Console().print(table)

    def selection(self, trainer, best: str | None) -> dict:
        """Which weights were evaluated and why: the checkpoint callback's monitor, mode and best score."""
        cb = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
        score = getattr(cb, "best_model_score", None)
        return {
            "use_best": bool(self.use_best),
            "weights": best or "the last epoch's (no best checkpoint)",
            "monitor": getattr(cb, "monitor", None),
            "mode": getattr(cb, "mode", None),
            "best_score": float(score) if score is not None else None,
        }

    def score(self, datamodule, outputs: dict[str, np.ndarray], output_dir: Path):
        raise NotImplementedError

    def umap_figure(self, embedding: np.ndarray, colors: dict, path: Path, title: str) -> Path | None:
        if not self.umap or len(embedding) < 5:
            return None
        return plot_umap(umap_coordinates(embedding, seed=self.seed), colors, path, title)
