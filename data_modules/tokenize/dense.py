"""Dense tokenization for fine-tuning: every gene of the model's gene set, zeros kept as bin 0.

The sparse path (``tokenizer.Tokenizer``) keeps a cell's expressed genes only; the official fine-tuning
recipes with ``include_zero_gene`` feed every gene. Both share the binning (``binning.bin_values``,
``binning.cell_of_entry``) and the category ids (``tokenizer.category_values``).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from data_modules.batch import Batch
from data_modules.tokenize.binning import bin_values, cell_of_entry
from data_modules.tokenize.tokenizer import TokenizerConfig, masked_inputs


def tokenize_with_zeros(
    x: sp.csr_matrix, gene_ids: np.ndarray, cfg: TokenizerConfig, pad_id: int, cls_id: int, rng: np.random.Generator
) -> Batch:
    """Every gene of every cell (zeros as bin 0), a random ``layout.max_genes`` of them if there are more."""
    layout = cfg.layout
    n_cells, n_genes = x.shape
    bins = np.zeros((n_cells, n_genes), dtype=np.float32)  # (B, G)
    nz = bin_values(x.indptr.astype(np.int64), x.data, layout.n_bins, rng)
    bins[cell_of_entry(x.indptr), x.indices] = nz
    k = min(n_genes, layout.max_genes)
    if k < n_genes:  # uniform subset per cell, kept in gene order
        cols = np.sort(np.argsort(rng.random((n_cells, n_genes)), axis=1)[:, :k], axis=1)  # (B, k)
    else:
        cols = np.broadcast_to(np.arange(n_genes), (n_cells, n_genes))
    L = k + 1
    token_ids = np.empty((n_cells, L), dtype=np.int64)
    token_ids[:, 0] = cls_id
    token_ids[:, 1:] = gene_ids[cols]
    target = np.empty((n_cells, L), dtype=np.float32)
    target[:, 0] = cfg.cls_value
    target[:, 1:] = np.take_along_axis(bins, cols, axis=1)
    pad_mask = np.zeros((n_cells, L), dtype=bool)
    mlm_mask = None
    if cfg.mlm_prob is not None:
        mlm_mask = rng.random((n_cells, L), dtype=np.float32) < cfg.mlm_prob
        mlm_mask[:, 0] = False
    return Batch.from_numpy(
        token_ids, masked_inputs(target, pad_mask, mlm_mask, layout), pad_mask, target, None, mlm_mask
    )
