"""Per-modality preprocessing recipes (one config block per modality) and what they produce.

- RNA (``kind: rna``): values inspected (``data_modules/value_types.py``), normalize_total 1e4 + log1p,
  ``n_top`` (1,200) highly variable genes (seurat_v3 on counts, scanpy "seurat" without scikit-misc), bins.
- Protein (``kind: protein``): ``transform: clr`` (per cell, Seurat's margin-1 CLR ``log1p(x / g)`` with ``g``
  the geometric mean of ``1 + x`` over the cell's proteins) or ``log1p``; every protein kept; bins. Tokens are
  ``<token_prefix><name>`` (``prot:CD3``), ``strip_suffix`` removed from names (``_TotalSeqB``).
- ATAC (``kind: atac``): ``n_top`` (4,000) peaks, ``selection: accessible`` (open in the most cells) or
  ``variable`` (scanpy HVG on log1p-normalized peak counts); ``atac_values: binary`` (open = bin 1, the usual
  reading of sparse peak counts) or ``binned`` (peak counts binned per cell like expression). Peak tokens are
  ``chr1:100-600`` (names ``chr1-100-600`` / ``chr1_100_600`` are rewritten).

Bins follow the official per-cell rule (``data_modules.tokenize.binning``) for each modality separately; bins are
per-cell ranks, so normalize / log1p / CLR change the baselines' values, not the model's input. ``values: binned``
declares already binned values (used as stored, checked to be whole numbers in [0, n_bins)).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

from data_modules.config import dataclass_from_any
from data_modules.multiomic.inputs import ModalityMatrix, MultiomicInputError
from data_modules.tokenize.binning import bin_values
from data_modules.value_types import ValueTypeError, apply_steps, check_finite, detect_value_type, preprocessing_steps

log = logging.getLogger(__name__)
KINDS = ("rna", "protein", "atac")
PEAK_RE = re.compile(r"^((?:chr)?[0-9A-Za-z_.]+?)[:_-](\d+)[:_-](\d+)$")


@dataclass
class ModalityRecipe:
    kind: str  # rna | protein | atac
    key: str | None = None  # .h5mu mod key / var["feature_types"] value / protein obsm key (None = the defaults)
    layer: str | None = None  # read this layer instead of X
    values: str = "auto"  # auto (detected) | counts (required: refused otherwise) | binned (stored bins)
    normalize_total: float | None = None
    log1p: bool = False
    transform: str | None = None  # protein: clr | log1p
    n_top: int | None = None  # rna: HVGs; atac: peaks; None = every feature
    selection: str = "hvg"  # rna: hvg; atac: accessible | variable
    hvg_flavor: str = "seurat_v3"
    atac_values: str = "binary"  # binary | binned
    token_prefix: str = ""  # e.g. "prot:" for proteins
    strip_suffix: str | None = None  # removed from feature names before the prefix (e.g. "_TotalSeqB")

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"modality kind must be one of {KINDS}, got {self.kind!r}")
        if self.values not in ("auto", "counts", "binned"):
            raise ValueError(f"modality values must be auto | counts | binned, got {self.values!r}")
        if self.transform not in (None, "clr", "log1p"):
            raise ValueError(f"protein transform must be clr or log1p, got {self.transform!r}")
        if self.atac_values not in ("binary", "binned"):
            raise ValueError(f"atac_values must be binary or binned, got {self.atac_values!r}")

    @classmethod
    def from_any(cls, cfg) -> ModalityRecipe:
        return dataclass_from_any(cls, cfg, "modality recipe")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProcessedModality:
    name: str
    kind: str
    tokens: list[str]  # vocabulary token of each kept feature
    values: sp.csr_matrix  # (cells, kept features) preprocessed values (what the baselines read)
    counts: sp.csr_matrix  # (cells, kept features) stored values before preprocessing (totalVI / MultiVI)
    bins: sp.csr_matrix  # (cells, kept features) model input bins (0 = not expressed / closed)
    present: np.ndarray  # (cells,) bool
    report: dict


def peak_token(name: str, where: str) -> str:
    """``chr1:100-600`` from ``chr1:100-600`` / ``chr1-100-600`` / ``chr1_100_600``."""
    m = PEAK_RE.match(name)
    if m is None:
        raise MultiomicInputError(f"{where}: peak name {name!r} is not chrom:start-end (e.g. chr1:100-600)")
    return f"{m.group(1)}:{m.group(2)}-{m.group(3)}"


def feature_tokens(mod: ModalityMatrix, rec: ModalityRecipe) -> list[str]:
    names = list(mod.features)
    if rec.strip_suffix:
        names = [n[: -len(rec.strip_suffix)] if n.endswith(rec.strip_suffix) else n for n in names]
    if rec.kind == "atac":
        names = [peak_token(n, mod.source) for n in names]
    return [f"{rec.token_prefix}{n}" for n in names]


def clr(x: sp.csr_matrix) -> sp.csr_matrix:
    """Seurat's CLR across features per cell: log1p(x / exp(mean_j log1p(x_j))); zeros stay zero."""
    x = x.copy()
    n_feat = x.shape[1]
    log_mean = np.asarray(x.log1p().sum(axis=1)).ravel() / max(n_feat, 1)  # (N,)
    scale = np.exp(-log_mean)
    x.data = np.log1p(x.data * np.repeat(scale, np.diff(x.indptr))).astype(np.float32)
    return x


