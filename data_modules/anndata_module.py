"""Fine-tuning from AnnData: preprocessing, vocab mapping, labels, batches, splits -> ``Batch``.

One DataModule for annotation (reference -> query) and integration (all cells). Cells are held as
one CSR matrix over the vocab-mapped genes (in memory), or read per batch from the h5ad (``backed``).
Every batch goes through the project tokenizer (official binning, ``<cls>`` first, sampling to
``max_seq_len``, optional MLM masking), or, with ``include_zero_genes``, through the same binning with
zero-expressed genes kept as bin 0.

Splits (``obs["split"]`` of :attr:`AnnDataModule.adata`): ``train`` / ``val`` (stratified by label,
``val_fraction`` of the training pool) and ``query`` (``query_path``, an obs column value, or a stratified
``query_fraction`` hold-out). Integration trains on all cells (``train_on: all``) and evaluates on all.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from data_modules import preprocess as prep
from data_modules.batch import Batch
from data_modules.errors import UserInputError, check_h5ad_file
from data_modules.finetune import LABEL_OUTPUTS, FineTuneDataModule, attach_labels, batch_rng
from data_modules.species import vocab_species
from data_modules.store.reader import CellBlock
from data_modules.tokenize import Tokenizer, TokenizerConfig, tokenize_with_zeros
from data_modules.vocab import GeneIdReport, GeneVocab, guess_gene_key

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "query")
LOST_EXPRESSION_WARNING = 0.05  # a larger share of the expression in genes the vocabulary lacks: a warning
SMALL_VALIDATION = 50  # fewer validation cells than this: a warning (checkpoint selection becomes noisy)


class RowStore:
    """Rows of a CSR matrix over the model's genes, in memory or read from backed h5ad parts."""

    def __init__(self, parts: list[tuple[Any, np.ndarray]], n_genes: int):
        """``parts``: (matrix-like with row indexing, (n_cols,) int64 column -> model gene position or -1)."""
        self.parts = parts
        self.n_genes = n_genes
        sizes = [m.shape[0] for m, _ in parts]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, idx: np.ndarray) -> sp.csr_matrix:
        """(len(idx), n_genes) float32 CSR for ascending global row indices ``idx``."""
        blocks = []
        for p, (matrix, colmap) in enumerate(self.parts):
            local = idx[(idx >= self.offsets[p]) & (idx < self.offsets[p + 1])] - self.offsets[p]
            if len(local) == 0:
                continue
            sub = sp.csr_matrix(matrix[local], dtype=np.float32)
            sub.eliminate_zeros()
            coo = sub.tocoo()
            cols = colmap[coo.col]
            keep = cols >= 0
            blocks.append(
                sp.csr_matrix(
                    (coo.data[keep], (coo.row[keep], cols[keep])), shape=(len(local), self.n_genes), dtype=np.float32
                )
            )
        out = sp.vstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]
        out.sort_indices()
        return out


class CellCollate:
    """DataLoader collate: a list of cell indices -> ``Batch`` (picklable for worker processes)."""

    def __init__(
        self,
        store: RowStore,
        gene_ids: np.ndarray,
        labels: np.ndarray | None,
        batch_labels: np.ndarray | None,
        tokenizer_cfg: TokenizerConfig,
        pad_id: int,
        cls_id: int,
        include_zero_genes: bool,
        deterministic_seed: int | None,
    ):
        self.store, self.gene_ids = store, gene_ids
        self.labels, self.batch_labels = labels, batch_labels
        self.cfg, self.pad_id, self.cls_id = tokenizer_cfg, pad_id, cls_id
        self.include_zero_genes = include_zero_genes
        self.deterministic_seed = deterministic_seed  # None = random (training); int = same bins every epoch
        self.tokenizer = Tokenizer(tokenizer_cfg, pad_id, cls_id)

    def __call__(self, indices: list[int]) -> Batch:
        idx = np.sort(np.asarray(indices, dtype=np.int64))
        rng = batch_rng(self.deterministic_seed, idx)
        x = self.store.rows(idx)  # (B, G)
        if self.include_zero_genes:
            batch = tokenize_with_zeros(x, self.gene_ids, self.cfg, self.pad_id, self.cls_id, rng)
        else:
            block = CellBlock(
                indptr=x.indptr.astype(np.int64),
                gene_ids=self.gene_ids[x.indices].astype(np.int32),
                counts=x.data.astype(np.float32),
                cell_index=idx,
            )
            batch = self.tokenizer(block, rng)
        batch.cell_index = torch.from_numpy(idx)
        return attach_labels(batch, idx, self.labels, self.batch_labels)


