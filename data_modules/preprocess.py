"""Per-task preprocessing of an AnnData for fine-tuning: the paper's recipes as small pure functions.

- The values of X (or ``layer``, or ``.raw``) are inspected first (``data_modules/value_types.py``): raw counts,
  log1p-normalized values or other normalized values (TPM-like); the recipe's ``normalize_total`` / ``log1p``
  (defined from counts) become the steps that type needs, and scaled values or NaN / inf are refused.
- annotation: log-normalized input (the paper's files, 3,000 genes) is used as stored; counts and other normalized
  values get normalize_total 1e4 + log1p; genes mapped to the vocabulary.
- integration: normalize_total 1e4, log1p, 1,200 highly variable genes (seurat_v3 on raw counts when
  scikit-misc is installed, else scanpy's "seurat" flavor on the log data; the report says which).

Binning happens later, per batch (``data_modules.tokenize.bin_values``); bins are per-cell ranks, so
normalize_total / log1p change the baselines and the HVG choice, not the model's input bins.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_modules.config import dataclass_from_any
from data_modules.errors import UserInputError
from data_modules.value_types import (
    ValueTypeReport,
    apply_steps,
    declared_value_type,
    detect_value_type,
    preprocessing_steps,
)
from data_modules.vocab import GeneVocab, gene_table, resolve_gene_names, table_name, truncated_names

log = logging.getLogger(__name__)
UNKNOWN_LABEL = -1


@dataclass
class PreprocessConfig:
    normalize_total: float | None = None  # e.g. 1e4, from counts; None = no total normalization
    log1p: bool = False  # the recipe wants log1p values (log-normalized input is then used as stored)
    value_type: str = "auto"  # what X holds: auto (detected) | counts | log1p | normalized (value_types.py)
    layer: str | None = None  # read layers[layer] (e.g. "counts") instead of X
    n_hvg: int | None = None  # keep this many highly variable genes (None = all genes)
    hvg_flavor: str = "seurat_v3"  # seurat_v3 needs raw counts and scikit-misc; falls back to "seurat"
    counts_layer: str | None = None  # layer holding raw counts (for seurat_v3); None = X before normalization
    use_raw: bool = False  # read .raw (X and var) instead of X
    gene_column: str | None = None  # var column with the gene names; None = var_names (or a column of the right key)
    query_gene_column: str | None = None  # the query file's column when it differs from the reference's; None = same
    gene_key: str | None = None  # "symbol" | "ensembl": the key names are brought to; None = as read (set by the
    # data module from the vocabulary, or from the reference when training from scratch)
    gene_table: str | None = None  # CSV/TSV Ensembl id -> symbol; None = the shipped GENCODE v44 table
    prefer_gene_column: bool = False  # ids + a symbol column that disagree: the column decides (default: the ids)
    species: str | None = None  # the input's species (data_modules/species.py); None = detected from the gene names
    target_species: str | None = None  # the vocabulary's (set by the data module); None = no ortholog mapping

    @classmethod
    def from_any(cls, cfg) -> PreprocessConfig:
        return dataclass_from_any(cls, cfg, "preprocess")


@dataclass
class GeneReport:
    """What mapping the dataset's genes onto the vocabulary kept and lost."""

    n_genes: int
    n_in_vocab: int
    n_lost: int
    lost_examples: list[str] = field(default_factory=list)  # up to 20 lost gene names
    lost_expression_fraction: float = 0.0  # share of the total (preprocessed) expression in lost genes
    hvg_flavor: str | None = None  # the HVG flavor actually used, if any
    n_truncated: int = 0  # lost names that look cut to a fixed width (the start of a longer vocabulary gene)
    truncated_examples: list[str] = field(default_factory=list)  # "LINC0126 (LINC01262?)"

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.n_in_vocab}/{self.n_genes} genes in the vocabulary, {self.n_lost} lost "
            f"({100 * self.lost_expression_fraction:.1f}% of expression)"
            + (f", e.g. {', '.join(self.lost_examples[:5])}" if self.lost_examples else "")
            + (
                f"; {self.n_truncated} look truncated (e.g. {', '.join(self.truncated_examples[:3])}): re-export the "
                "file with full gene names"
                if self.n_truncated
                else ""
            )
        )


def as_csr32(x) -> sp.csr_matrix:
    """float32 CSR copy (sorted indices, no explicit zeros)."""
    m = sp.csr_matrix(x, dtype=np.float32, copy=True)
    m.eliminate_zeros()
    m.sort_indices()
    return m


