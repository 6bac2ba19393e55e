"""The contract between the data side and the model side.

Every DataModule (pretraining corpus stream, fine-tuning AnnData) yields ``Batch``;
the model and the objectives read nothing else. Shapes: B cells, L tokens per cell,
position 0 is ``<cls>``.

Two layouts of the per-token fields:
  padded (the default): (B, L), one row per cell, ``<pad>`` after each cell's genes up to L = the longest cell;
  packed (``data.packing: true``): (1, T), every cell's tokens one after the other in one stream, T = the
    batch's tokens (no padding); ``cu_seqlens`` (B+1,) says where each cell starts (its ``<cls>``) and
    ``token_cell`` which cell each token belongs to. Per-cell fields (cell_index, batch_labels, labels, obs)
    stay (B,). Losses that reduce over token masks read both layouts alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch


@dataclass
class Batch:
    gene_ids: torch.Tensor  # (B, L) int64 vocab ids; <cls> at 0, <pad> after the cell's genes
    values: torch.Tensor  # (B, L) model input values: bins (continuous style: float), pad_value at pads,
    #                       mask_value at MLM-masked positions; unknown (generative) positions are ignored
    pad_mask: torch.Tensor  # (B, L) bool, True = padding
    target_values: torch.Tensor  # (B, L) float, the true (unmasked) value of every token
    gen_mask: torch.Tensor | None = None  # (B, L) bool, True = unknown gene in generative training
    mlm_mask: torch.Tensor | None = None  # (B, L) bool, True = value masked for MLM
    cell_index: torch.Tensor | None = None  # (B,) int64 global cell id in the corpus / row in the AnnData
    batch_labels: torch.Tensor | None = None  # (B,) int64 batch / domain id
    labels: torch.Tensor | None = None  # (B,) int64 cell-type class (fine-tuning), -1 = unknown
    condition_ids: torch.Tensor | None = None  # (B, L) int64 per-token condition (perturbation flags)
    modality_ids: torch.Tensor | None = None  # (B, L) int64 per-token modality
    obs: dict[str, torch.Tensor] = field(default_factory=dict)  # (B,) int64 codes of corpus obs columns
    # packed layout only (None when padded): token fields above are then (1, T)
    cu_seqlens: torch.Tensor | None = None  # (B+1,) int32: cell c's tokens are [cu_seqlens[c], cu_seqlens[c+1])
    token_cell: torch.Tensor | None = None  # (1, T) int64: the cell (0..B-1) each token belongs to
    max_seqlen: int | None = None  # tokens of the longest cell (<cls> included), known on the host

    @classmethod
    def from_numpy(cls, *args, **kwargs) -> Batch:
        """A Batch from numpy arrays, shared with torch (None stays None, ``obs`` codes become int64, plain ints
        such as ``max_seqlen`` stay ints); positional arguments in field order."""

        def tensor(v):
            if isinstance(v, np.ndarray):
                return torch.from_numpy(v)
            if isinstance(v, dict):
                return {k: torch.from_numpy(np.asarray(x, dtype=np.int64)) for k, x in v.items()}
            return v

        return cls(*map(tensor, args), **{k: tensor(v) for k, v in kwargs.items()})

    @property
    def packed(self) -> bool:
        """True for the packed (1, T) layout, False for the padded (B, L) one."""
        return self.cu_seqlens is not None

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """Keyword arguments of the model's forward: the one Batch -> model call, ``model(**batch.model_inputs())``."""
        return {
            "gene_ids": self.gene_ids,
            "values": self.values,
            "pad_mask": self.pad_mask,
            "gen_mask": self.gen_mask,
            "batch_labels": self.batch_labels,
            "condition_ids": self.condition_ids,
            "modality_ids": self.modality_ids,
            # the packed layout's extra keys only when packed: models that know no packing keep their signature
            **(
                {"cu_seqlens": self.cu_seqlens, "token_cell": self.token_cell, "max_seqlen": self.max_seqlen}
                if self.packed
                else {}
            ),
        }

    @property
    def n_cells(self) -> int:
        return len(self.cu_seqlens) - 1 if self.packed else self.gene_ids.shape[0]

    @property
    def n_tokens(self) -> int:
        """Non-padding tokens, <cls> included."""
        return int((~self.pad_mask).sum())

    def to(self, device: torch.device | str) -> Batch:
        kwargs = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
            elif isinstance(v, dict):
                v = {k: t.to(device, non_blocking=True) for k, t in v.items()}
            kwargs[f.name] = v
        return Batch(**kwargs)
