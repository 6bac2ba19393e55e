"""CellBlock -> Batch: binning, sampling to ``max_seq_len`` with ``<cls>`` first, padding,
generative known/unknown split and MLM masking, vectorized over the whole batch.

Token layout of one row: ``<cls>`` at 0, then the cell's kept genes in a random order,
then ``<pad>`` up to L = the longest row of the batch. In generative mode the last
``floor(ratio * n_genes)`` genes of each row are the unknown ones (the order is random,
so this is a uniformly random subset).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from data_modules.batch import Batch
from data_modules.store.reader import CellBlock
from data_modules.tokenize.binning import bin_values, cell_of_entry

VALUE_STYLES = ("continuous", "category")


@dataclass
class TokenizerConfig:
    max_seq_len: int = 1201  # tokens per cell INCLUDING <cls>
    n_bins: int = 51
    value_style: str = "continuous"  # or "category": bins as int64 ids; pad = n_bins, mask = n_bins + 1
    pad_value: float = -2.0
    mask_value: float = -1.0
    cls_value: float = -2.0  # pretraining uses -2; the official fine-tuning tutorials use 0
    gen_ratios: tuple[float, ...] | None = (0.25, 0.5, 0.75)  # unknown ratio drawn per batch; None = off
    mlm_prob: float | None = None  # masked-value MLM probability; None = off

    def __post_init__(self):
        if self.gen_ratios is not None:
            self.gen_ratios = tuple(float(r) for r in self.gen_ratios)
            if not self.gen_ratios or not all(0.0 <= r < 1.0 for r in self.gen_ratios):
                raise ValueError(f"gen_ratios must be non-empty values in [0, 1), got {self.gen_ratios}")
        if self.value_style not in VALUE_STYLES:
            raise ValueError(f"value_style must be one of {VALUE_STYLES}, got {self.value_style!r}")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len counts <cls> and must be >= 2, got {self.max_seq_len}")
        if self.n_bins < 3:
            raise ValueError(f"n_bins must be >= 3, got {self.n_bins}")
        if self.mlm_prob is not None and not 0.0 <= self.mlm_prob <= 1.0:
            raise ValueError(f"mlm_prob must lie in [0, 1], got {self.mlm_prob}")

    @classmethod
    def from_any(cls, cfg: "TokenizerConfig | dict | Any | None") -> "TokenizerConfig":
        """Accept a TokenizerConfig, a dict or an omegaconf DictConfig (Hydra)."""
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        if not isinstance(cfg, dict):
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown tokenizer option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**cfg)

    def to_dict(self) -> dict:
        return asdict(self)


def pad_fraction(batch: Batch) -> float:
    """Fraction of the batch's (B, L) token slots that are padding."""
    return float(batch.pad_mask.float().mean()) if batch.pad_mask.numel() else 0.0


def random_order_within_cells(indptr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(nnz,) permutation that shuffles the entries of every cell independently (cells stay in order)."""
    nnz = int(indptr[-1])
    cells = cell_of_entry(indptr)
    shuffled = rng.permutation(nnz)  # one global shuffle, then a stable pass regroups by cell
    if len(indptr) - 1 <= np.iinfo(np.uint16).max:
        return shuffled[np.argsort(cells[shuffled].astype(np.uint16), kind="stable")]  # radix sort
    return shuffled[np.argsort(cells[shuffled], kind="stable")]


class Tokenizer:
    """Turns a ``CellBlock`` (one batch of cells) into a padded ``Batch``."""

    def __init__(self, config: TokenizerConfig | dict, pad_id: int, cls_id: int):
        self.config = TokenizerConfig.from_any(config)
        self.pad_id = int(pad_id)
        self.cls_id = int(cls_id)

    def __call__(self, block: CellBlock, rng: np.random.Generator) -> Batch:
        cfg = self.config
        indptr = np.asarray(block.indptr, dtype=np.int64)
        n_cells = len(indptr) - 1
        bins = bin_values(indptr, block.counts, cfg.n_bins, rng)  # (nnz,) over all non-zeros
        gene_ids = np.asarray(block.gene_ids)
        if (bins == 0).any():  # explicit zeros in the store never enter the sequence
            keep = bins != 0
            kept_per_cell = np.bincount(cell_of_entry(indptr)[keep], minlength=n_cells)
            indptr = np.zeros(n_cells + 1, dtype=np.int64)
            np.cumsum(kept_per_cell, out=indptr[1:])
            bins, gene_ids = bins[keep], gene_ids[keep]

        # random order within each cell; keep the first max_seq_len - 1 genes
        order = random_order_within_cells(indptr, rng)  # (nnz,)
        n_genes = np.diff(indptr)  # (B,)
        kept = np.minimum(n_genes, cfg.max_seq_len - 1)  # (B,)
        rank = np.arange(len(order), dtype=np.int64) - np.repeat(indptr[:-1], n_genes)  # rank within cell
        take = rank < np.repeat(kept, n_genes)
        rows = np.repeat(np.arange(n_cells), n_genes)[take]
        cols = rank[take] + 1
        L = int(kept.max(initial=0)) + 1

        token_ids = np.full((n_cells, L), self.pad_id, dtype=np.int64)  # (B, L)
        token_ids[:, 0] = self.cls_id
        token_ids[rows, cols] = gene_ids[order[take]]
        true_bins = np.zeros((n_cells, L), dtype=np.int64)  # (B, L)
        true_bins[rows, cols] = bins[order[take]]

        positions = np.arange(L)[None, :]  # (1, L)
        pad_mask = positions > kept[:, None]  # (B, L)
        is_gene = ~pad_mask
        is_gene[:, 0] = False
        gen_mask = None
        if cfg.gen_ratios is not None:
            ratio = cfg.gen_ratios[int(rng.integers(len(cfg.gen_ratios)))]
            n_unknown = np.floor(ratio * kept).astype(np.int64)  # (B,)
            gen_mask = is_gene & (positions > (kept - n_unknown)[:, None])  # (B, L): last n_unknown genes
        mlm_mask = None
        if cfg.mlm_prob is not None:
            mlm_mask = is_gene & (rng.random((n_cells, L), dtype=np.float32) < cfg.mlm_prob)
        hidden = mlm_mask if gen_mask is None else (gen_mask if mlm_mask is None else gen_mask | mlm_mask)

        target_values = true_bins.astype(np.float32)  # (B, L)
        target_values[pad_mask] = cfg.pad_value
        target_values[:, 0] = cfg.cls_value
        if cfg.value_style == "continuous":
            values = target_values.copy()
            if hidden is not None:
                values[hidden] = cfg.mask_value  # no input ever carries the value of a hidden gene
        else:
            values = true_bins  # (B, L) int64 categories
            values[pad_mask] = cfg.n_bins
            values[:, 0] = cfg.n_bins  # <cls> gets the pad category, as <cls> gets pad_value when continuous
            if hidden is not None:
                values[hidden] = cfg.n_bins + 1

        return Batch(
            gene_ids=torch.from_numpy(token_ids),
            values=torch.from_numpy(values),
            pad_mask=torch.from_numpy(pad_mask),
            target_values=torch.from_numpy(target_values),
            gen_mask=None if gen_mask is None else torch.from_numpy(gen_mask),
            mlm_mask=None if mlm_mask is None else torch.from_numpy(mlm_mask),
            cell_index=torch.from_numpy(np.asarray(block.cell_index, dtype=np.int64)),
            obs={k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in block.obs.items()},
        )