def var_gene_names(var: pd.DataFrame, cfg: PreprocessConfig, where: str):
    """(gene names in the vocabulary's key, GeneIdReport) of an AnnData's ``var`` as the recipe reads them
    (``gene_key``, ``gene_column``, ``gene_table``, ``prefer_gene_column``, species)."""
    return resolve_gene_names(
        var,
        cfg.gene_key,
        cfg.gene_column,
        table=gene_table(cfg.gene_table) if cfg.gene_table else None,
        table_label=table_name(cfg.gene_table) if cfg.gene_table else None,
        where=where,
        prefer_column=cfg.prefer_gene_column,
        species=cfg.species,
        target_species=cfg.target_species,
    )


def read_input(adata: ad.AnnData, cfg: PreprocessConfig, where: str = "the AnnData") -> ad.AnnData:
    """In-memory copy with float32 CSR ``X`` (from ``layer`` or ``.raw`` when asked) and the gene names as
    var_names. ``var["input_column"]`` keeps each gene's column in the input (through later gene selections)."""
    if cfg.layer is not None:
        if cfg.use_raw:
            raise ValueError(
                f"{where}: data.layer={cfg.layer!r} and data.preprocess.use_raw=true both choose the matrix; keep one"
            )
        if cfg.layer not in adata.layers:
            raise KeyError(
                f"{where}: data.layer={cfg.layer!r} is not a layer (layers: {list(adata.layers)}); name one of them, "
                "or leave data.layer unset to read X"
            )
    if cfg.use_raw:
        if adata.raw is None:
            raise ValueError(f"{where}: preprocess.use_raw=true but the AnnData has no .raw; set use_raw=false")
        out = ad.AnnData(X=as_csr32(adata.raw.X), obs=adata.obs.copy(), var=adata.raw.var.copy())
    else:
        x = adata.layers[cfg.layer] if cfg.layer is not None else adata.X
        if x is None:
            raise ValueError(f"{where}: X is empty (None); write the expression into X or name a layer (data.layer)")
        out = ad.AnnData(
            X=as_csr32(x),
            obs=adata.obs.copy(),
            var=adata.var.copy(),
            layers={k: as_csr32(v) for k, v in adata.layers.items()},
        )
    if cfg.gene_column is not None and cfg.gene_column not in out.var.columns:
        raise KeyError(
            f"{where}: preprocess.gene_column={cfg.gene_column!r} is not a var column (columns: "
            f"{list(out.var.columns)}); name the column holding gene symbols / Ensembl ids, or leave it unset"
        )
    names, id_report = var_gene_names(out.var, cfg, where)
    out.var_names = names
    out.uns["gene_ids"] = id_report.as_dict()
    out.var["input_column"] = np.arange(out.n_vars, dtype=np.int64)
    out.var_names = out.var_names.astype(str)
    out.obs_names = out.obs_names.astype(str)
    if not out.var_names.is_unique:
        out.var_names_make_unique()
    return out


def matrix_name(cfg: PreprocessConfig, where: str) -> str:
    """ "ref.h5ad: X" / "ref.h5ad: layers['counts']" / "ref.h5ad: raw.X" (for reports and errors)."""
    what = f"layers[{cfg.layer!r}]" if cfg.layer is not None else "raw.X" if cfg.use_raw else "X"
    return f"{where}: {what}"


def inspect_values(data: ad.AnnData, cfg: PreprocessConfig, where: str) -> ValueTypeReport:
    """The value type of ``data.X`` (detected, or as declared by ``cfg.value_type``) with the steps the recipe's
    ``normalize_total`` / ``log1p`` need for it (``report.steps``); raises for values no step can fix."""
    source = matrix_name(cfg, where)
    names = dict(cell_names=data.obs_names, gene_names=data.var_names)
    if cfg.value_type in (None, "auto"):
        rep = detect_value_type(data.X, source, **names)
    else:
        rep = declared_value_type(data.X, cfg.value_type, source, **names)
    rep.steps = preprocessing_steps(rep, cfg.normalize_total, cfg.log1p)
    return rep


def normalize_log1p(adata: ad.AnnData, target_sum: float | None, log1p: bool) -> None:
    """Row-wise normalize_total to ``target_sum`` then log1p, in place on the CSR ``X``."""
    x = adata.X
    if target_sum is not None:
        totals = np.asarray(x.sum(axis=1)).ravel()  # (N,)
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        x.data *= np.repeat(scale, np.diff(x.indptr)).astype(np.float32)
    if log1p:
        np.log1p(x.data, out=x.data)


def select_hvg(adata: ad.AnnData, n_top: int, flavor: str, counts) -> tuple[np.ndarray, str]:
    """(n_genes,) bool mask of the ``n_top`` highly variable genes and the flavor used."""
    import scanpy as sc

    if n_top >= adata.n_vars:
        return np.ones(adata.n_vars, dtype=bool), "all"
    if flavor == "seurat_v3":
        try:
            import skmisc  # noqa: F401
        except ImportError:
            log.warning(
                "HVG flavor seurat_v3 needs scikit-misc (not installed; `make setup` installs it with the "
                "'baselines' extra); using flavor 'seurat' on log data instead"
            )
            flavor = "seurat"
    probe = ad.AnnData(X=counts if flavor == "seurat_v3" else adata.X, var=pd.DataFrame(index=adata.var_names))
    table = sc.pp.highly_variable_genes(probe, n_top_genes=n_top, flavor=flavor, inplace=False)
    return np.asarray(table["highly_variable"], dtype=bool), flavor


