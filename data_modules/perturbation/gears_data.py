"""Reading GEARS-format perturbation data (``perturb_processed.h5ad``).

Layout (GEARS' processed Dataverse files): ``obs["condition"]`` (``ctrl``, ``A+ctrl``, ``A+B``),
``obs["cell_type"]`` (the cell line), ``var["gene_name"]`` (gene symbols; ``var_names`` may be Ensembl ids),
``X`` log-normalized expression (log1p of library-size-normalized counts), and, in GEARS' files,
``uns["rank_genes_groups_cov_all"]`` (every gene ranked by differential expression against ``ctrl``) and
``uns["top_non_dropout_de_20"]`` (the top 20 of that ranking without dropouts), both keyed by
``obs["condition_name"]`` (``<cell_type>_<condition>_<dose>``) and holding ``var_names``.

What :func:`read_gears` checks, each failure naming the file: ``condition`` / ``cell_type`` / ``gene_name``
present, every condition name parses (:mod:`.conditions`), some cells are ``ctrl``, every perturbed gene is
in ``var["gene_name"]``, and ``X`` looks log-normalized (raw counts, negative or very large values refused).

The differential-expression genes are for EVALUATION ONLY (top-20 DE metrics); nothing in training or gene
selection may use them. When the file lacks them they are computed as GEARS computes them: scanpy's
``rank_genes_groups`` (t-test, ``rankby_abs=True``, all genes, against the ``ctrl`` cells of the same cell type,
on all cells), then GEARS' non-dropout filter (drop genes whose mean in the condition is 0 while the control
mean is not) and the first 20.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_modules.atomic import atomic_path
from data_modules.errors import UserInputError
from data_modules.perturbation.conditions import CTRL, ConditionError, check_genes_measured
from data_modules.perturbation.conditions import normalize_condition as _normalize
from data_modules.value_types import detect_value_type

log = logging.getLogger(__name__)

RANK_KEY = "rank_genes_groups_cov_all"
TOP20_KEY = "top_non_dropout_de_20"
N_TOP_DE = 20
MAX_LOG_VALUE = 20.0  # log1p of 1e8 normalized counts is 18.4: larger values are not log1p-normalized
CHECK_ROWS = 2000
DENSE_DE_LIMIT = 50_000_000  # cells x genes of one cell type below which DE runs on a dense copy


class PerturbationDataError(UserInputError):
    """Bad perturbation data; the message names the file and what is wrong."""


@dataclass
class PerturbationData:
    """A GEARS-format dataset in memory.

    ``adata``: X float32 CSR (log-normalized); ``obs["condition"]`` canonical names, ``obs["condition_raw"]`` as
    read, ``obs["cell_type"]``; ``var["gene_name"]``. ``de_ranked`` / ``top_de_20``: per non-control condition,
    gene indices (into ``var``) ranked by DE / the top-20 non-dropout DE genes - evaluation only.
    """

    adata: ad.AnnData
    source: str
    de_ranked: dict[str, np.ndarray]
    top_de_20: dict[str, np.ndarray]
    de_source: str

    @property
    def gene_names(self) -> np.ndarray:
        return self.adata.var["gene_name"].to_numpy().astype(str)

    @property
    def cell_conditions(self) -> np.ndarray:
        return self.adata.obs["condition"].to_numpy().astype(str)

    @property
    def conditions(self) -> list[str]:
        """Canonical conditions in order of first appearance (``ctrl`` included)."""
        return list(dict.fromkeys(self.cell_conditions))

    @property
    def raw_conditions(self) -> list[str]:
        """Conditions as spelled in the file, in order of first appearance (for GEARS-exact splits)."""
        return list(dict.fromkeys(self.adata.obs["condition_raw"].to_numpy().astype(str)))

    def cells(self, condition: str) -> np.ndarray:
        return np.flatnonzero(self.cell_conditions == _normalize(condition))

    @property
    def control_cells(self) -> np.ndarray:
        return np.flatnonzero(self.cell_conditions == CTRL)

    @property
    def control_mean(self) -> np.ndarray:
        """Mean expression over ALL control cells (the reference of Pearson-delta, as GEARS and scGPT compute it)."""
        return row_mean(self.adata.X, self.control_cells)

    def condition_means(self, conditions=None, cells=None) -> dict[str, np.ndarray]:
        """Per-condition mean expression; ``cells`` restricts which cells count (e.g. the training cells)."""
        labels = self.cell_conditions
        keep = np.ones(len(labels), dtype=bool) if cells is None else np.isin(np.arange(len(labels)), cells)
        wanted = self.conditions if conditions is None else [_normalize(c) for c in conditions]
        out = {}
        for c in wanted:
            idx = np.flatnonzero((labels == c) & keep)
            if idx.size == 0:
                raise KeyError(
                    f"condition {c!r} has no cells in {self.source}"
                    + (" (among the given cells)" if cells is not None else "")
                )
            out[c] = row_mean(self.adata.X, idx)
        return out


def row_mean(x, rows: np.ndarray) -> np.ndarray:
    """Mean of the selected rows of a dense or sparse matrix, float64, shape (n_genes,)."""
    sub = x[np.asarray(rows)]
    return np.asarray(sub.mean(axis=0), dtype=np.float64).ravel()


# checks -------------------------------------------------------------------------------------------------------
def check_log_normalized(x, source: str) -> None:
    """Refuse data that is not log1p-normalized: negative values (scaled data), whole numbers only (raw counts,
    :func:`data_modules.value_types.detect_value_type`, also at low depth), or values above ``MAX_LOG_VALUE``
    (normalized but not log-transformed)."""
    n = x.shape[0]
    rows = np.unique(np.linspace(0, n - 1, num=min(n, CHECK_ROWS)).astype(np.int64)) if n else np.zeros(0, np.int64)
    sub = x[rows]
    values = sub.data if sp.issparse(sub) else np.asarray(sub).ravel()
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise PerturbationDataError(f"{source}: X has NaN or infinite values")
    if values.min() < 0:
        raise PerturbationDataError(
            f"{source}: X has negative values (min {values.min():.3g}); expected log1p-normalized expression, "
            "not scaled / centred data"
        )
    # the fine-tuning path's detection (data_modules/value_types.py): whole numbers only are counts, whatever their
    # size (low-depth counts reach only a few units; log1p values of counts are never all whole numbers)
    rep = detect_value_type(sub, source)
    if rep.value_type in ("counts", "mixed"):  # mixed: counts with a few values that are not whole numbers
        raise PerturbationDataError(
            f"{source}: X looks like raw counts ({rep.evidence}; median cell total {rep.row_sum_median:.0f}); "
            "GEARS-format data must be log-normalized (scanpy: normalize_total then log1p)"
        )
    if values.max() > MAX_LOG_VALUE:
        raise PerturbationDataError(
            f"{source}: X has values up to {values.max():.3g}, too large for log1p-normalized expression "
            "(normalized but not log-transformed?)"
        )


# differential expression (evaluation only) ----------------------------------------------------------------------
def _rank_group(x, cells: np.ndarray, ctrl: np.ndarray) -> np.ndarray:
    """Genes by |mean difference| against the controls (for groups of one cell, where a t-test is undefined)."""
    diff = row_mean(x, cells) - row_mean(x, ctrl)
    return np.argsort(-np.abs(diff), kind="stable")


def compute_de(
    x, conditions: np.ndarray, cell_types: np.ndarray, source: str = "the data"
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """GEARS' DE ranking and top-20 non-dropout genes per non-control condition (gene indices).

    Per cell type: scanpy ``rank_genes_groups`` (t-test, ``rankby_abs=True``, all genes) of each condition
    against that cell type's ``ctrl`` cells. Conditions with a single cell are ranked by |mean difference|.
    Non-dropout filter (GEARS): a gene whose mean in the condition is 0 while its control mean is not is skipped.
    A condition present in several cell types is not supported (GEARS' datasets have one cell line each).
    """
    import scanpy as sc

    conditions = np.asarray(conditions).astype(str)
    cell_types = np.asarray(cell_types).astype(str)
    x = sp.csr_matrix(x) if not sp.issparse(x) else x.tocsr()
    n_genes = x.shape[1]
    ranked: dict[str, np.ndarray] = {}
    for ct in dict.fromkeys(cell_types):
        in_ct = cell_types == ct
        ctrl = np.flatnonzero(in_ct & (conditions == CTRL))
        if ctrl.size == 0:
            raise PerturbationDataError(f"{source}: cell type {ct!r} has no 'ctrl' cells to compute DE against")
        groups, counts = np.unique(conditions[in_ct & (conditions != CTRL)], return_counts=True)
        for g in groups:
            if g in ranked:
                raise PerturbationDataError(
                    f"{source}: condition {g!r} occurs in several cell types; DE per condition needs one cell type"
                )
        multi = [str(g) for g, n in zip(groups, counts, strict=True) if n >= 2]
        for g, n in zip(groups, counts, strict=True):
            if n < 2:
                ranked[str(g)] = _rank_group(x, np.flatnonzero(in_ct & (conditions == g)), ctrl)
        if multi:
            cells = np.flatnonzero(in_ct & np.isin(conditions, multi + [CTRL]))
            block = x[cells].astype(np.float32)
            if block.shape[0] * block.shape[1] <= DENSE_DE_LIMIT:
                block = block.toarray()  # scanpy's dense statistics are much faster than its sparse (numba) path
            sub = ad.AnnData(
                X=block,
                obs=pd.DataFrame(
                    {"group": pd.Categorical(conditions[cells])}, index=[str(i) for i in range(len(cells))]
                ),
                var=pd.DataFrame(index=[str(i) for i in range(n_genes)]),
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sc.tl.rank_genes_groups(
                    sub, groupby="group", groups=multi, reference=CTRL, rankby_abs=True, n_genes=n_genes,
                    use_raw=False, method="t-test",
                )  # fmt: skip
            names = sub.uns["rank_genes_groups"]["names"]
            for g in multi:
                ranked[g] = np.asarray(names[g]).astype(np.int64)
    ctrl_mean = row_mean(x, np.flatnonzero(conditions == CTRL))
    top20 = {g: top_non_dropout(r, row_mean(x, np.flatnonzero(conditions == g)), ctrl_mean) for g, r in ranked.items()}
    return ranked, top20


def top_non_dropout(ranked: np.ndarray, condition_mean: np.ndarray, ctrl_mean: np.ndarray, n: int = N_TOP_DE):
    """GEARS' filter: the first ``n`` ranked genes that are not dropouts (mean 0 in the condition, not in ctrl)."""
    keep = (condition_mean != 0) | (ctrl_mean == 0)
    ranked = np.asarray(ranked, dtype=np.int64)
    return ranked[keep[ranked]][:n]


def _uns_key_to_condition(key: str, name_map: dict[str, str], cell_types: list[str]) -> str | None:
    if key in name_map:
        return name_map[key]
    for ct in sorted(cell_types, key=len, reverse=True):  # "<cell_type>_<condition>_<dose>"
        if key.startswith(f"{ct}_") and "_" in key[len(ct) + 1 :]:
            try:
                return _normalize(key[len(ct) + 1 :].rsplit("_", 1)[0])
            except ConditionError:
                return None
    try:
        return _normalize(key)
    except ConditionError:
        return None


def _de_from_uns(adata: ad.AnnData, conditions: np.ndarray, source: str):
    """DE rankings stored in the file -> gene indices per canonical condition (None if absent)."""
    if RANK_KEY not in adata.uns or TOP20_KEY not in adata.uns:
        return None
    name_map: dict[str, str] = {}
    if "condition_name" in adata.obs:
        name_map = dict(zip(adata.obs["condition_name"].astype(str), conditions, strict=True))
    cell_types = list(dict.fromkeys(adata.obs["cell_type"].astype(str)))
    by_id = {v: i for i, v in enumerate(adata.var_names.astype(str))}
    by_name = {v: i for i, v in enumerate(adata.var["gene_name"].astype(str))}

    def indices(key, genes):
        out = []
        for gene in np.asarray(genes).astype(str):
            i = by_id.get(gene, by_name.get(gene))
            if i is None:
                raise PerturbationDataError(f"{source}: uns[{key!r}] names gene {gene!r}, which is not in var")
            out.append(i)
        return np.asarray(out, dtype=np.int64)

    result = []
    for key in (RANK_KEY, TOP20_KEY):
        table = {}
        for k, genes in adata.uns[key].items():
            cond = _uns_key_to_condition(str(k), name_map, cell_types)
            if cond is None or cond == CTRL:
                continue
            if cond in table:
                raise PerturbationDataError(f"{source}: uns[{key!r}] has two entries for condition {cond!r}")
            table[cond] = indices(key, genes)
        result.append(table)
    return result[0], result[1]


# reading --------------------------------------------------------------------------------------------------------
def from_anndata(adata: ad.AnnData, source: str = "<in-memory AnnData>", compute_missing_de: bool = True):
    """Validate a GEARS-format AnnData and return :class:`PerturbationData` (X copied to float32 CSR)."""
    for where, key in (("obs", "condition"), ("obs", "cell_type"), ("var", "gene_name")):
        if key not in getattr(adata, where):
            raise PerturbationDataError(f"{source}: {where} has no {key!r} column (GEARS format needs it)")
    raw = adata.obs["condition"].astype(str).to_numpy()
    canonical = {}
    for r in dict.fromkeys(raw):
        try:
            canonical[r] = _normalize(r)
        except ConditionError as e:
            raise PerturbationDataError(f"{source}: {e}") from None
    conditions = np.asarray([canonical[r] for r in raw], dtype=object)
    if not np.any(conditions == CTRL):
        raise PerturbationDataError(
            f"{source}: no 'ctrl' cells (obs['condition'] == 'ctrl'); control cells are needed as inputs and reference"
        )
    gene_names = adata.var["gene_name"].astype(str).to_numpy()
    try:
        check_genes_measured(canonical.values(), gene_names, source)
    except ConditionError as e:
        raise PerturbationDataError(str(e)) from None
    check_log_normalized(adata.X, source)

    x = sp.csr_matrix(adata.X, dtype=np.float32)
    obs = pd.DataFrame(
        {
            "condition": conditions.astype(str),
            "condition_raw": raw,
            "cell_type": adata.obs["cell_type"].astype(str).to_numpy(),
        },
        index=adata.obs_names.astype(str),
    )
    for col in ("condition_name", "dose_val", "control"):
        if col in adata.obs:
            obs[col] = adata.obs[col].to_numpy()
    var = pd.DataFrame({"gene_name": gene_names}, index=adata.var_names.astype(str))
    clean = ad.AnnData(X=x, obs=obs, var=var)

    stored = _de_from_uns(adata, conditions, source)
    wanted = [c for c in dict.fromkeys(conditions) if c != CTRL]
    if stored is not None:
        ranked, top20 = stored
        missing = [c for c in wanted if c not in ranked or c not in top20]
        de_source = "file"
    else:
        ranked, top20, missing, de_source = {}, {}, wanted, "computed"
    if missing:
        if not compute_missing_de:
            raise PerturbationDataError(f"{source}: no DE genes for {len(missing)} conditions, e.g. {missing[0]!r}")
        if stored is not None:
            log.warning(
                "%s: uns lacks DE genes for %d conditions (e.g. %s); computing them", source, len(missing), missing[0]
            )
            de_source = "file+computed"
        keep = np.isin(conditions, missing + [CTRL])
        r2, t2 = compute_de(x[keep], conditions[keep], obs["cell_type"].to_numpy()[keep], source)
        ranked.update(r2)
        top20.update(t2)
    ranked = {c: ranked[c] for c in wanted}
    top20 = {c: top20[c] for c in wanted}
    return PerturbationData(adata=clean, source=source, de_ranked=ranked, top_de_20=top20, de_source=de_source)


def read_gears(path: str | os.PathLike, compute_missing_de: bool = True) -> PerturbationData:
    """Read and validate a GEARS ``perturb_processed.h5ad`` (see the module docstring for the checks)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GEARS data file not found: {path}")
    return from_anndata(ad.read_h5ad(path), source=str(path), compute_missing_de=compute_missing_de)


# writing (GEARS layout) -----------------------------------------------------------------------------------------
def gears_condition_name(cell_type: str, condition: str) -> str:
    """GEARS' ``condition_name``: ``<cell_type>_<condition>_<dose>`` (dose ``1+1`` for ``A+ctrl`` and ``A+B``)."""
    return f"{cell_type}_{condition}_{'1+1' if len(condition.split('+')) == 2 else '1'}"


def to_gears_anndata(
    x, conditions, gene_names, cell_type: str, uns: dict | None = None, obs_extra: dict | None = None
) -> ad.AnnData:
    """A GEARS-layout AnnData: obs condition / cell_type / condition_name / dose_val / control, var gene_name
    (also the index), and the two DE tables in ``uns`` computed as GEARS computes them."""
    conditions = np.asarray([_normalize(c) for c in conditions], dtype=object).astype(str)
    x = sp.csr_matrix(x, dtype=np.float32)
    names = np.array([gears_condition_name(cell_type, c) for c in conditions], dtype=object).astype(str)
    obs = pd.DataFrame(
        {
            "condition": conditions,
            "cell_type": cell_type,
            "condition_name": names,
            "dose_val": ["1+1" if len(c.split("+")) == 2 else "1" for c in conditions],
            "control": (conditions == CTRL).astype(np.int64),
            **(obs_extra or {}),
        },
        index=[f"cell{i}" for i in range(len(conditions))],
    )
    gene_names = np.asarray(gene_names).astype(str)
    var = pd.DataFrame({"gene_name": gene_names}, index=gene_names)
    ranked, top20 = compute_de(x, conditions, np.full(len(conditions), cell_type))
    name_of = dict(zip(conditions, names, strict=True))
    out_uns = dict(uns or {})
    out_uns[RANK_KEY] = {name_of[c]: gene_names[r] for c, r in ranked.items()}
    out_uns[TOP20_KEY] = {name_of[c]: gene_names[t] for c, t in top20.items()}
    return ad.AnnData(X=x, obs=obs, var=var, uns=out_uns)


def write_h5ad_atomic(adata: ad.AnnData, path: str | os.PathLike) -> Path:
    with atomic_path(path, ".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return Path(path)
