"""Batched inference: cell embeddings and class predictions for every cell a loader yields."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_modules.batch import Batch


def _forward(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    if hasattr(model, "predict_step"):  # the Lightning module
        return model.predict_step(batch)
    out = model(batch.gene_ids, batch.values, batch.pad_mask, batch_labels=batch.batch_labels)
    res = {"cell_emb": out["cell_emb"].float(), "cell_index": batch.cell_index}
    if "cls_output" in out:
        probs = out["cls_output"].float().softmax(-1)
        res["probs"], res["pred"] = probs, probs.argmax(-1)
    return res


@torch.no_grad()
def predict_cells(model: nn.Module, loader, n_cells: int, device: torch.device | str | None = None,
                  progress: bool = True, description: str = "embedding") -> dict[str, np.ndarray]:
    """Run ``model`` (a ScGPT or the Lightning module) in eval mode over ``loader``; rows ordered by
    ``batch.cell_index`` into arrays of ``n_cells``: ``cell_emb`` (N, d), and ``probs`` / ``pred`` with a
    classifier. Cells the loader never yields stay NaN / -1."""
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    result: dict[str, np.ndarray] = {}
    try:
        for batch in tqdm(loader, desc=description, disable=not progress, unit="batch"):
            out = _forward(model, batch.to(device))
            rows = out.pop("cell_index").cpu().numpy()
            for key, value in out.items():
                v = value.float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
                if key not in result:
                    fill = np.nan if v.dtype.kind == "f" else -1
                    result[key] = np.full((n_cells, *v.shape[1:]), fill, dtype=v.dtype)
                result[key][rows] = v
    finally:
        model.train(was_training)
    return result


def load_best_weights(module, trainer) -> str | None:
    """Copy the best checkpoint's weights (by the monitored validation metric) into ``module``; returns its path."""
    cb = getattr(trainer, "checkpoint_callback", None)
    path = getattr(cb, "best_model_path", "") if cb is not None else ""
    if not path or not os.path.exists(path):
        return None
    state = torch.load(path, map_location=module.device, weights_only=False)["state_dict"]
    module.load_state_dict(state, strict=False)
    return str(Path(path))
