"""The contract between the data side and the model side.

Every DataModule (pretraining corpus stream, fine-tuning AnnData) yields ``Batch``;
the model and the objectives read nothing else. Shapes: B cells, L tokens per cell,
position 0 is ``<cls>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

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
        }

    @property
    def n_cells(self) -> int:
        return self.gene_ids.shape[0]

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
