"""The per-gene baseline of a pretraining run: how much better than "each gene's mean value" does the model do?

A model that learns only gene identity predicts, for a masked gene, that gene's mean target value (the best
constant per gene under squared error). ``PerGeneMean`` keeps those means over the training positions where the
objectives predicted a value (running sums, in every checkpoint), and ``loss`` scores that predictor on the same
validation positions as the model. The module logs the ratio model / per-gene baseline: 1.0 means the model learnt
nothing beyond gene identity, lower is better (docs/model.md, "Pretraining quality").
"""

from __future__ import annotations

import torch

from scgpt_train.objectives import masked_mse


class PerGeneMean:
    """Running per-gene sums and counts of target values at predicted positions; not a model parameter."""

    def __init__(self, vocab_size: int = 0):
        self.sums = torch.zeros(vocab_size, dtype=torch.float64)  # (V,)
        self.counts = torch.zeros(vocab_size, dtype=torch.float64)  # (V,)
        self.sized = vocab_size > 0

    @property
    def empty(self) -> bool:
        return not bool(self.counts.sum() > 0)

    def _fit(self, size: int, device: torch.device) -> None:
        if self.sums.device != device:
            self.sums, self.counts = self.sums.to(device), self.counts.to(device)
        if size > self.sums.numel():  # no vocabulary size given, or a larger one: grow
            grow = size - self.sums.numel()
            self.sums = torch.cat([self.sums, self.sums.new_zeros(grow)])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow)])

    @torch.no_grad()
    def update(self, gene_ids: torch.Tensor, target: torch.Tensor, where: torch.Tensor) -> None:
        """Add the targets at ``where`` (B, L) bool, of genes ``gene_ids`` (B, L)."""
        ids = gene_ids[where].long()  # (N,)
        if ids.numel() == 0:
            return
        # with the vocabulary size known the ids fit; else one device sync to size the sums
        self._fit(self.sums.numel() if self.sized else int(ids.max()) + 1, ids.device)
        self.sums.index_add_(0, ids, target[where].to(torch.float64))
        self.counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))

    @torch.no_grad()
    def predict(self, gene_ids: torch.Tensor) -> torch.Tensor:
        """Each position's gene mean (B, L) float32; genes never seen in training get the mean over all genes."""
        self._fit(0, gene_ids.device)
        overall = self.sums.sum() / self.counts.sum().clamp(min=1.0)
        means = torch.where(self.counts > 0, self.sums / self.counts.clamp(min=1.0), overall)
        ids = gene_ids.long().clamp(max=means.numel() - 1)
        seen = gene_ids.long() < means.numel()
        return torch.where(seen, means[ids], overall).float()

    def loss(self, gene_ids: torch.Tensor, target: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Masked MSE of the per-gene predictor at ``where``: the same formula as the model's GEP / MLM loss."""
        return masked_mse(self.predict(gene_ids), target, where)

    def state_dict(self) -> dict:
        return {"sums": self.sums.cpu(), "counts": self.counts.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.sums = state["sums"].to(torch.float64)
        self.counts = state["counts"].to(torch.float64)


def per_gene_ratios(metrics) -> dict[str, float]:
    """``val/<objective>/<term>_vs_per_gene`` = the term's validation loss / the per-gene baseline's, for every
    objective that logged ``val/<objective>/per_gene_baseline`` (epoch means over the same cells)."""
    ratios = {}
    for key, base in metrics.items():
        if not key.startswith("val/") or not key.endswith("/per_gene_baseline"):
            continue
        prefix = key[: -len("per_gene_baseline")]
        base = float(base)
        for term_key, value in metrics.items():
            term = term_key[len(prefix) :]
            if term_key.startswith(prefix) and "/" not in term and term != "per_gene_baseline" and base > 0:
                if not term.endswith("_vs_per_gene"):
                    ratios[f"{prefix}{term}_vs_per_gene"] = float(value) / base
    return ratios
