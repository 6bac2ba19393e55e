"""Validation metrics of perturbation fine-tuning, computed every validation epoch so that the checkpoint callback
can select by them.

GEARS / scGPT evaluate a perturbation model on per-condition MEAN profiles: every validation cell is predicted
from its paired control cell, predictions and true cells are averaged per condition, and the means are scored
(:mod:`.metrics`). Logged: ``val/pearson_delta`` (Pearson of predicted vs true change against the mean of all
control cells, all genes; the default selection metric), ``val/pearson_de_delta`` (top-20 DE genes),
``val/pearson`` (the official tutorial's selection metric: raw Pearson of the means, ~0.99 every epoch, so it
selects almost arbitrarily) and ``val/mse``.

Choose the selection with ``optimized_metric=val/pearson_delta`` (``callbacks.model_checkpoint.mode: max``) or
``val/pearson`` for the official behaviour.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch

from data_modules.perturbation.inputs import scatter_predictions
from scgpt_train.tasks.perturbation import metrics as M

LOGGED = ("pearson", "pearson_delta", "pearson_de_delta", "mse")


class PerturbationValMetrics(pl.Callback):
    """Accumulates per-condition sums of predicted and true validation cells; logs the metrics at epoch end.

    Needs the perturbation data module (its val loader's columns are the data's genes in order)."""

    def __init__(self, nan_policy: str = "omit"):
        self.nan_policy = nan_policy
        self._pred: dict[int, np.ndarray] = {}
        self._true: dict[int, np.ndarray] = {}
        self._n: dict[int, int] = {}

    def on_validation_epoch_start(self, trainer, pl_module):
        self._pred, self._true, self._n = {}, {}, {}

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch.obs.get("condition") is None:
            raise ValueError("PerturbationValMetrics needs the perturbation data module's batches (obs['condition'])")
        out = pl_module(batch)["mlm_output"].float().cpu().numpy()
        values = batch.values.float().cpu().numpy()
        pred = scatter_predictions(out, values, None, batch.pad_mask.cpu().numpy()).astype(np.float64)
        true = batch.target_values.float().cpu().numpy().astype(np.float64)
        codes = batch.obs["condition"].cpu().numpy()
        for code in np.unique(codes):
            rows = codes == code
            c = int(code)
            self._pred[c] = self._pred.get(c, 0.0) + pred[rows].sum(axis=0)
            self._true[c] = self._true.get(c, 0.0) + true[rows].sum(axis=0)
            self._n[c] = self._n.get(c, 0) + int(rows.sum())

    def _reduced(self, trainer, n_conditions: int, n_genes: int):
        """Per-condition sums as dense arrays, summed over processes under DDP."""
        pred = np.zeros((n_conditions, n_genes))
        true = np.zeros((n_conditions, n_genes))
        count = np.zeros(n_conditions)
        for c, n in self._n.items():
            pred[c], true[c], count[c] = self._pred[c], self._true[c], n
        if trainer.world_size > 1:
            parts = [torch.as_tensor(a, device=trainer.strategy.root_device) for a in (pred, true, count)]
            pred, true, count = (trainer.strategy.reduce(p, reduce_op="sum").cpu().numpy() for p in parts)
        return pred, true, count

    def on_validation_epoch_end(self, trainer, pl_module):
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "conditions"):
            return
        n_genes = dm.x.shape[1]
        pred_sum, true_sum, count = self._reduced(trainer, len(dm.conditions), n_genes)
        seen = np.flatnonzero(count > 0)
        if seen.size == 0:
            return
        names = [dm.conditions[i] for i in seen]
        pred = {c: pred_sum[i] / count[i] for c, i in zip(names, seen, strict=True)}
        true = {c: true_sum[i] / count[i] for c, i in zip(names, seen, strict=True)}
        ctrl = dm.data.control_mean
        de = {c: dm.data.top_de_20[c] for c in names}
        scores = {
            "pearson": M.pearson_per_condition(pred, true),
            "pearson_delta": M.pearson_delta(pred, true, ctrl),
            "pearson_de_delta": M.pearson_delta(pred, true, ctrl, de),
            "mse": M.mse(pred, true),
        }
        for name in LOGGED:
            value = M.mean_over_conditions(scores[name], self.nan_policy)
            pl_module.log(f"val/{name}", float(value), prog_bar=name == "pearson_delta", sync_dist=False)
