"""Sharded checkpoints (DeepSpeed ZeRO directories, torch.distributed.checkpoint / FSDP directories)
-> one consolidated file that ``load_checkpoint`` and ``ckpt_path=`` read."""

from __future__ import annotations

import os
from pathlib import Path

from data_modules.atomic import atomic_path


def checkpoint_kind(path: str | os.PathLike) -> str:
    path = Path(path)
    if path.is_file():
        return "file"
    if (path / ".metadata").exists():
        return "dcp"
    if (path / "latest").exists() or list(path.glob("*/*model_states.pt")):
        return "deepspeed"
    raise ValueError(
        f"{path} is neither a checkpoint file, a DeepSpeed checkpoint dir (with 'latest' and "
        f"*/mp_rank_*_model_states.pt) nor a torch.distributed.checkpoint dir (with .metadata)"
    )


def consolidate_checkpoint(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``out``: a single fp32 torch file with the full state dict (plus the training state that the
    sharded checkpoint carried: step counters, hyperparameters, vocab). Written atomically."""
    src, out = Path(src), Path(out)
    kind = checkpoint_kind(src)
    if kind == "file":
        raise ValueError(f"{src} is already a single-file checkpoint")
    with atomic_path(out) as tmp:
        if kind == "deepspeed":
            from pytorch_lightning.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

            convert_zero_checkpoint_to_fp32_state_dict(str(src), str(tmp))
        else:
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            dcp_to_torch_save(str(src), str(tmp))
    return out
