"""Cell-type annotation: predict the query's cell types with the fine-tuned classifier; L1-LR baseline; the
validation macro-F1 that selects the checkpoint (:class:`ValidationMacroF1`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from scgpt_train.evaluation.baselines import PAPER_C_GRID, l1_logistic_regression
from scgpt_train.evaluation.figures import plot_confusion
from scgpt_train.evaluation.metrics import classification_metrics, collapse_flags, collapse_warning, confusion_matrix
from scgpt_train.tasks.base import FineTuneTask, matrix_sha256, value_summary

log = logging.getLogger(__name__)
ANNOTATION_BASELINES = ("l1_lr",)


def flag_collapse(metrics: dict, prefix: str, truth, pred, train_labels, what: str) -> list[str]:
    """Add ``<prefix>collapsed`` / ``no_better_than_majority`` / ``majority_accuracy`` to ``metrics``; returns the
    warning logged when a flag is set (none otherwise)."""
    flags = collapse_flags(truth, pred, train_labels)
    metrics.update({f"{prefix}{k}": v for k, v in flags.items()})
    msg = collapse_warning(flags, what, pred)
    if msg is None:
        return []
    log.warning(msg)
    return [msg]


class AnnotationTask(FineTuneTask):
    """Metrics on the query (``test/accuracy``, ``test/precision``, ``test/recall``, ``test/macro_f1``; the
    baseline's under ``baseline/l1_lr/...``), ``confusion_matrix.png``, ``umap.png`` (query cells by true
    label, prediction and batch), ``predictions.h5ad`` with every cell's ``scgpt_pred``."""

    name = title = "annotation"
    known_baselines = ANNOTATION_BASELINES

    def __init__(self, l1_c_grid: list[float] | None = None, l1_cv: int = 5, **kw):
        super().__init__(**kw)
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
        train = truth[dm.indices("train")]
        warnings = flag_collapse(metrics, "test/", truth[idx], pred[idx], train, "scGPT on the evaluated cells")
        val = dm.indices("val")
        if len(val):
            warnings += flag_collapse(metrics, "val/", truth[val], pred[val], train, "scGPT on the validation cells")
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
            warnings += flag_collapse(metrics, "baseline/l1_lr/", truth[idx], base_pred, train, "L1-LR baseline")
            extra["l1_lr_C"] = c
            bcm, bclasses = confusion_matrix(truth[idx], base_pred)
            plot_confusion(bcm, bclasses, output_dir / "confusion_matrix_l1_lr.png", title="L1-LR baseline: query")
        extra["quality_warnings"] = warnings
        return metrics, obs, extra


class ValidationMacroF1(pl.Callback):
    """Logs ``val/macro_f1`` (macro F1 over the classes in the validation labels or predictions, as
    :func:`scgpt_train.evaluation.metrics.classification_metrics`) after every validation pass, from the classifier
    outputs of the validation step itself (a forward hook on the model: no second forward).

    The annotation recipes select the checkpoint by it (``optimized_metric: val/macro_f1``, checkpoint mode max):
    on small validation sets the validation loss picked early majority-class checkpoints, which macro-F1 scores
    lowest. ``val/accuracy`` (logged by the module) is the other choice: ``optimized_metric=val/accuracy``.
    """

    def __init__(self, key: str = "val/macro_f1"):
        self.key = key
        self._handle = None
        self._pred: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None  # (C, C) confusion counts, rows = true class

    def on_validation_epoch_start(self, trainer, pl_module):
        self._counts = None
        model = getattr(pl_module, "model", pl_module)

        def keep(module, args, output):
            if isinstance(output, dict) and "cls_output" in output:
                self._pred = output["cls_output"].detach().argmax(-1)

        self._handle = model.register_forward_hook(keep)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        pred, self._pred = self._pred, None
        labels = getattr(batch, "labels", None)
        if pred is None or labels is None:
            return
        known = labels >= 0
        n = int(getattr(pl_module.model, "config", lambda: {})().get("n_cls", 0) or 0)
        n = max(n, int(labels.max()) + 1, int(pred.max()) + 1)
        t, p = labels[known].long(), pred[known].long()
        counts = torch.bincount(t * n + p, minlength=n * n).reshape(n, n)
        if self._counts is not None and self._counts.shape[0] < n:
            grown = torch.zeros(n, n, dtype=counts.dtype, device=counts.device)
            grown[: self._counts.shape[0], : self._counts.shape[1]] = self._counts
            self._counts = grown
        self._counts = counts if self._counts is None else self._counts + counts

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._counts is None:
            return
        cm = trainer.strategy.reduce(self._counts.float(), reduce_op="sum")  # all ranks' cells
        pl_module.log(self.key, macro_f1_from_counts(cm), prog_bar=True, sync_dist=False)

    def on_validation_end(self, trainer, pl_module):
        if self._handle is not None:  # a pass that ended without its epoch end
            self._handle.remove()
            self._handle = None


def macro_f1_from_counts(cm: torch.Tensor) -> torch.Tensor:
    """Macro F1 of a (C, C) confusion-count matrix over the classes with a true or predicted cell."""
    cm = cm.double()
    tp, predicted, actual = cm.diagonal(), cm.sum(0), cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    present = (predicted > 0) | (actual > 0)
    return (f1[present].mean() if present.any() else f1.sum()).float()
