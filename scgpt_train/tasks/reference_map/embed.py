"""Embeddings of an h5ad in memory, through ``scripts/embed.py``'s code path.

Embeddings go through the embedding code path of ``scripts/embed.py`` (:mod:`scgpt_train.inference`):
the same input checks (:func:`check_input_layout`, :func:`unmapped_cells`), the same
:class:`~data_modules.anndata_module.AnnDataModule` (values as stored, the checkpoint's token layout), the same
batched pass (:func:`embed_cells`: seeded tokens per group of 64 cells, sorted, packed, token budget, precision),
then L2 normalization. A query embedded here equals ``embed.py --seed S --precision P`` on the same file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from data_modules.vocab import GeneVocab
from scgpt_train.inference import (
    BatchOptions,
    anndata_cells,
    check_input_layout,
    embed_cells,
    l2_normalize,
    load_for_inference,
    read_h5ad_checked,
    unmapped_cells,
)
from scgpt_train.precision import resolve_precision
from scgpt_train.tasks.reference_map.common import ZERO_SHOT_ONLY, ReferenceMapError, ReferenceMapParams

log = logging.getLogger(__name__)


# embeddings of an h5ad, in memory (the embed.py path without the file write)


@dataclass
class EmbeddedCells:
    """Cell embeddings of one h5ad and the values the model read."""

    path: str
    emb: np.ndarray  # (N, d) float32, L2-normalized; NaN rows for cells the model cannot read
    unmapped: np.ndarray  # (N,) bool: no expressed gene of the vocabulary
    expression: sp.csr_matrix  # (N, G) values as stored, over the model genes (vocab ids ``gene_ids``)
    gene_ids: np.ndarray  # (G,) int64 vocab id of each expression column
    value_type: dict  # data_modules.value_types report of the file's values
    gene_report: dict = field(default_factory=dict)


def load_model(checkpoint) -> tuple[torch.nn.Module, GeneVocab]:
    """:func:`~scgpt_train.inference.load_for_inference` for zero-shot mapping: refuses models that need batch
    labels (DSBN / batch embedding: not a zero-shot model)."""
    return load_for_inference(checkpoint, ReferenceMapError, ZERO_SHOT_ONLY)


def embed_adata(
    model,
    vocab: GeneVocab,
    checkpoint,
    path,
    adata=None,
    params: ReferenceMapParams | None = None,
    *,
    description: str = "embedding",
    **overrides,
) -> EmbeddedCells:
    """Embed every cell of the h5ad ``path`` as ``embed_h5ad`` does (same checks, data module, seeds, batched pass
    and normalization), returning the embeddings in memory instead of writing a file.

    Parameters
    ----------
    model, vocab, checkpoint
        The loaded model (:func:`load_model`), its vocabulary, and the checkpoint path (the data module's vocab).
    path : path-like
        The h5ad; ``adata`` its contents when already read (:func:`read_h5ad_checked`).
    params : ReferenceMapParams, optional
        batch_size (most cells per batch beside the token budget; None: no cap), max_seq_len, gene_column,
        gene_table, use_raw, prefer_gene_column, cls_value, seed, device, precision, progress (``overrides``
        replace single fields).
    """
    from data_modules.anndata_module import AnnDataModule

    p = ReferenceMapParams.of(params, **overrides)
    if adata is None:
        adata = read_h5ad_checked(path, "--query", ReferenceMapError, p.use_raw)
    check_input_layout(adata, path, p.gene_column, p.use_raw, None)
    unmapped = unmapped_cells(
        adata, path, vocab, p.gene_column, p.use_raw, gene_table=p.gene_table, prefer_gene_column=p.prefer_gene_column
    )
    layout = model.layout if p.max_seq_len is None else model.layout.replace(max_seq_len=p.max_seq_len)
    preprocess = {"gene_column": p.gene_column, "use_raw": p.use_raw, "gene_table": p.gene_table}
    dm = AnnDataModule(
        str(path),
        vocab=str(checkpoint),
        layout=layout,
        tokenizer={"cls_value": p.cls_value},
        preprocess=preprocess | {"prefer_gene_column": p.prefer_gene_column},
        val_fraction=0.0,
        seed=p.seed,
        model_outputs=(),
    )
    dm.setup()
    n_cells = len(dm.split)
    if n_cells != adata.n_obs:
        raise RuntimeError(f"{path}: the data module holds {n_cells} cells, the file {adata.n_obs}")
    if p.progress:
        print(f"{Path(path).name}: genes: {dm.gene_report.summary()}")
    mapped = np.flatnonzero(~unmapped)
    if len(mapped) < n_cells:
        msg = (
            f"{n_cells - len(mapped)} of {n_cells} cells of {path} express no gene of the checkpoint's vocabulary "
            f"(e.g. {[str(c) for c in adata.obs_names[unmapped][:5]]}); they get no embedding"
        )
        log.warning(msg)
        if p.progress:
            print(f"warning: {msg}")
    device = p.device or ("cuda" if torch.cuda.is_available() else "cpu")
    chosen = resolve_precision(p.precision, device)
    log.info("%s: precision: %s", path, chosen.reason)
    if p.progress:
        print(f"{Path(path).name}: precision: {chosen.reason}")
    model.to(device)
    out = embed_cells(
        model,
        anndata_cells(dm, p.seed),
        options=BatchOptions(max_cells=p.batch_size),
        precision=chosen,
        device=device,
        wanted=~unmapped,
        progress=p.progress,
        description=description,
    )
    emb = l2_normalize(out["cell_emb"])
    return EmbeddedCells(
        path=str(path),
        emb=emb,
        unmapped=unmapped,
        expression=dm.expression("all"),
        gene_ids=np.asarray(dm.gene_ids, dtype=np.int64),
        value_type=dict(dm.value_reports[0]) if dm.value_reports else {},
        gene_report={k: v for k, v in dm.gene_report.as_dict().items() if v is not None},
    )


def obs_labels(obs: pd.DataFrame, label_key: str, path, option: str) -> np.ndarray:
    """(N,) object array of labels as str, None where missing; raises naming the file and its columns."""
    if label_key not in obs.columns:
        cols = [str(c) for c in obs.columns]
        raise ReferenceMapError(
            f"{option} {path}: --label-key {label_key!r} is not an obs column (columns: {cols[:20]}"
            f"{' ...' if len(cols) > 20 else ''}); name the column holding the cell types"
        )
    s = obs[label_key]
    out = s.astype(str).to_numpy(dtype=object)
    out[s.isna().to_numpy()] = None
    return out
