"""Cell-type annotation: predict the query's cell types with the fine-tuned classifier; L1-LR baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scgpt_train.tasks.baselines import PAPER_C_GRID, l1_logistic_regression
from scgpt_train.tasks.common import FineTuneTask, matrix_sha256, value_summary
from scgpt_train.tasks.metrics import classification_metrics, confusion_matrix
from scgpt_train.tasks.report import plot_confusion

ANNOTATION_BASELINES = ("l1_lr",)


class AnnotationTask(FineTuneTask):
    """Metrics on the query (``test/accuracy``, ``test/precision``, ``test/recall``, ``test/macro_f1``; the
    baseline's under ``baseline/l1_lr/...``), ``confusion_matrix.png``, ``umap.png`` (query cells by true
    label, prediction and batch), ``predictions.h5ad`` with every cell's ``scgpt_pred``."""

    name = "annotation"

    def __init__(self, l1_c_grid: list[float] | None = None, l1_cv: int = 5, **kw):
        super().__init__(**kw)
        unknown = set(self.baselines) - set(ANNOTATION_BASELINES)
        if unknown:
            raise ValueError(f"annotation baselines are {ANNOTATION_BASELINES}, got {sorted(unknown)}")
        self.l1_c_grid = tuple(l1_c_grid) if l1_c_grid else PAPER_C_GRID
        self.l1_cv = int(l1_cv)

    def score(self, dm, outputs, output_dir: Path):
        if dm.labels is None:
            raise ValueError("the annotation task needs data.label_key")
        if "pred" not in outputs:
            raise ValueError("the model has no classifier: fine-tune with a data module exposing n_cls")
        names = np.asarray(dm.label_names, dtype=object)
        pred = names[outputs["pred"]]
        truth = dm.obs[dm.label_key].astype(str).to_numpy()
        idx = dm.indices("eval")
        metrics = {f"test/{k}": v for k, v in classification_metrics(truth[idx], pred[idx]).items()}
        cm, classes = confusion_matrix(truth[idx], pred[idx])
        plot_confusion(cm, classes, output_dir / "confusion_matrix.png", title="scGPT fine-tuned: query cells")
        obs = dm.obs.copy()
        obs["scgpt_pred"] = pred
        obs["scgpt_pred_prob"] = outputs["probs"].max(1)
        colors = {"cell type": truth[idx], "scGPT prediction": pred[idx]}
        if dm.batch_key is not None:
            colors["batch"] = obs[dm.batch_key].astype(str).to_numpy()[idx]
        self.umap_figure(outputs["cell_emb"][idx], colors, output_dir / "umap.png", "scGPT")
        extra = {"confusion_matrix": {"classes": classes, "counts": cm.tolist()}}
        extra["model_input_sha256"] = matrix_sha256(dm.expression("all"))
        if "l1_lr" in self.baselines:
            ref = dm.indices("reference")
            # the very matrix the model's batches are binned from (dm.expression: the preprocessed values)
            x_ref, x_eval = dm.expression("reference"), dm.expression("eval")
            base_pred, c = l1_logistic_regression(x_ref, truth[ref], x_eval, self.l1_c_grid, self.l1_cv, self.seed)
            extra["baseline_inputs"] = {
                "l1_lr": {
                    "values": f"the model's input values (data module's preprocessed matrix): {value_summary(dm)}",
                    "n_genes": int(x_ref.shape[1]),
                    "train_sha256": matrix_sha256(x_ref),
                    "eval_sha256": matrix_sha256(x_eval),
                }
            }
            metrics.update({f"baseline/l1_lr/{k}": v for k, v in classification_metrics(truth[idx], base_pred).items()})
            extra["l1_lr_C"] = c
            bcm, bclasses = confusion_matrix(truth[idx], base_pred)
            plot_confusion(bcm, bclasses, output_dir / "confusion_matrix_l1_lr.png", title="L1-LR baseline: query")
        return metrics, obs, extra
