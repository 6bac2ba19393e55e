"""CellBlock -> Batch: binning, sampling to ``max_seq_len`` with ``<cls>`` first, padding,
generative known/unknown split and MLM masking, in one compiled kernel call per batch
(``data_modules.tokenize.kernels``) that writes straight into the padded (B, L) arrays.

Token layout of one row: ``<cls>`` at 0, then the cell's genes in the store's order (a
uniformly random subset of ``max_seq_len - 1`` of them for longer cells, drawn anew every
time), then ``<pad>`` up to L = the longest row of the batch. In generative mode a uniformly
random ``floor(ratio * n_genes)`` of each row's genes are unknown (``gen_mask``); the model
has no positional encoding, so the order carries no information.

Packed layout (``Tokenizer.pack``): the same rows without their ``<pad>`` tail, concatenated into one
(1, T) stream with ``cu_seqlens`` offsets (``data_modules.batch``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from data_modules.batch import Batch
from data_modules.config import dataclass_from_any
from data_modules.store.reader import CellBlock
from data_modules.tokenize import kernels
from data_modules.tokenize.binning import kernel_counts, quantile_levels
from data_modules.tokenize.layout import TokenLayout


@dataclass
class TokenizerConfig:
    """How cells are tokenized: the shared ``TokenLayout`` plus what only the data side decides."""

    layout: TokenLayout = field(default_factory=TokenLayout)
    cls_value: float | None = (
        None  # input value at <cls>; None = layout.pad_value (pretraining); official fine-tuning: 0
    )
    gen_ratios: tuple[float, ...] | None = (0.25, 0.5, 0.75)  # unknown ratio drawn per batch; None = off
    mlm_prob: float | None = None  # masked-value MLM probability; None = off

    def __post_init__(self):
        self.layout = TokenLayout.from_any(self.layout)
        self.cls_value = self.layout.pad_value if self.cls_value is None else float(self.cls_value)
        if self.gen_ratios is not None:
            self.gen_ratios = tuple(float(r) for r in self.gen_ratios)
            if not self.gen_ratios or not all(0.0 <= r < 1.0 for r in self.gen_ratios):
                raise ValueError(f"gen_ratios must be non-empty values in [0, 1), got {self.gen_ratios}")
        if self.mlm_prob is not None and not 0.0 <= self.mlm_prob <= 1.0:
            raise ValueError(f"mlm_prob must lie in [0, 1], got {self.mlm_prob}")

    @classmethod
    def from_any(
        cls, cfg: TokenizerConfig | dict | Any | None, layout: TokenLayout | dict | Any = None
    ) -> TokenizerConfig:
        """A TokenizerConfig from an instance, a dict or a DictConfig (Hydra); ``layout``, when given, is
        the layout (a data module's ``layout`` argument) and must not be given twice."""
        if layout is None:
            return dataclass_from_any(cls, cfg, "tokenizer")
        if isinstance(cfg, TokenizerConfig):
            cfg = cfg.to_dict()
        elif cfg is not None and not isinstance(cfg, dict):
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        base = dict(cfg or {})
        if base.get("layout") is not None:
            raise ValueError("give the token layout once: as the data module's `layout`, not inside `tokenizer`")
        return dataclass_from_any(cls, {**base, "layout": TokenLayout.from_any(layout)}, "tokenizer")

    def to_dict(self) -> dict:
        return {**asdict(self), "layout": self.layout}

    def replace(self, **changes) -> TokenizerConfig:
        return TokenizerConfig(**{**self.to_dict(), **changes})


def pad_fraction(batch: Batch) -> float:
    """Fraction of the batch's (B, L) token slots that are padding."""
    pad_mask = batch.pad_mask
    if not pad_mask.numel():
        return 0.0
    if pad_mask.device.type == "cpu":  # numpy: no torch intra-op threads (slow on a busy machine)
        return np.count_nonzero(pad_mask.numpy()) / pad_mask.numel()
    return float(pad_mask.float().mean())


@dataclass
class EncodedCells:
    """A tokenized batch before padding: the kept tokens of every cell, compact (4-6 bytes a token).

    This is what dataloader workers send to the main process (pickled through the result
    pipe; a third of the padded batch's bytes and no shared-memory segments), where
    ``Tokenizer.pad`` builds the (B, L) ``Batch``.
    """

    offsets: np.ndarray  # (B+1,) int64: cell c's tokens are [offsets[c], offsets[c+1])
    genes: np.ndarray  # (T,) vocab ids
    bins: np.ndarray  # (T,) uint8 / uint16 true bins
    flags: np.ndarray  # (T,) uint8: bit 0 unknown (generative), bit 1 MLM-masked
    gen_ratio: float | None  # the batch's unknown ratio (None: no generative split)
    cell_index: np.ndarray  # (B,) int64
    obs: dict[str, np.ndarray]  # column -> (B,) codes


class Tokenizer:
    """Turns a ``CellBlock`` (one batch of cells) into a padded ``Batch``: ``pad(encode(block, rng))``, or a
    packed one (``pack(encode(block, rng))``, see ``data_modules.batch``)."""

    def __init__(self, config: TokenizerConfig | dict, pad_id: int, cls_id: int):
        self.config = TokenizerConfig.from_any(config)
        self.pad_id = int(pad_id)
        self.cls_id = int(cls_id)
        self.layout = self.config.layout
        self._levels = quantile_levels(self.layout.n_bins)  # (n_bins - 1,) edge quantiles
        self._bin_dtype = np.uint8 if self.layout.n_bins <= 256 else np.uint16

    def __call__(self, block: CellBlock, rng: np.random.Generator) -> Batch:
        return self.pad(self.encode(block, rng))

    def encode(self, block: CellBlock, rng: np.random.Generator, rows: np.ndarray | None = None) -> EncodedCells:
        """Bin, sample and mask every cell (one compiled call); all draws come from ``rng``.

        ``rows``: encode only these cells of ``block``, in this order (no copy of their entries).
        """
        cfg = self.config
        indptr = np.asarray(block.indptr, dtype=np.int64)
        if rows is None:
            starts, stops = indptr[:-1], indptr[1:]
            cell_index, obs = np.asarray(block.cell_index, dtype=np.int64), dict(block.obs)
        else:
            starts, stops = indptr[rows], indptr[rows + 1]
            cell_index, obs = (
                np.asarray(block.cell_index[rows], dtype=np.int64),
                {k: v[rows] for k, v in block.obs.items()},
            )
        starts, stops = np.ascontiguousarray(starts), np.ascontiguousarray(stops)
        counts, integer = kernel_counts(block.counts)
        gene_ids = np.ascontiguousarray(block.gene_ids)
        gen_ratio = None if cfg.gen_ratios is None else cfg.gen_ratios[int(rng.integers(len(cfg.gen_ratios)))]
        room = int(np.minimum(stops - starts, self.layout.max_genes).sum())  # kept tokens, explicit zeros aside
        offsets = np.empty(len(starts) + 1, dtype=np.int64)
        genes = np.empty(room, dtype=gene_ids.dtype)
        bins = np.empty(room, dtype=self._bin_dtype)
        flags = np.empty(room, dtype=np.uint8)
        kernels.encode_batch(
            starts,
            stops,
            counts,
            gene_ids,
            integer,
            self._levels,
            self.layout.max_genes,
            -1.0 if gen_ratio is None else gen_ratio,
            -1.0 if cfg.mlm_prob is None else float(cfg.mlm_prob),
            kernels.kernel_seed(rng),
            offsets,
            genes,
            bins,
            flags,
        )
        n_tokens = int(offsets[-1])  # explicit zeros in the store never enter a row
        genes, bins, flags = genes[:n_tokens], bins[:n_tokens], flags[:n_tokens]
        return EncodedCells(offsets, genes, bins, flags, gen_ratio, cell_index, obs)

    def pad(self, enc: EncodedCells) -> Batch:
        """(B, L) tensors from encoded cells, L = the longest row (<cls> included)."""
        cfg = self.config
        n_cells = len(enc.offsets) - 1
        L = int(np.diff(enc.offsets).max(initial=0)) + 1
        token_ids = np.empty((n_cells, L), dtype=np.int64)  # (B, L)
        values = np.empty((n_cells, L), dtype=np.float32)  # (B, L) model inputs
        target_values = np.empty((n_cells, L), dtype=np.float32)  # (B, L) true bins
        pad_mask = np.empty((n_cells, L), dtype=bool)  # (B, L)
        gen_mask = np.empty((n_cells, L) if cfg.gen_ratios is not None else (0, 0), dtype=bool)  # (B, L)
        mlm_mask = np.empty((n_cells, L) if cfg.mlm_prob is not None else (0, 0), dtype=bool)  # (B, L)
        outputs = (token_ids, values, target_values, pad_mask, gen_mask, mlm_mask)
        kernels.pad_batch(
            *self._kernel_inputs(enc), self.pad_id, self.cls_id, self.layout.pad_value, *self._values(), *outputs
        )
        gen = None if cfg.gen_ratios is None else gen_mask
        mlm = None if cfg.mlm_prob is None else mlm_mask
        if self.layout.value_style == "category":
            values = category_values(target_values, pad_mask, gen, mlm, self.layout)
        return Batch.from_numpy(
            token_ids, values, pad_mask, target_values, gen, mlm, cell_index=enc.cell_index, obs=enc.obs
        )

    def _kernel_inputs(self, enc: EncodedCells) -> tuple:
        """The arguments ``kernels.pad_batch`` and ``kernels.pack_batch`` both start with."""
        cfg = self.config
        return enc.offsets, enc.genes, enc.bins, enc.flags, cfg.gen_ratios is not None, cfg.mlm_prob is not None

    def _values(self) -> tuple[float, float]:
        """(mask_value, cls_value): the input values of hidden genes and of ``<cls>``."""
        return self.layout.mask_value, self.config.cls_value

    def pack(self, enc: EncodedCells) -> Batch:
        """The packed layout of ``pad(enc)``: (1, T) token fields without padding, T = sum of the cells' tokens
        (<cls> included), plus ``cu_seqlens`` (B+1,) int32, ``token_cell`` (1, T) and ``max_seqlen``.

        Token for token the same contents as ``pad``'s non-pad slots, in the same order.
        """
        cfg = self.config
        n_cells = len(enc.offsets) - 1
        lengths = np.diff(enc.offsets) + 1  # (B,) tokens per cell, <cls> included
        cu_seqlens = np.zeros(n_cells + 1, dtype=np.int32)  # (B+1,)
        np.cumsum(lengths, out=cu_seqlens[1:])
        T = int(cu_seqlens[-1])
        token_ids = np.empty(T, dtype=np.int64)  # (T,)
        values = np.empty(T, dtype=np.float32)  # (T,) model inputs
        target_values = np.empty(T, dtype=np.float32)  # (T,) true bins
        token_cell = np.empty(T, dtype=np.int64)  # (T,)
        gen_mask = np.empty(T if cfg.gen_ratios is not None else 0, dtype=bool)  # (T,)
        mlm_mask = np.empty(T if cfg.mlm_prob is not None else 0, dtype=bool)  # (T,)
        outputs = (token_ids, values, target_values, token_cell, gen_mask, mlm_mask)
        kernels.pack_batch(*self._kernel_inputs(enc), self.cls_id, *self._values(), *outputs)
        gen = None if cfg.gen_ratios is None else gen_mask[None]
        mlm = None if cfg.mlm_prob is None else mlm_mask[None]
        pad_mask = np.zeros((1, T), dtype=bool)  # (1, T) no padding
        values = values[None]
        if self.layout.value_style == "category":
            values = category_values(target_values[None], pad_mask, gen, mlm, self.layout, cls_at=cu_seqlens[:-1])
        return Batch.from_numpy(
            token_ids[None], values, pad_mask, target_values[None], gen, mlm, cell_index=enc.cell_index, obs=enc.obs,
            cu_seqlens=cu_seqlens, token_cell=token_cell[None], max_seqlen=int(lengths.max(initial=1)),
        )  # fmt: skip


def category_values(
    target_values: np.ndarray,
    pad_mask: np.ndarray,
    gen_mask: np.ndarray | None,
    mlm_mask: np.ndarray | None,
    layout: TokenLayout,
    cls_at: np.ndarray | None = None,
) -> np.ndarray:
    """(B, L) int64 category inputs: bins, pad (and <cls>) -> pad category, hidden -> mask category.

    ``cls_at``: the <cls> positions along the last axis of a packed (1, T) stream (None: column 0 of each row).
    """
    values = target_values.astype(np.int64)
    values[pad_mask] = layout.pad_category
    # <cls> gets the pad category, as <cls> gets pad_value when continuous
    values[:, 0 if cls_at is None else cls_at] = layout.pad_category
    for hidden in (gen_mask, mlm_mask):
        if hidden is not None:
            values[hidden] = layout.mask_category
    return values


def masked_inputs(target: np.ndarray, pad_mask: np.ndarray, mlm_mask: np.ndarray | None, layout: TokenLayout):
    """(B, L) model inputs of the bins ``target``: ``mask_value`` at MLM-masked positions (continuous and scaling
    styles read the bins as floats), or the category ids (:func:`category_values`)."""
    if layout.value_style == "category":
        return category_values(target, pad_mask, None, mlm_mask, layout)
    values = target.copy()
    if mlm_mask is not None:
        values[mlm_mask] = layout.mask_value
    return values
