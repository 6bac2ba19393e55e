"""The official fine-tuning learning-rate schedule, sized by the trainer (``total_steps`` is passed in)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def per_epoch_decay_factor(step: int, steps_per_epoch: int, gamma: float, warmup_steps: int = 0,
                           min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up over ``warmup_steps``, then ``gamma ** epoch``, never below ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(min_lr_ratio, gamma ** (step // max(1, steps_per_epoch)))


def per_epoch_decay(optimizer: Optimizer, total_steps: int, epochs: int, gamma: float = 0.9, warmup_steps: int = 0,
                    min_lr_ratio: float = 0.0) -> LambdaLR:
    """StepLR(gamma) once per epoch, as the official tutorials do (epoch length = ``total_steps // epochs``)."""
    steps_per_epoch = max(1, int(total_steps) // max(1, int(epochs)))
    return LambdaLR(optimizer, lambda step: per_epoch_decay_factor(step, steps_per_epoch, gamma, warmup_steps,
                                                                   min_lr_ratio))
