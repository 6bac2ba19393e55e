"""Cells of several modalities -> one token sequence each -> a padded ``Batch`` with ``modality_ids``.

A cell's row: ``<cls>`` (value ``cls_value``, modality ``<cls>``), then its features in column order, the
modalities one after the other (RNA first, as the official tutorial concatenates them), then ``<pad>`` (value
``pad_value``, modality ``<pad>``). Which features become tokens (``token_rule``):

- ``nonzero``: the cell's non-zero features (the official ``include_zero_gene=False``);
- ``all``: every feature of every modality the cell has, zeros as bin 0;
- ``paper`` (default): ``nonzero`` when the data has a protein modality, else ``all`` (the paper's rule).

A modality a cell lacks (mosaic data) gives it no token at all, never imputed zeros. A row longer than
``layout.max_genes`` keeps a uniformly random subset (in column order). MLM masking (``mask_ratio``) hides
``int(ratio * n)`` of a cell's n feature tokens (``<cls>`` is never masked; the official masker can hit it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from data_modules.batch import Batch
from data_modules.tokenize.layout import TokenLayout
from data_modules.tokenize.tokenizer import masked_inputs

TOKEN_RULES = ("paper", "nonzero", "all")


def resolve_token_rule(rule: str, kinds) -> str:
    if rule not in TOKEN_RULES:
        raise ValueError(f"token_rule must be one of {TOKEN_RULES}, got {rule!r}")
    if rule == "paper":
        return "nonzero" if "protein" in set(kinds) else "all"
    return rule


@dataclass
class TokenTable:
    """Every cell's bins over all kept features of all modalities, and what each column is."""

    bins: sp.csr_matrix  # (cells, F) float32 bins, modalities concatenated
    token_ids: np.ndarray  # (F,) int64 vocabulary id of each column
    mod_ids: np.ndarray  # (F,) int64 modality id of each column
    column_modality: np.ndarray  # (F,) int64 index of the column's modality in ``present``
    present: np.ndarray  # (cells, M) bool: which modality each cell has
    pad_id: int
    cls_id: int
    mod_pad_id: int
    mod_cls_id: int

    def cell_columns(self, i: int, rule: str) -> np.ndarray:
        """Columns that become cell ``i``'s tokens under ``rule`` (nonzero | all), in column order."""
        if rule == "nonzero":
            row = self.bins[i]
            cols = row.indices[row.data > 0]
        else:
            cols = np.arange(self.bins.shape[1])
        return np.sort(cols[self.present[i, self.column_modality[cols]]])


def tokenize_cells(
    table: TokenTable,
    cells: np.ndarray,
    rule: str,
    layout: TokenLayout,
    rng: np.random.Generator,
    cls_value: float = 0.0,
    mask_ratio: float | None = None,
) -> Batch:
    """A padded ``Batch`` of ``cells`` (rows of ``table``), ``modality_ids`` set; ``mlm_mask`` when masking."""
    rows = []
    for i in cells:
        cols = table.cell_columns(int(i), rule)
        if len(cols) > layout.max_genes:
            cols = np.sort(rng.choice(cols, layout.max_genes, replace=False))
        rows.append(cols)
    B, L = len(rows), 1 + max((len(c) for c in rows), default=0)
    gene_ids = np.full((B, L), table.pad_id, dtype=np.int64)
    mod_ids = np.full((B, L), table.mod_pad_id, dtype=np.int64)
    target = np.full((B, L), layout.pad_value, dtype=np.float32)
    pad_mask = np.ones((B, L), dtype=bool)
    mlm = np.zeros((B, L), dtype=bool) if mask_ratio is not None else None
    gene_ids[:, 0], mod_ids[:, 0], target[:, 0], pad_mask[:, 0] = table.cls_id, table.mod_cls_id, cls_value, False
    dense_rows = table.bins[np.asarray(cells, dtype=np.int64)]
    for b, cols in enumerate(rows):
        n = len(cols)
        gene_ids[b, 1 : n + 1] = table.token_ids[cols]
        mod_ids[b, 1 : n + 1] = table.mod_ids[cols]
        target[b, 1 : n + 1] = dense_rows[b, cols].toarray().ravel() if n else []
        pad_mask[b, 1 : n + 1] = False
        if mlm is not None and n:
            k = int(n * mask_ratio)
            if k:
                mlm[b, 1 + rng.choice(n, k, replace=False)] = True
    values = masked_inputs(target, pad_mask, mlm, layout)
    cell_index = np.asarray(cells, dtype=np.int64)
    return Batch.from_numpy(gene_ids, values, pad_mask, target, None, mlm, cell_index=cell_index, modality_ids=mod_ids)
