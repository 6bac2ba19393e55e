"""CellBlock -> Batch: binning, sampling to ``max_seq_len`` with ``<cls>`` first, padding,
generative known/unknown split and MLM masking, vectorized over the whole batch.

Token layout of one row: ``<cls>`` at 0, then the cell's genes in the store's order (a
uniformly random subset of ``max_seq_len - 1`` of them for longer cells, drawn anew every
time), then ``<pad>`` up to L = the longest row of the batch. In generative mode a uniformly
random ``floor(ratio * n_genes)`` of each row's genes are unknown (``gen_mask``); the model
has no positional encoding, so the order carries no information.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from data_modules.batch import Batch
from data_modules.store.reader import CellBlock
from data_modules.tokenize.binning import bin_values, cell_of_entry, has_zeros

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


def select_per_cell(cells: np.ndarray, n_per_cell: np.ndarray, ks: list[np.ndarray],
                    rng: np.random.Generator) -> list[np.ndarray]:
    """For each ``k`` in ``ks``: (nnz,) bool, exactly ``k[c]`` entries of every cell c, uniformly at random.

    All thresholds rank the entries by the same random order, so for ``k1 <= k2`` the first
    selection is a uniform subset of the second. ``cells`` is the (ascending) cell of each
    entry. Each entry draws an 8-bit key; a per-cell histogram gives the bucket where the k
    smallest keys end, and only the few entries in that bucket are ordered (by a second
    random draw). O(nnz), no full sort.
    """
    n_cells = len(n_per_cell)
    keys = rng.integers(0, 256, size=len(cells), dtype=np.uint8)  # (nnz,)
    hist = np.bincount(cells * 256 + keys, minlength=n_cells * 256).reshape(n_cells, 256)
    cum = np.cumsum(hist, axis=1)  # (C, 256) entries with key <= b
    buckets = [(cum < k[:, None]).sum(axis=1) for k in ks]  # (C,) bucket holding each k-th smallest key
    on_edge = np.zeros(len(cells), dtype=bool)
    for bucket in buckets:
        on_edge |= keys == bucket[cells]
    edge_all = np.flatnonzero(on_edge)
    u_all = rng.random(len(edge_all))  # one tie-break draw per boundary entry, shared by all thresholds
    masks = []
    for k, bucket in zip(ks, buckets):
        below = np.where(bucket > 0, cum[np.arange(n_cells), np.maximum(bucket - 1, 0)], 0)
        entry_bucket = bucket[cells]
        selected = keys < entry_bucket
        edge = np.flatnonzero(keys == entry_bucket)  # entries in the boundary bucket: take some at random
        edge_cells = cells[edge]
        order = np.lexsort((u_all[np.searchsorted(edge_all, edge)], edge_cells))
        sorted_cells = edge_cells[order]
        rank = np.arange(len(order)) - np.searchsorted(sorted_cells, sorted_cells, side="left")
        selected[edge[order[rank < (k - below)[sorted_cells]]]] = True
        masks.append(selected)
    return masks


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
        cells = cell_of_entry(indptr)  # (nnz,)
        bins = bin_values(indptr, block.counts, cfg.n_bins, rng, cells=cells)  # (nnz,) over all non-zeros
        gene_ids = np.asarray(block.gene_ids)
        if has_zeros(block.counts):  # explicit zeros in the store never enter the sequence
            keep = bins != 0
            bins, gene_ids, cells = bins[keep], gene_ids[keep], cells[keep]

        # one random ranking of each cell's genes: the first max_seq_len - 1 are kept (uniform subset,
        # in the store's gene order), the first kept - n_unknown of those are the known genes
        n_genes = np.bincount(cells, minlength=n_cells)  # (B,)
        kept = np.minimum(n_genes, cfg.max_seq_len - 1)  # (B,)
        n_unknown = np.zeros(n_cells, dtype=np.int64)
        if cfg.gen_ratios is not None:
            ratio = cfg.gen_ratios[int(rng.integers(len(cfg.gen_ratios)))]
            n_unknown = np.floor(ratio * kept).astype(np.int64)  # (B,)
        sample = bool((n_genes > kept).any())
        if sample or cfg.gen_ratios is not None:
            is_kept, is_known = select_per_cell(cells, n_genes, [kept, kept - n_unknown], rng)
            if sample:
                take = np.flatnonzero(is_kept)
                bins, gene_ids, cells, is_known = bins[take], gene_ids[take], cells[take], is_known[take]
        starts = np.zeros(n_cells, dtype=np.int64)
        np.cumsum(kept[:-1], out=starts[1:])
        L = int(kept.max(initial=0)) + 1
        flat = cells * L + (np.arange(len(cells), dtype=np.int64) - starts[cells]) + 1  # (n_kept,) slot in (B, L)

        token_ids = np.full((n_cells, L), self.pad_id, dtype=np.int64)  # (B, L)
        token_ids[:, 0] = self.cls_id
        token_ids.ravel()[flat] = gene_ids
        target_values = np.full((n_cells, L), cfg.pad_value, dtype=np.float32)  # (B, L) true bins
        target_values[:, 0] = cfg.cls_value
        target_values.ravel()[flat] = bins

        positions = np.arange(L)[None, :]  # (1, L)
        pad_mask = positions > kept[:, None]  # (B, L)
        gen_mask = None
        if cfg.gen_ratios is not None:
            gen_mask = np.zeros((n_cells, L), dtype=bool)  # (B, L)
            gen_mask.ravel()[flat[~is_known]] = True
        mlm_mask = None
        if cfg.mlm_prob is not None:
            mlm_mask = ~pad_mask & (rng.random((n_cells, L), dtype=np.float32) < cfg.mlm_prob)
            mlm_mask[:, 0] = False
        hidden = mlm_mask if gen_mask is None else (gen_mask if mlm_mask is None else gen_mask | mlm_mask)

        if cfg.value_style == "continuous":
            values = target_values.copy()
            if hidden is not None:
                values[hidden] = cfg.mask_value  # no input ever carries the value of a hidden gene
        else:
            values = target_values.astype(np.int64)  # (B, L) categories
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