def unlabeled_mask(values: pd.Series) -> np.ndarray:
    """(N,) bool: cells whose label is missing: NaN / None, or a string that is empty or reads "nan" / "None"."""
    text = values.astype(object).where(values.notna(), "").astype(str).str.strip()
    return (values.isna() | text.isin(["", "nan", "NaN", "None"])).to_numpy()


# the data module ---------------------------------------------------------------------------
class AnnDataModule(FineTuneDataModule):
    """Fine-tuning data from one h5ad (optionally + a query h5ad). Plain constructor values (Hydra).

    Parameters
    ----------
    path, query_path : str
        The reference (or all cells) and an optional query h5ad.
    builder : callable, optional
        ``builder(path)`` writes ``path`` when it does not exist (the demos).
    label_key, batch_key : str, optional
        obs columns with cell types / batches (either may be None).
    vocab : str, optional
        vocab.json, official checkpoint dir, imported .pt or Lightning .ckpt; None = the dataset's genes.
    preprocess : dict or PreprocessConfig, optional
        PreprocessConfig fields (normalize_total, log1p, value_type, n_hvg, hvg_flavor, use_raw, gene_column,
        prefer_gene_column...). The values are inspected first (data_modules/value_types.py: counts, log1p,
        normalized) and get the steps the recipe's normalize_total / log1p need; ``value_reports`` /
        data_report.json say which.
    layer : str, optional
        Read ``layers[layer]`` (e.g. "counts") instead of X.
    layout : TokenLayout or dict, optional
        The TokenLayout (max_seq_len, n_bins, value_style, pad / mask values) shared with the model.
    tokenizer : dict, optional
        The other TokenizerConfig fields (cls_value, mlm_prob).
    include_zero_genes : bool
        Every model gene per cell, zeros as bin 0 (the official ``include_zero_gene``).
    query_key, query_values, query_fraction
        The query split when there is no query file: cells whose ``obs[query_key]`` is in ``query_values``, or a
        stratified ``query_fraction`` hold-out.
    train_on : str
        ``reference`` (annotation) or ``all`` (integration: every cell, query included, is trained on).
    val_fraction : float
        The stratified validation share of the training pool.
    batch_size, val_batch_size, num_workers, seed, report_path
        As :class:`~data_modules.finetune.FineTuneDataModule`.
    backed : bool
        Read X row by row from the file (no HVG selection, no use_raw, values as stored).
    model_outputs : sequence of str
        Which data-decided model kwargs to expose: ``n_cls``, ``num_batch_labels``.
    drop_unlabeled : bool
        Cells whose ``label_key`` is empty (NaN / None / "") are refused by default (the file, the count and
        examples named); true leaves them out and reports how many.
    species : str, optional
        The input's species (data_modules/species.py); None = detected.
    """

    def __init__(
        self,
        path: str,
        query_path: str | None = None,
        builder: Callable[[str], Any] | None = None,
        label_key: str | None = None,
        batch_key: str | None = None,
        vocab: str | None = None,
        preprocess: Any = None,
        layer: str | None = None,
        layout: Any = None,
        tokenizer: Any = None,
        include_zero_genes: bool = False,
        query_key: str | None = None,
        query_values: list | None = None,
        query_fraction: float | None = None,
        train_on: str = "reference",
        val_fraction: float = 0.1,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        backed: bool = False,
        model_outputs: list[str] | tuple[str, ...] = ("n_cls",),
        report_path: str | None = None,
        drop_unlabeled: bool = False,
        species: str | None = None,
    ):
        super().__init__(
            path, builder, vocab, batch_size, val_batch_size, num_workers, seed, report_path, model_outputs
        )
        if train_on not in ("reference", "all"):
            raise ValueError(f"train_on must be 'reference' or 'all', got {train_on!r}")
        self.query_path, self.label_key, self.batch_key = query_path, label_key, batch_key
        self.preprocess_cfg = prep.PreprocessConfig.from_any(preprocess)
        if layer is not None:
            self.preprocess_cfg.layer = str(layer)
        if species is not None:  # data.species: the input's species (data_modules/species.py); null = detected
            self.preprocess_cfg.species = str(species)
        self.value_reports: list[dict] = []  # per file: what its values were and the steps applied
        self.gene_id_reports: list[dict] = []  # per file: how its gene names were read and mapped to the vocab's key
        self._input_columns: list[np.ndarray] = []  # per file: the input column of each gene it kept
        self._column_maps: list[tuple[np.ndarray, np.ndarray]] = []  # per file: (input columns, model columns)
        # fine-tuning: no generative split
        self.tokenizer_cfg = TokenizerConfig.from_any(tokenizer, layout=layout).replace(gen_ratios=None)
        self.layout = self.tokenizer_cfg.layout
        self.include_zero_genes = bool(include_zero_genes)
        self.query_key, self.query_values, self.query_fraction = query_key, query_values, query_fraction
        self.train_on, self.val_fraction, self.backed = train_on, float(val_fraction), bool(backed)
        unknown = set(self.model_outputs) - set(LABEL_OUTPUTS)
        if unknown:
            raise ValueError(f"model_outputs may hold 'n_cls' and 'num_batch_labels', got {sorted(unknown)}")
        self.drop_unlabeled = bool(drop_unlabeled)
        self._kept_rows: list[np.ndarray | None] = []  # per file: the rows kept (None = all; data.drop_unlabeled)
        self.warnings: list[str] = []
        self.adata: ad.AnnData | None = None  # all cells, model genes; obs: split, label / batch codes

    # lifecycle ------------------------------------------------------------------------
    missing_hint = "download it (python scripts/download_benchmarks.py NAME) or point data.path at your h5ad"

    def setup(self, stage: str | None = None) -> None:
        if self.adata is not None:
            return
        cfg = self.preprocess_cfg
        if self.backed and (cfg.n_hvg is not None or cfg.use_raw):
            raise ValueError(
                "backed=true reads X row by row: HVG selection and use_raw need the whole matrix in "
                "memory; select the genes beforehand or set data.backed=false"
            )
        # genes are brought to the vocabulary's key (symbols / Ensembl ids); from scratch, to the reference's
        self._vocab = self.checkpoint_vocab()
        if self._vocab is not None and cfg.gene_key is None:
            cfg.gene_key = self._vocab.keyed_by
        if self._vocab is not None and cfg.target_species is None:  # other species map through orthologs
            cfg.target_species = vocab_species(self._vocab.genes)
        if self.query_path is not None and Path(self.query_path).resolve() == Path(self.path).resolve():
            raise UserInputError(
                f"data.query_path={self.query_path} is the same file as data.path: the query cells would be the cells "
                "the model trains on, and their metrics would measure memorisation. Give a separate query file, or "
                "leave data.query_path unset and hold cells out with data.query_fraction / data.query_key"
            )
        ref, ref_x, ref_genes = self._load(self.path, None)
        if cfg.gene_key is None:
            cfg.gene_key = guess_gene_key(list(ref_genes))
        parts = [(ref_x, ref_genes, ref.obs)]
        if self.query_path is not None:
            q, q_x, q_genes = self._load(self.query_path, list(ref_genes))
            parts.append((q_x, q_genes, q.obs))
        if self._vocab is None:
            self._vocab = GeneVocab.from_genes(sorted(set().union(*(set(g) for _, g, _ in parts))))
        self._build(parts)

    def _load(self, path: str, genes: list[str] | None):
        """(obs-carrying AnnData, row-indexable X, gene names) of one file, preprocessed."""
        option = "data.query_path" if path == self.query_path else "data.path"
        check_h5ad_file(path, option)  # missing, not HDF5, truncated: named before anything reads it
        where = Path(path).name
        cfg = self.preprocess_cfg
        keep = self._labelled_rows(path)
        self._kept_rows.append(keep)
        if path == self.query_path and cfg.query_gene_column is not None:  # the query names its genes differently
            cfg = dataclasses.replace(cfg, gene_column=cfg.query_gene_column)
        if self.backed:
            if keep is not None:
                raise UserInputError(
                    f"{path}: data.drop_unlabeled=true leaves cells out, but backed=true reads X row by row as stored; "
                    "set data.backed=false, or drop the unlabelled cells from the file"
                )
            data = ad.read_h5ad(path, backed="r")
            if cfg.layer is not None:
                raise ValueError(
                    f"{where}: backed=true reads X row by row; data.layer={cfg.layer!r} needs the file in memory "
                    "(set data.backed=false)"
                )
            names, id_report = prep.var_gene_names(data.var, cfg, where)
            names = np.asarray(pd.Index(names).astype(str))
            self._record_genes(id_report.as_dict(), path)
            sample = prep.read_input(data[: min(data.n_obs, 2000)].to_memory(), cfg, where)  # the first cells
            report = prep.inspect_values(sample, cfg, where)
            if report.steps:
                raise ValueError(
                    f"{report.source}: backed=true reads X as stored, but it holds {report.value_type} values that "
                    f"the recipe would preprocess ({', '.join(report.steps)}); set data.backed=false, or store the "
                    "preprocessed values in the file"
                )
            report.source += f" (first {sample.n_obs} cells inspected)"
            self._record_values(report.as_dict())
            self._input_columns.append(np.arange(data.n_vars, dtype=np.int64))
            return data, data.X, names
        data = ad.read_h5ad(path)
        for n, what in ((data.n_obs, "cells"), (data.n_vars, "genes")):
            if n == 0:
                raise UserInputError(f"{option} {path} holds 0 {what}: nothing to train or evaluate on; check the file")
        if keep is not None:
            data = data[keep].copy()
        data, flavor = prep.normalize_and_select(data, cfg, genes, where)
        self.hvg_flavor = flavor if genes is None else getattr(self, "hvg_flavor", None)
        self._record_values(data.uns["value_type"])
        self._record_genes(data.uns["gene_ids"], path)
        self._input_columns.append(data.var["input_column"].to_numpy(np.int64))  # kept genes' input columns
        return data, data.X, data.var_names.to_numpy()

    def _labelled_rows(self, path: str) -> np.ndarray | None:
        """Check ``label_key`` in ``path``'s obs: None when every cell has a label; with ``drop_unlabeled`` the rows
        to keep; else cells without a label (NaN / None / empty) are refused naming the file, key, count, examples."""
        if self.label_key is None:
            return None
        import h5py
        from anndata.io import read_elem

        with h5py.File(path, "r") as f:
            obs = read_elem(f["obs"])
        if self.label_key not in obs.columns:
            raise UserInputError(
                f"data.label_key={self.label_key!r} is not an obs column of {path} (columns: {list(obs.columns)})"
            )
        missing = unlabeled_mask(obs[self.label_key])
        n = int(missing.sum())
        if n == 0:
            return None
        examples = ", ".join(map(str, obs.index[missing][:5]))
        if n == len(obs):
            raise UserInputError(
                f"{path}: no cell has a label in obs[{self.label_key!r}] (all {n:,} are NaN / None / empty, e.g. "
                f"{examples}); point data.label_key at the column holding the cell types"
            )
        if not self.drop_unlabeled:
            raise UserInputError(
                f"{path}: {n:,} of {len(obs):,} cells have no label in obs[{self.label_key!r}] (NaN / None / empty; "
                f"e.g. {examples}); they would become a class of their own. Label them, or set "
                "data.drop_unlabeled=true to leave them out"
            )
        msg = (
            f"{path}: left out {n:,} of {len(obs):,} cells without a label in obs[{self.label_key!r}] (e.g. {examples})"
        )
        log.warning(msg)
        self.warnings.append(msg)
        return ~missing

    def _record_genes(self, report: dict, path: str | None = None) -> None:
        self.gene_id_reports.append(report)
        log.info("genes: %s", GeneIdReport(**report).summary())
        if report.get("n_duplicates"):  # only the first column of a repeated name is read: say so, not just log it
            msg = (
                f"{path or 'the input'} ({report.get('source')}): {report['n_duplicates']} gene name(s) occur in more "
                f"than one column (e.g. {'; '.join(report['duplicate_examples'][:3])}); only the first column of each "
                "is read: sum or rename them (AnnData.var_names_make_unique) to keep the others"
            )
            log.warning(msg)
            self.warnings.append(msg)

    def _record_values(self, report: dict) -> None:
        from data_modules.value_types import ValueTypeReport

        self.value_reports.append(report)
        log.info("values: %s", ValueTypeReport(**report).summary())

    def _build(self, parts) -> None:
        vocab = self._vocab
        union_ids = np.unique(np.concatenate([vocab.map_genes(list(g)).ids for _, g, _ in parts]))
        union_ids = union_ids[union_ids >= 0]
        if len(union_ids) == 0:
            n = ", ".join(f"{len(g):,} in {p}" for p, (_, g, _) in zip(self._paths(), parts, strict=True))
            raise UserInputError(
                f"none of the genes of the input ({n}) is in the vocabulary {self.vocab_path} "
                f"({len(vocab.genes):,} genes, e.g. {', '.join(vocab.genes[:3])}); use matching gene symbols "
                "(data.preprocess.gene_column)"
            )
        pos_of_id = {int(i): p for p, i in enumerate(union_ids)}
        store_parts, reports, obs_frames = [], [], []
        for path, (x, genes, obs) in zip(self._paths(), parts, strict=True):
            ids, report = prep.map_genes(genes, vocab, None if self.backed else x, where=path)
            colmap = np.array([pos_of_id.get(int(i), -1) for i in ids], dtype=np.int64)
            store_parts.append((x, colmap))
            input_cols = self._input_columns[len(store_parts) - 1]
            self._column_maps.append((input_cols[colmap >= 0], colmap[colmap >= 0]))
            reports.append(report)
            obs_frames.append(obs.copy())
        self.gene_ids = union_ids.astype(np.int64)  # (G,) vocab id of each model gene column
        self.gene_report = reports[0]
        self.gene_reports = reports
        for name, path, r in zip(("reference", "query"), self._paths(), reports, strict=False):
            if r.lost_expression_fraction >= LOST_EXPRESSION_WARNING:
                msg = (
                    f"{path}: {100 * r.lost_expression_fraction:.0f}% of the expression is in genes the vocabulary "
                    f"lacks ({r.summary()}); check the gene names (data.preprocess.gene_column, the gene_ids report)"
                )
                log.warning(msg)
                self.warnings.append(msg)
            else:
                log.info("%s: %s", name, r.summary())
        self.store = RowStore(store_parts, len(union_ids))
        obs = pd.concat(obs_frames, axis=0)
        obs.index = obs.index.astype(str)
        if not obs.index.is_unique:
            obs.index = pd.Index([f"{i}-{k}" for i, k in zip(obs.index, range(len(obs)), strict=True)])
        n_ref = store_parts[0][0].shape[0]
        is_query = np.zeros(len(obs), dtype=bool)
        is_query[n_ref:] = True
        self._encode_obs(obs, is_query)

    def _check_classes(self, labels: np.ndarray) -> None:
        """A classifier needs two classes or more; classes too small for the validation split are warned about."""
        classes, counts = np.unique(labels, return_counts=True)
        if len(classes) < 2:
            raise UserInputError(
                f"{self.path}: the cells trained on have a single class in obs[{self.label_key!r}] "
                f"({classes[0] if len(classes) else 'none'!r}, {int(counts.sum()):,} cells): annotation needs two "
                "classes or more (a classifier of one class reports accuracy 1.0 and learns nothing)"
            )
        # stratified_split: round(n * val_fraction) cells of a class go to validation, at least one stays in training
        n_val = np.minimum(np.round(counts * self.val_fraction), counts - 1)
        small = [(c, int(k)) for c, k, v in zip(classes, counts, n_val, strict=True) if v < 1 and self.val_fraction > 0]
        if small:
            shown = ", ".join(f"{c!r} ({k})" for c, k in small[:8]) + (", ..." if len(small) > 8 else "")
            msg = (
                f"{self.path}: {len(small)} of {len(classes)} classes in obs[{self.label_key!r}] have too few cells "
                f"for the validation split (data.val_fraction={self.val_fraction:g} gives them no validation cell): "
                f"{shown}; they are trained on but never validated"
            )
            log.warning(msg)
            self.warnings.append(msg)

    def _query_mask(self, obs: pd.DataFrame, is_query: np.ndarray) -> np.ndarray:
        if self.query_path is not None:
            return is_query
        if self.query_key is not None:
            if self.query_key not in obs.columns:
                raise KeyError(
                    f"data.query_key={self.query_key!r} is not an obs column of {self.path} "
                    f"(columns: {list(obs.columns)})"
                )
            values = [str(v) for v in (self.query_values or [])]
            mask = obs[self.query_key].astype(str).isin(values).to_numpy()
            if not mask.any():
                raise ValueError(f"no cell of {self.path} has obs[{self.query_key!r}] in {values}")
            return mask
        if self.query_fraction:
            strat = obs[self.label_key].astype(str).to_numpy() if self.label_key else np.zeros(len(obs), dtype=int)
            _, held = prep.stratified_split(strat, self.query_fraction, self.seed + 1)
            mask = np.zeros(len(obs), dtype=bool)
            mask[held] = True
            return mask
        return np.zeros(len(obs), dtype=bool)

    def _encode_obs(self, obs: pd.DataFrame, is_query: np.ndarray) -> None:
        for key, what in ((self.label_key, "label_key"), (self.batch_key, "batch_key")):
            if key is not None and key not in obs.columns:
                raise KeyError(
                    f"data.{what}={key!r} is not an obs column of {self.path} (columns: {list(obs.columns)})"
                )
        query = self._query_mask(obs, is_query)
        n = len(obs)
        self.labels = self.batch_labels = None
        self.label_names, self.batch_names, self.query_only_labels = [], [], []
        if self.label_key is not None:
            raw = obs[self.label_key].astype(str).to_numpy()
            pool = ~query if self.train_on == "reference" else np.ones(n, dtype=bool)
            _, self.label_names = prep.encode_categories(raw[pool])
            self.labels, _ = prep.encode_categories(raw, self.label_names)  # query-only labels -> -1
            self.query_only_labels = sorted(set(raw[self.labels < 0]))
            if self.query_only_labels:
                log.warning("labels only in the query (not learnable; counted as errors): %s", self.query_only_labels)
        if self.label_key is not None and "n_cls" in self.model_outputs:
            self._check_classes(raw[~query] if self.train_on == "reference" else raw)
        if self.batch_key is not None:
            self.batch_labels, self.batch_names = prep.encode_categories(obs[self.batch_key].astype(str).to_numpy())
        pool_idx = np.flatnonzero(~query) if self.train_on == "reference" else np.arange(n)
        strat = self.labels[pool_idx] if self.labels is not None else np.zeros(len(pool_idx), dtype=np.int64)
        tr, va = prep.stratified_split(strat, self.val_fraction, self.seed)
        split = np.full(n, "query", dtype=object)
        split[pool_idx[tr]] = "train"
        split[pool_idx[va]] = "val"
        self.split = split
        self.is_query = query
        n_val = int((split == "val").sum())
        if 0 < n_val < SMALL_VALIDATION and (self.labels is not None or self.train_on == "all"):
            msg = (
                f"the validation split of {self.path} has only {n_val} cells (< {SMALL_VALIDATION}): the checkpoint "
                "picked by a validation metric is a noisy choice; "
                + (
                    "the annotation recipes select by val/macro_f1 (a majority-class checkpoint scores lowest "
                    "there), and "
                    if "n_cls" in self.model_outputs
                    else ""
                )
                + "data.val_fraction raises the split's size (task.use_best=false evaluates the last epoch instead)"
            )
            log.warning(msg)
            self.warnings.append(msg)
        obs = obs.copy()
        obs["split"] = pd.Categorical(split, categories=list(SPLITS))
        self.obs = obs
        self.adata = ad.AnnData(
            obs=obs,
            var=pd.DataFrame({"vocab_id": self.gene_ids}, index=[self._vocab.id_to_token[i] for i in self.gene_ids]),
        )
        if self.report_path:
            self.write_report(self.report_path)

    # reports ------------------------------------------------------------------------------
    def report(self) -> dict:
        counts = pd.Series(self.split).value_counts().to_dict()
        return {
            "path": self.path,
            "query_path": self.query_path,
            "n_cells": int(len(self.split)),
            "cells_per_split": {k: int(counts.get(k, 0)) for k in SPLITS},
            "genes": [r.as_dict() for r in self.gene_reports],
            "gene_ids": self.gene_id_reports,
            "n_model_genes": int(len(self.gene_ids)),
            "hvg_flavor": getattr(self, "hvg_flavor", None),
            "values": self.value_reports,
            "labels": self.label_names,
            "query_only_labels": self.query_only_labels,
            "batches": self.batch_names,
            "warnings": getattr(self, "warnings", []),
        }

    def input_anndata(self) -> ad.AnnData:
        """The input file(s) as given, reference cells then query cells: X, layers, obs (obs_names) and var (all
        genes, in their order) untouched, plus ``layers["preprocessed"]``: the values the model and the baselines
        read (:meth:`expression`) in the columns of the model's genes, 0 elsewhere; ``var["scgpt_gene"]`` marks
        those columns and ``var["scgpt_token"]`` names the vocabulary gene each was matched as."""
        self.setup()
        parts, offset = [], 0
        tokens = np.asarray(self._vocab.id_to_token, dtype=object)[self.gene_ids]  # (G,) token of each model column
        for path, keep, (input_cols, model_cols) in zip(self._paths(), self._kept_rows, self._column_maps, strict=True):
            data = ad.read_h5ad(path)
            if keep is not None:
                data = data[keep].copy()
            rows = np.arange(offset, offset + data.n_obs)
            offset += data.n_obs
            if self.preprocess_cfg.use_raw:  # model genes were read from .raw: place them in X's columns by name
                at = pd.Index(data.var_names.astype(str)).get_indexer(data.raw.var_names.astype(str)[input_cols])
                input_cols, model_cols = at[at >= 0], model_cols[at >= 0]
            select = sp.csr_matrix(
                (np.ones(len(input_cols), dtype=np.float32), (model_cols, input_cols)),
                shape=(len(self.gene_ids), data.n_vars),
            )
            data.layers["preprocessed"] = sp.csr_matrix(self.store.rows(rows) @ select, dtype=np.float32)
            token = np.full(data.n_vars, "", dtype=object)
            token[input_cols] = tokens[model_cols]
            data.var["scgpt_gene"] = token != ""
            data.var["scgpt_token"] = token.astype(str)
            parts.append(data)
        if offset != len(self.split):
            raise RuntimeError(f"re-reading the inputs gave {offset} cells, the data module holds {len(self.split)}")
        if len(parts) == 1:
            return parts[0]
        same_genes = all(p.var_names.equals(parts[0].var_names) for p in parts[1:])
        out = ad.concat(parts, join="inner" if same_genes else "outer", merge="first", fill_value=0)
        out.var = out.var.reindex(columns=parts[0].var.columns.union(out.var.columns, sort=False))
        out.var["scgpt_gene"] = out.var["scgpt_gene"].fillna(False).astype(bool)
        out.var["scgpt_token"] = out.var["scgpt_token"].fillna("").astype(str)
        return out

    def _paths(self) -> list[str]:
        return [self.path] + ([self.query_path] if self.query_path is not None else [])

    # what scgpt_train.pipeline reads --------------------------------------------------
    def indices(self, split: str) -> np.ndarray:
        """Cell indices of ``split``: train / val / query / reference (train + val) / all / eval (query, else all)."""
        self.setup()
        if split == "all":
            return np.arange(len(self.split))
        if split == "reference":
            return np.flatnonzero(~self.is_query)
        if split == "eval":
            return np.flatnonzero(self.is_query) if self.is_query.any() else np.arange(len(self.split))
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS + ('reference', 'all', 'eval')}, got {split!r}")
        return np.flatnonzero(self.split == split)

    def expression(self, split: str = "all") -> sp.csr_matrix:
        """(cells, model genes) preprocessed expression of ``split`` (for baselines and outputs)."""
        return self.store.rows(self.indices(split))

    def cell_lengths(self, split: str) -> np.ndarray:
        """(cells of ``split``,) tokens each cell takes at this layout: ``<cls>`` + its non-zero genes (every gene
        with ``include_zero_genes``), capped at ``max_seq_len`` (from the CSR row lengths; nothing is densified)."""
        idx = self.indices(split)
        if self.include_zero_genes:
            return np.full(len(idx), min(self.store.n_genes + 1, self.layout.max_seq_len))
        genes = np.diff(self.store.rows(idx).indptr)
        return np.minimum(genes + 1, self.layout.max_seq_len)

    def sample_batch(self, split: str, n: int) -> Batch:
        """The first ``n`` cells of ``split`` as one training-style ``Batch``, tokenized deterministically in this
        process (no loader workers, no global random state touched): what the CPU epoch-time estimate times."""
        return self._collate(deterministic=True, masked=True)(self.indices(split)[:n].tolist())

    # loaders --------------------------------------------------------------------------
    def _collate(self, deterministic: bool, masked: bool) -> CellCollate:
        cfg = self.tokenizer_cfg if masked else self.tokenizer_cfg.replace(mlm_prob=None)
        return CellCollate(
            self.store,
            self.gene_ids,
            self.labels,
            self.batch_labels,
            cfg,
            self.pad_id,
            self.cls_id,
            self.include_zero_genes,
            self.seed if deterministic else None,
        )

    def loader(
        self,
        split: str,
        shuffle: bool = False,
        batch_size: int | None = None,
        deterministic: bool = True,
        masked: bool = True,
    ) -> DataLoader:
        """Cells of ``split`` as ``Batch`` es; ``masked=False`` turns MLM masking off (embeddings, predictions)."""
        idx = self.indices(split)
        if len(idx) == 0:
            raise ValueError(f"split {split!r} of {self.path} has no cells")
        return self.make_loader(idx.tolist(), self._collate(deterministic, masked), batch_size, shuffle=shuffle)

    def predict_dataloader(self) -> DataLoader:
        return self.loader("eval", masked=False)
