"""A test-only callback that holds a training run at a known step, so that a test can kill or preempt it there.

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
