"""Callbacks: throughput (cells/s, tokens/s, padding, MFU) and the end-of-run summary."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from data_modules.atomic import write_json_atomic
from data_modules.batch import Batch
from scgpt_train.adapters import parameter_counts
from scgpt_train.objectives.per_gene import per_gene_ratios

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, for the MFU estimate.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
    "4090": 165e12,
    "3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s: ``BENCH_PEAK_TFLOPS``, else by device name; None on CPU or unknown."""
    if os.environ.get("BENCH_PEAK_TFLOPS"):
        return float(os.environ["BENCH_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def train_flops(d_model: int, d_ff: int, n_layers: int, sum_len: float, sum_len_sq: float) -> float:
    """FLOPs of one training step, the one formula of ``ThroughputLogger`` and ``scripts/bench_model.py``:

        3 * n_layers * sum over cells c of [ l_c * (8 d^2 + 4 d d_ff) + 4 l_c^2 d ]

    l_c: useful tokens of cell c (<cls> included, no pad); backward = 2 x forward; 8 d^2: QKV + output
    projections, 4 d d_ff: the FFN, 4 l_c^2 d: scores and weighted sum over all heads. Embeddings, decoders and
    the optimizer are not counted. ``sum_len`` / ``sum_len_sq``: sums of l_c and l_c^2 over the cells."""
    per_layer = sum_len * (8 * d_model * d_model + 4 * d_model * d_ff) + 4 * sum_len_sq * d_model
    return 3.0 * n_layers * per_layer


def cell_lengths(batch: Batch) -> torch.Tensor:
    """Useful tokens per cell (n_cells,), from ``cu_seqlens`` when packed, else the non-pad count per row."""
    if batch.cu_seqlens is not None:
        return (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).double()
    return (~batch.pad_mask).sum(1).double()


class ThroughputLogger(pl.Callback):
    """Logs cells/s, non-pad tokens/s, padding fraction and (on GPU) MFU, averaged over a window."""

    def __init__(self, window: int = 10):
        self.window = window
        self._t0: float | None = None
        self._cells = self._tokens = self._slots = 0
        self._len_sums = 0.0  # becomes a (2,) tensor on the batch's device: sums of l_c and l_c^2
        self._steps = 0

    @staticmethod
    def _shape(pl_module: pl.LightningModule) -> tuple[int, int, int]:
        cfg = pl_module.model.config() if hasattr(pl_module.model, "config") else {}
        return int(cfg.get("d_model", 0)), int(cfg.get("d_ff", 0)), int(cfg.get("n_layers", 0))

    def on_train_batch_start(self, trainer, pl_module, batch: Batch, batch_idx):
        if self._t0 is None:
            self._sync(pl_module)
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Batch, batch_idx):
        n_slots = batch.pad_mask.numel()
        self._cells += batch.n_cells
        self._slots += n_slots
        lengths = cell_lengths(batch)  # stays on the device: no host sync per step
        self._len_sums = self._len_sums + torch.stack([lengths.sum(), (lengths * lengths).sum()])
        self._steps += 1
        if self._steps < self.window:
            return
        self._sync(pl_module)
        sum_len, sum_len_sq = self._len_sums.tolist()
        self._tokens = sum_len
        flops = train_flops(*self._shape(pl_module), sum_len=sum_len, sum_len_sq=sum_len_sq)
        dt = max(time.perf_counter() - self._t0, 1e-9)
        world = trainer.world_size
        metrics = {
            "perf/cells_per_s": self._cells * world / dt,
            "perf/tokens_per_s": self._tokens * world / dt,
            "perf/pad_fraction": 1.0 - self._tokens / max(self._slots, 1),
        }
        peak = peak_flops(pl_module.device)
        if peak:
            metrics["perf/mfu"] = flops / dt / peak
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        pl_module.log(
            "cells/s",
            metrics["perf/cells_per_s"],
            prog_bar=True,
            on_step=True,
            on_epoch=False,
            logger=False,
            rank_zero_only=True,
        )
        self._t0 = time.perf_counter()
        self._cells = self._tokens = self._slots = self._steps = 0
        self._len_sums = 0.0

    @staticmethod
    def _sync(pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


class RunSummary(pl.Callback):
    """Collects what a user wants to see at the end: steps, cells, speed, losses first -> last, paths.

    ``summary`` is filled during the run; ``write(path)`` saves it as JSON. ``finished`` is true when the run
    reached its end; a run stopped early (preemption) is written with ``finished: false`` and ``stop_reason``.
    """

    def __init__(self):
        self.train_losses: list[tuple[int, float]] = []
        self.val_losses: list[tuple[int, float]] = []
        self.cells_seen = 0
        self.task_metrics: dict[str, float] = {}  # a fine-tuning task's test/... and baseline/<name>/... metrics
        self.per_gene: dict[str, float] = {}  # last validation: the per-gene baselines and the model / baseline ratios
        self._fit_start: float | None = None
        self.fit_seconds = 0.0

    def state_dict(self) -> dict:
        return {
            "train_losses": self.train_losses,
            "val_losses": self.val_losses,
            "cells_seen": self.cells_seen,
            "per_gene": self.per_gene,
        }

    def load_state_dict(self, state: dict) -> None:
        self.train_losses = [tuple(x) for x in state.get("train_losses", [])]
        self.val_losses = [tuple(x) for x in state.get("val_losses", [])]
        self.cells_seen = int(state.get("cells_seen", 0))
        self.per_gene = dict(state.get("per_gene", {}))

    def on_fit_start(self, trainer, pl_module):
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer, pl_module):
        if self._fit_start is not None:
            self.fit_seconds = time.perf_counter() - self._fit_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Batch, batch_idx):
        self.cells_seen += batch.n_cells * trainer.world_size
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.train_losses.append((trainer.global_step, float(loss.detach())))

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        val = trainer.callback_metrics.get("val/loss")
        if val is not None:
            self.val_losses.append((trainer.global_step, float(val)))
        metrics = trainer.callback_metrics
        baselines = {
            k: float(v) for k, v in metrics.items() if k.startswith("val/") and k.endswith("/per_gene_baseline")
        }
        if baselines:
            self.per_gene = {**baselines, **per_gene_ratios(metrics)}

    def summary(
        self, trainer: pl.Trainer, output_dir: str | Path | None = None, stop_reason: str | None = None
    ) -> dict:
        ckpt = trainer.checkpoint_callback
        first_last = lambda xs: (xs[0][1], xs[-1][1]) if xs else (None, None)  # noqa: E731
        # smooth the noisy per-step train loss: mean of the first / last 10 steps
        tl = [x[1] for x in self.train_losses]
        k = min(10, max(1, len(tl) // 4)) if tl else 0
        return {
            "finished": stop_reason is None,
            "stop_reason": stop_reason,
            "steps": trainer.global_step,
            "cells_seen": self.cells_seen,
            "fit_seconds": round(self.fit_seconds, 2),
            "cells_per_s": round(self.cells_seen / self.fit_seconds, 1) if self.fit_seconds else None,
            "train_loss_first": sum(tl[:k]) / k if k else None,
            "train_loss_last": sum(tl[-k:]) / k if k else None,
            "val_loss_first": first_last(self.val_losses)[0],
            "val_loss_last": first_last(self.val_losses)[1],
            "val_losses": self.val_losses,
            "best_checkpoint": getattr(ckpt, "best_model_path", None) or None,
            "last_checkpoint": getattr(ckpt, "last_model_path", None) or None,
            "log_dir": str(output_dir or trainer.default_root_dir),  # no trainer.log_dir: it broadcasts
            "train_losses": self.train_losses,
            "task_metrics": self.task_metrics,
            # the pretraining-quality figure: validation loss / each gene's training mean's (1.0 = gene identity only)
            "val_per_gene": self.per_gene,
        }

    @rank_zero_only
    def write(self, trainer: pl.Trainer, path: str | Path, stop_reason: str | None = None) -> dict:
        path = Path(path)
        data = self.summary(trainer, path.parent, stop_reason=stop_reason)
        data.update(parameter_counts(trainer.lightning_module))  # trainable_params, total_params
        write_json_atomic(path, data)
        return data


class SaveFinalStep(pl.Callback):
    """At the end of training write ``<dirpath>/last.ckpt`` with the final step.

    Lightning's ``ModelCheckpoint`` saves only at its own intervals (validation, ``every_n_train_steps``),
    so a ``max_steps`` that is not a multiple of them left ``last.ckpt`` at an earlier step than the run
    reached. Not called when the run stops on an exception (preemption saves its own checkpoint).
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.path = Path(dirpath) / filename

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step == 0:
            return
        # every rank takes part in save_checkpoint (sharded strategies gather); rank 0 decides
        up_to_date = trainer.strategy.broadcast(
            self._holds_step(trainer.global_step) if trainer.is_global_zero else None
        )
        if not up_to_date:
            trainer.save_checkpoint(self.path)
        for callback in trainer.checkpoint_callbacks:  # so the run summary names the final file
            if getattr(callback, "save_last", None) and Path(callback.dirpath or "") == self.path.parent:
                callback.last_model_path = str(self.path)

    def _holds_step(self, step: int) -> bool:
        if not self.path.is_file():
            return False
        try:
            return int(torch.load(self.path, map_location="cpu", weights_only=False, mmap=True)["global_step"]) == step
        except Exception:
            return False


# the task's metrics beside the baselines' ----------------------------------------------------------------------
TASK_METRIC_ORDER = (
    "accuracy",
    "macro_f1",
    "precision",
    "recall",
    "avg_bio",
    "avg_batch",
    "overall",
    "nmi",
    "ari",
    "asw_label",
    "asw_batch",
    "graph_connectivity",
)


def task_metrics_columns(metrics: dict[str, float]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(metric names in display order, {method: {metric: value}}) from ``test/<m>`` (method "scGPT") and
    ``baseline/<name>/<m>`` keys; other keys are ignored."""
    methods: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if parts[0] == "test" and len(parts) == 2:
            methods.setdefault("scGPT", {})[parts[1]] = float(value)
        elif parts[0] == "baseline" and len(parts) == 3:
            methods.setdefault(parts[1], {})[parts[2]] = float(value)
    names = {m for values in methods.values() for m in values}
    ordered = [m for m in TASK_METRIC_ORDER if m in names] + sorted(names - set(TASK_METRIC_ORDER))
    return ordered, methods


def task_metrics_table(metrics: dict[str, float], title: str = "task metrics (evaluation cells)"):
    """A rich Table: one row per metric, the fine-tuned model's column first, then each baseline's; None when
    ``metrics`` holds no task metric."""
    from rich.table import Table

    names, methods = task_metrics_columns(metrics)
    if not names:
        return None
    table = Table(title=title)
    table.add_column("metric")
    order = ["scGPT"] + sorted(m for m in methods if m != "scGPT")
    for method in order:
        if method in methods:
            table.add_column("scGPT fine-tuned" if method == "scGPT" else method, justify="right")
    for name in names:
        table.add_row(name, *(f"{methods[m][name]:.4f}" if name in methods[m] else "-" for m in order if m in methods))
    return table