def map_genes(
    var_names, vocab: GeneVocab, x: sp.csr_matrix | None = None, where: str = "the input"
) -> tuple[np.ndarray, GeneReport]:
    """(n_genes,) vocab id per gene (-1 = unknown) and the report of what was lost."""
    mapping = vocab.map_genes(list(var_names))
    lost_frac = 0.0
    if x is not None and x.nnz:
        per_gene = np.asarray(x.sum(axis=0)).ravel()
        total = per_gene.sum()
        lost_frac = float(per_gene[~mapping.known].sum() / total) if total > 0 else 0.0
    truncated = truncated_names(mapping.unknown_genes, list(var_names), vocab)
    report = GeneReport(
        n_genes=len(mapping.ids),
        n_in_vocab=mapping.n_known,
        n_lost=mapping.n_unknown,
        lost_examples=mapping.unknown_genes[:20],
        lost_expression_fraction=lost_frac,
        n_truncated=len(truncated),
        truncated_examples=truncated[:10],
    )
    if mapping.n_known == 0:
        if len(mapping.ids) == 0:
            raise UserInputError(f"{where} has no genes (0 columns); point the data at a file with expression values")
        raise UserInputError(
            f"{where}: none of its {len(mapping.ids):,} genes is in the vocabulary of {len(vocab.genes):,} genes "
            f"(the file's: {', '.join(map(str, list(var_names)[:5]))}; the vocabulary's: "
            f"{', '.join(vocab.genes[:5])}); use the checkpoint's vocab.json and a var column with matching gene "
            "symbols (data.preprocess.gene_column)"
        )
    return mapping.ids, report


def normalize_and_select(
    adata: ad.AnnData, cfg: PreprocessConfig, genes: list[str] | None = None, where: str = "the AnnData"
) -> tuple[ad.AnnData, str | None]:
    """Read, bring the values to the recipe's (value type detected: :func:`inspect_values`), keep the HVGs (or the
    given ``genes``, e.g. the reference's selection for a query: genes it lacks are simply absent). Returns
    (AnnData, HVG flavor used or None); ``uns["value_type"]`` holds the value-type report as a dict."""
    data = read_input(adata, cfg, where)
    if cfg.counts_layer and cfg.counts_layer not in data.layers:
        raise KeyError(f"preprocess.counts_layer={cfg.counts_layer!r} is not a layer (layers: {list(data.layers)})")
    report = inspect_values(data, cfg, where)
    counts = data.layers[cfg.counts_layer] if cfg.counts_layer else data.X.copy()
    apply_steps(data.X, report.steps)
    flavor = None
    if genes is not None:
        shared = data.var_names.isin(genes)
        if not shared.any():
            raise UserInputError(
                f"{where}: none of its {data.n_vars:,} genes (e.g. {', '.join(data.var_names[:5])}) is among the "
                f"{len(genes):,} genes the model reads from the reference (e.g. {', '.join(map(str, genes[:5]))}); "
                "the two files name their genes differently: give the query a var column with the reference's kind "
                "of names (data.preprocess.query_gene_column)"
            )
        data = data[:, shared].copy()
    elif cfg.n_hvg is not None:
        mask, flavor = select_hvg(data, cfg.n_hvg, cfg.hvg_flavor, counts)
        data = data[:, mask].copy()
    data.layers.clear()
    data.uns["value_type"] = report.as_dict()
    return data, flavor


# labels, batches, splits -------------------------------------------------------------------
def encode_categories(values, categories: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """(N,) int64 codes; values outside ``categories`` (when given) get -1. Categories sorted if new."""
    values = pd.Series(np.asarray(values)).astype(str)
    if categories is None:
        categories = sorted(values.unique())
    codes = pd.Categorical(values, categories=categories).codes.astype(np.int64)
    return codes, list(categories)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): ``val_fraction`` of every class (rounded) goes to validation, at least one cell
    per class stays in training; classes with one cell are train-only."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    labels_perm = np.asarray(labels)[order]
    sort = np.argsort(labels_perm, kind="stable")  # shuffled within each class
    grouped = order[sort]
    classes, starts, counts = np.unique(labels_perm[sort], return_index=True, return_counts=True)
    n_val = np.minimum(np.round(counts * val_fraction).astype(np.int64), counts - 1)  # (C,)
    rank = np.arange(len(grouped)) - np.repeat(starts, counts)
    is_val = rank < np.repeat(n_val, counts)
    return np.sort(grouped[~is_val]), np.sort(grouped[is_val])