def normalize_log1p(x: sp.csr_matrix, target: float | None, log1p: bool) -> sp.csr_matrix:
    x = x.copy()
    if target:
        totals = np.asarray(x.sum(axis=1)).ravel()
        scale = np.divide(target, totals, out=np.zeros_like(totals), where=totals > 0)
        x.data = (x.data * np.repeat(scale, np.diff(x.indptr))).astype(np.float32)
    if log1p:
        x.data = np.log1p(x.data)
    return x


def _check_values(mod: ModalityMatrix, rec: ModalityRecipe, n_bins: int):
    """The value-type report of the cells that have the modality (None for stored bins); raises for NaN / inf,
    scaled values, non-counts where counts are required, and bins out of range."""
    where = f"{mod.source}"
    try:
        check_finite(mod.x, where, None, mod.features)
    except ValueTypeError as e:
        raise MultiomicInputError(f"modality {mod.name!r}: {e}") from None
    rows = mod.x[mod.present]
    if rec.values == "binned":
        data = rows.data
        if data.size and (np.any(np.mod(data, 1) != 0) or data.min() < 0 or data.max() >= n_bins):
            raise MultiomicInputError(
                f"{where}: modality {mod.name!r} is declared binned (values: binned) but holds values outside the "
                f"whole numbers 0..{n_bins - 1}"
            )
        return None
    rep = detect_value_type(rows, where, gene_names=mod.features)
    if rep.value_type == "scaled":
        raise MultiomicInputError(f"{where}: modality {mod.name!r} holds scaled values ({rep.evidence}); give counts")
    if rec.values == "counts" and rep.value_type not in ("counts", "empty"):
        raise MultiomicInputError(
            f"{where}: modality {mod.name!r} must hold raw counts (data.modalities.{mod.name}.values=counts: the HVG "
            f"selection and the totalVI / MultiVI baselines read counts) but holds {rep.value_type} values "
            f"({rep.evidence}); point data.modalities.{mod.name}.layer at the counts (e.g. layer=counts) or set "
            f"values=auto"
        )
    return rep


