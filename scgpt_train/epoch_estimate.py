"""Before training on a machine without a GPU: the expected time of one epoch, measured, and the shorter layouts
that would make it practical (``EpochTimeEstimate``, in the default callbacks; issue #27 item 3)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytorch_lightning as pl
import torch

from scgpt_train.callbacks import train_flops

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


class EpochTimeEstimate(pl.Callback):
    """On a machine without a GPU, before training starts: the expected time of one epoch, measured, and the
    ``layout.max_seq_len`` overrides that would make it practical.

    Measured, not guessed: one forward + backward (the run's own objectives, eval mode so no dropout draw or
    batch-norm statistic changes, gradients cleared after) of the first ``sample_cells`` training cells, tokenized
    as in training; the epoch (training cells + validation forward passes at a third of the cost) is that time
    scaled by FLOPs (``train_flops``) over every cell at its real length padded to the longest of a random batch of
    ``batch_size`` (``val_batch_size``), and so are the shorter layouts. Needs a data module with ``sample_batch``
    / ``cell_lengths`` (the AnnData fine-tuning one); silent elsewhere and on GPUs.
    """

    SHORTER_LAYOUTS = (1201, 601)

    def __init__(self, sample_cells: int = 2, suggest_above_minutes: float = 15.0):
        self.sample_cells = int(sample_cells)
        self.suggest_above_minutes = float(suggest_above_minutes)
        self.estimate: dict | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if torch.cuda.is_available() or pl_module.device.type != "cpu" or not hasattr(dm, "sample_batch"):
            return
        if not trainer.is_global_zero or trainer.max_epochs == 0:
            return
        try:
            self.estimate = estimate_epoch(pl_module, dm, self.sample_cells)
        except Exception as e:  # an estimate never stops a run (e.g. every parameter frozen: nothing to backward)
            log.warning("no epoch time estimate: %s", e)
            return
        print(estimate_line(self.estimate, self.suggest_above_minutes), flush=True)


def _step_flops(pl_module: pl.LightningModule, lengths) -> float:
    cfg = pl_module.model.config() if hasattr(pl_module.model, "config") else {}
    lengths = np.asarray(lengths, dtype=np.float64)
    return train_flops(
        int(cfg.get("d_model", 0)),
        int(cfg.get("d_ff", 0)),
        int(cfg.get("n_layers", 0)),
        float(lengths.sum()),
        float((lengths * lengths).sum()),
    )


def estimate_epoch(pl_module: pl.LightningModule, dm, sample_cells: int) -> dict:
    """{"seconds", "measured_s", "sample_cells", "train_cells", "val_cells", "max_seq_len", "shorter": {L: s}}."""
    batch = dm.sample_batch("train", sample_cells)
    was_training = pl_module.training
    pl_module.eval()
    try:
        t = time.perf_counter()
        with torch.enable_grad():
            loss = pl_module.compute_losses(batch, pl_module.global_step)["loss"]
            loss.backward()
        measured = time.perf_counter() - t
    finally:
        for p in pl_module.parameters():
            p.grad = None
        pl_module.train(was_training)
    sample = _step_flops(pl_module, np.full(batch.n_cells, batch.pad_mask.shape[1]))  # padded, as it ran
    max_len = int(dm.layout.max_seq_len)
    train = dm.cell_lengths("train")
    val = dm.cell_lengths("val") if len(dm.indices("val")) else np.zeros(0, dtype=np.int64)

    def padded(lengths: np.ndarray, batch_size: int, cap: int) -> np.ndarray:
        """Every cell's length once padded to the longest of its batch (batches drawn at random, seeded)."""
        lengths = np.random.default_rng(0).permutation(np.minimum(lengths, cap))
        starts = np.arange(0, len(lengths), batch_size)
        if not len(starts):
            return lengths
        return np.repeat(np.maximum.reduceat(lengths, starts), np.diff(np.append(starts, len(lengths))))

    def seconds(cap: int) -> float:  # validation: a forward only, a third of a training step's FLOPs
        cost = _step_flops(pl_module, padded(train, dm.batch_size, cap))
        cost += _step_flops(pl_module, padded(val, dm.val_batch_size, cap)) / 3
        return measured * cost / max(sample, 1.0)

    return {
        "seconds": seconds(max_len),
        "measured_s": measured,
        "sample_cells": batch.n_cells,
        "train_cells": len(train),
        "val_cells": len(val),
        "max_seq_len": max_len,
        "shorter": {cap: seconds(cap) for cap in EpochTimeEstimate.SHORTER_LAYOUTS if cap < max_len},
    }


def estimate_line(est: dict, suggest_above_minutes: float = 15.0) -> str:
    line = (
        f"epoch time estimate on this CPU: ~{format_duration(est['seconds'])} per epoch "
        f"({est['train_cells']:,} training + {est['val_cells']:,} validation cells at "
        f"layout.max_seq_len={est['max_seq_len']}; measured: {est['sample_cells']} training cells forward + backward "
        f"in {est['measured_s']:.2f} s, scaled by the compute of every cell's padded length)"
    )
    if est["seconds"] > 60 * suggest_above_minutes and est["shorter"]:
        options = ", ".join(f"layout.max_seq_len={cap} ~{format_duration(s)}" for cap, s in est["shorter"].items())
        line += (
            f". To make it practical here: {options} per epoch (cells with more genes keep a random subset per "
            "visit), or run on a GPU"
        )
    return line
