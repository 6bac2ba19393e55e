"""The official fine-tuning learning-rate schedule, sized by the trainer (``total_steps`` is passed in)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def per_epoch_decay(optimizer: Optimizer, total_steps: int, epochs: int, gamma: float = 0.9) -> LambdaLR:
    """StepLR(gamma) once per epoch, as the official tutorials do: lr x gamma ** epoch, with the epoch
    length taken as ``total_steps // epochs``."""
    steps_per_epoch = max(1, int(total_steps) // max(1, int(epochs)))
    return LambdaLR(optimizer, lambda step: gamma ** (step // steps_per_epoch))
