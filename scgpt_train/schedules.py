"""Learning-rate schedules as LambdaLR factories (built by Hydra with ``_partial_: true``)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_lr_ratio))


def per_epoch_decay_factor(
    step: int, steps_per_epoch: int, gamma: float, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> float:
    """Linear warm-up over ``warmup_steps``, then ``gamma ** epoch``, never below ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(min_lr_ratio, gamma ** (step // max(1, steps_per_epoch)))


def per_epoch_decay(
    optimizer: Optimizer,
    total_steps: int,
    epochs: int,
    gamma: float = 0.9,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """The official fine-tuning schedule: StepLR(gamma) once per epoch (epoch = ``total_steps // epochs``)."""
    steps_per_epoch = max(1, int(total_steps) // max(1, int(epochs)))
    return LambdaLR(
        optimizer, lambda step: per_epoch_decay_factor(step, steps_per_epoch, gamma, warmup_steps, min_lr_ratio)
    )
