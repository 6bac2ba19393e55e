"""Test-only ways to hold a training run at a known point, so that a test can kill or preempt it there: a callback
that waits at a step (``StallAtStep``), a checkpoint writer that hangs inside one checkpoint's write
(``StallInCheckpointWrite``, below).

Added to a ``train.py`` run with (``tests`` on ``PYTHONPATH``)::

    +callbacks.stall._target_=helpers.stall.StallAtStep +callbacks.stall.step=11
    +callbacks.stall.marker=<path>

When ``global_step`` reaches ``step`` (before that step's batch is trained) it writes ``marker`` and waits until
the process receives SIGTERM (Lightning then stops after the current step) or ``timeout`` seconds pass. The run
is therefore interrupted at the same step on a slow or a fast machine, instead of wherever a timer catches it.
It draws no random numbers and touches no state, so the steps before it are those of a run without it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from data_modules.atomic import atomic_path
from scgpt_train.fault_tolerance import AtomicCheckpointIO


class StallAtStep(pl.Callback):
    def __init__(self, step: int, marker: str, timeout: float = 300.0):
        self.step, self.marker, self.timeout = int(step), Path(marker), float(timeout)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step or self.marker.exists():
            return
        self.marker.write_text(str(self.step))
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


class StallInCheckpointWrite(AtomicCheckpointIO):
    """A test-only checkpoint writer that hangs while it writes the checkpoint named ``name``, as a process killed in
    the middle of that write: the data is in the hidden temp file, not yet renamed to ``name``. It writes ``marker``
    and waits ``timeout`` seconds (a test kills it first). Added with (``tests`` on ``PYTHONPATH``)::

        '+trainer.plugins=[{_target_: helpers.stall.StallInCheckpointWrite, name: step0000030.ckpt, marker: <path>}]'
    """

    def __init__(self, name: str, marker: str, timeout: float = 300.0):
        super().__init__()
        self.name, self.marker, self.timeout = name, Path(marker), float(timeout)

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if Path(path).name != self.name:
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
            self.marker.write_text(str(tmp))
            time.sleep(self.timeout)
        raise RuntimeError(f"{self.marker} was not killed within {self.timeout} s")
