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
    out = model(**batch.model_inputs())
    res = {"cell_emb": out["cell_emb"].float(), "cell_index": batch.cell_index}
    if "cls_output" in out:
        probs = out["cls_output"].float().softmax(-1)
        res["probs"], res["pred"] = probs, probs.argmax(-1)
    return res


@torch.no_grad()
def predict_cells(
    model: nn.Module,
    loader,
    n_cells: int,
    device: torch.device | str | None = None,
    progress: bool = True,
    description: str = "embedding",
) -> dict[str, np.ndarray]:
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


def embed_h5ad(
    checkpoint,
    input_path,
    output_path,
    key: str = "X_scgpt",
    batch_size: int = 64,
    max_seq_len: int = 1201,
    include_zero_genes: bool = False,
    gene_column: str | None = None,
    use_raw: bool = False,
    batch_key: str | None = None,
    cls_value: float | None = None,
    normalize: bool = True,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Embed every cell of ``input_path`` with ``checkpoint``; write the input AnnData + ``obsm[key]``."""
    import logging

    import anndata as ad

    from data_modules.anndata_module import AnnDataModule
    from scgpt_train.checkpoints import load_checkpoint
    from scgpt_train.tasks.report import write_h5ad

    model, _ = load_checkpoint(checkpoint)
    cfg = model.config()
    if (cfg.get("dsbn") or cfg.get("use_batch_labels")) and batch_key is None:
        raise ValueError(f"{checkpoint} uses batch labels (DSBN / batch embedding): pass --batch-key")
    pad_value = float(cfg.get("pad_value", -2.0))
    tokenizer = {
        "max_seq_len": max_seq_len,
        "n_bins": int(cfg.get("n_bins", 51)),
        "pad_value": pad_value,
        "mask_value": float(cfg.get("mask_value", -1.0)),
        "cls_value": pad_value if cls_value is None else float(cls_value),
        "value_style": "category" if cfg.get("input_emb_style") == "category" else "continuous",
    }
    dm = AnnDataModule(
        str(input_path),
        vocab=str(checkpoint),
        batch_key=batch_key,
        tokenizer=tokenizer,
        preprocess={"gene_column": gene_column, "use_raw": use_raw},
        include_zero_genes=include_zero_genes,
        val_fraction=0.0,
        batch_size=batch_size,
        seed=seed,
        model_outputs=(),
    )
    dm.setup()
    logging.getLogger(__name__).info("genes: %s", dm.gene_report.summary())
    if progress:
        print(f"genes: {dm.gene_report.summary()}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    out = predict_cells(
        model, dm.loader("all", masked=False, batch_size=batch_size), len(dm.split), device=device, progress=progress
    )
    emb = out["cell_emb"]
    if normalize:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    adata = ad.read_h5ad(input_path)
    adata.obsm[key] = emb.astype(np.float32)
    if "pred" in out:
        adata.obs["scgpt_pred"] = out["pred"]
        adata.obs["scgpt_pred_prob"] = out["probs"].max(1)
    adata.uns[f"{key}_gene_report"] = {k: v for k, v in dm.gene_report.as_dict().items() if v is not None}
    return write_h5ad(adata, output_path)