def _select(mod: ModalityMatrix, rec: ModalityRecipe, values: sp.csr_matrix, counts: sp.csr_matrix):
    """(kept column indices, how they were chosen)."""
    n = values.shape[1]
    if rec.n_top is None or rec.n_top >= n or rec.kind == "protein":
        return np.arange(n), "all features"
    present = mod.present
    if rec.kind == "rna":
        import anndata as ad
        import pandas as pd

        from data_modules.preprocess import select_hvg

        # genes seen in < 3 cells are no candidates (seurat_v3's loess fails on all-zero genes)
        cand = np.flatnonzero(np.asarray((counts[present] > 0).sum(axis=0)).ravel() >= 3)
        if len(cand) <= rec.n_top:
            return cand, f"all {len(cand)} genes seen in >= 3 cells (<= {rec.n_top})"
        names = pd.Index(np.asarray(mod.features)[cand]).astype(str)
        probe = ad.AnnData(X=values[present][:, cand], var=pd.DataFrame(index=names))
        probe.var_names_make_unique()
        try:
            mask, flavor = select_hvg(probe, rec.n_top, rec.hvg_flavor, counts[present][:, cand])
        except ValueError as e:  # loess ill-conditioned on tiny data: scanpy's "seurat" on the log values
            log.warning("modality %s: HVG flavor %s failed (%s); using 'seurat'", mod.name, rec.hvg_flavor, e)
            mask, flavor = select_hvg(probe, rec.n_top, "seurat", None)
        return cand[mask], f"{rec.n_top} HVGs ({flavor})"
    if rec.selection == "accessible":
        open_cells = np.asarray((counts[present] > 0).sum(axis=0)).ravel()
        keep = np.sort(np.argsort(-open_cells, kind="stable")[: rec.n_top])
        return keep, f"{rec.n_top} most accessible peaks"
    if rec.selection == "variable":
        import anndata as ad
        import scanpy as sc

        probe = ad.AnnData(X=normalize_log1p(counts[present], 1e4, True))
        table = sc.pp.highly_variable_genes(probe, n_top_genes=rec.n_top, flavor="seurat", inplace=False)
        return np.flatnonzero(np.asarray(table["highly_variable"])), f"{rec.n_top} highly variable peaks"
    raise ValueError(f"ATAC selection must be accessible or variable, got {rec.selection!r}")


def process_modality(mod: ModalityMatrix, rec: ModalityRecipe, n_bins: int, seed: int) -> ProcessedModality:
    """Check, normalize, select and bin one modality (cells without it stay empty rows)."""
    rep = _check_values(mod, rec, n_bins)
    report = {"modality": mod.name, "kind": rec.kind, "recipe": rec.as_dict()}
    report["values"] = {"value_type": "binned (stored)"} if rep is None else rep.as_dict()
    counts = mod.x
    if rec.values == "binned":
        values, bins_all = counts, counts
    elif rec.kind == "rna":
        rep.steps = preprocessing_steps(rep, rec.normalize_total, rec.log1p)
        values = apply_steps(counts.copy(), rep.steps)
        report["values"]["steps"] = rep.steps
    elif rec.kind == "protein":
        values = clr(counts) if rec.transform == "clr" else normalize_log1p(counts, None, rec.transform == "log1p")
    else:
        values = (counts > 0).astype(np.float32) if rec.atac_values == "binary" else counts
    keep, how = _select(mod, rec, values, counts)
    tokens = [feature_tokens(mod, rec)[i] for i in keep]
    values, counts = sp.csr_matrix(values[:, keep]), sp.csr_matrix(counts[:, keep])
    if rec.values == "binned":
        bins = sp.csr_matrix(bins_all[:, keep], dtype=np.float32)
    elif rec.kind == "atac" and rec.atac_values == "binary":
        bins = sp.csr_matrix((counts > 0).astype(np.float32))
    else:
        v = sp.csr_matrix(values, dtype=np.float32)
        v.eliminate_zeros()
        v.sort_indices()
        data = bin_values(v.indptr.astype(np.int64), v.data, n_bins, np.random.default_rng(seed)).astype(np.float32)
        bins = sp.csr_matrix((data, v.indices, v.indptr), shape=v.shape)
    bins.eliminate_zeros()
    bins.sort_indices()
    report.update(n_features_in=len(mod.features), n_features=len(keep), selection=how, n_cells=int(mod.present.sum()))
    log.info("modality %s: %s of %s, %s cells", mod.name, how, len(mod.features), report["n_cells"])
    return ProcessedModality(mod.name, rec.kind, tokens, values, counts, bins, mod.present, report)
