"""What ``trainer=auto`` (configs/trainer/auto.yaml) picks on this machine: one GPU when torch sees one, else the CPU.

The preset's ``accelerator`` and ``precision`` are small ``_target_`` nodes that Hydra calls when it instantiates the
trainer, so the choice is made where the run happens (a config composed on a login node and run on a GPU node
still gets the GPU), and composing or resolving the config needs nothing registered first.
"""

from __future__ import annotations

import torch


def auto_accelerator() -> str:
    """``"gpu"`` when ``torch.cuda.is_available()``, else ``"cpu"``."""
    return "gpu" if torch.cuda.is_available() else "cpu"


def auto_precision() -> str:
    """``"bf16-mixed"`` on a GPU that supports bf16 (as trainer=gpu), ``"16-mixed"`` on an older GPU, else
    ``"32-true"`` (mixed precision on a CPU is slower, not faster)."""
    if not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
