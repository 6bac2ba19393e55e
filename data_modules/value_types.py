"""What the values of an expression matrix are, and the steps that bring them to what a recipe wants.

An h5ad's X (or the layer a user picks, ``data.layer=counts``) holds one of:

- ``counts``: raw counts, non-negative whole numbers;
- ``log1p``: log1p of (usually total-normalized) counts, non-negative, non-integer, never above
  ``LOG1P_MAX`` (log1p(1e13));
- ``normalized``: other non-negative non-integer values: rows that all sum to one constant (CPM / TPM-like rows
  summing to ~1e4, 1e5, 1e6), or values too large to be log1p values;
- ``mixed``: whole numbers but for a few values (at least ``MOSTLY_WHOLE`` of the non-zero values are whole numbers):
  raw counts with damaged entries, or counts pasted beside other values. Log1p or normalized values are whole
  numbers only by coincidence, so these are not read as log values (a silent wrong result): refused naming the
  first such cell and gene, unless a user declares ``data.preprocess.value_type``;
- ``scaled``: negative values (z-scored, regressed or batch-corrected data): no recipe can turn them back into
  expression, so they are refused;
- ``empty``: no non-zero value at all.

NaN / inf are refused naming the cell and the gene. :func:`detect_value_type` says which, with the evidence;
:func:`preprocessing_steps` turns a recipe's ``normalize_total`` / ``log1p`` (defined from counts, as the
paper's recipes are) into the steps for the detected type; :func:`apply_steps` runs them on a CSR matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp

from data_modules.errors import UserInputError

VALUE_TYPES = ("counts", "log1p", "normalized")  # what a user may declare with data.preprocess.value_type
LOG1P_MAX = 30.0  # log1p values above this would come from values > 1e13: not log data
MOSTLY_WHOLE = 0.95  # this share of whole-number non-zero values (but not all): counts with a few damaged values
CONSTANT_SPREAD = 0.01  # rows "sum to one constant" when their 5th-95th percentile spread is < 1% of the median


class ValueTypeError(UserInputError):
    """Values a recipe cannot use (NaN / inf, negative values, a declared type the data contradicts)."""


@dataclass
class ValueTypeReport:
    """What a matrix holds and how it was told apart (written into data_report.json under ``values``)."""

    value_type: str  # counts | log1p | normalized | mixed | scaled | empty
    source: str  # which matrix of which file: "ref.h5ad: X", "q.h5ad: layers['counts']"
    declared: bool = False  # given by data.preprocess.value_type, not detected
    n_cells: int = 0
    n_values: int = 0  # stored non-zero values inspected
    min_value: float = 0.0
    max_value: float = 0.0
    integer_fraction: float = 0.0  # share of the non-zero values that are whole numbers
    row_sum_median: float = 0.0
    row_sum_spread: float = 0.0  # (95th - 5th percentile) / median of the cells' sums
    expm1_row_sum_median: float | None = None  # log1p: the cells' sums of expm1(values)
    expm1_row_sum_spread: float | None = None
    normalized_to: float | None = None  # the constant the rows (log1p: the rows after expm1) sum to, if any
    evidence: str = ""
    steps: list[str] = field(default_factory=list)  # what preprocessing did with the values

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        what = {
            "counts": "raw counts",
            "log1p": "log1p-normalized values",
            "normalized": "normalized (non-log) values",
            "scaled": "scaled values (negative entries)",
            "empty": "no non-zero values",
        }[self.value_type]
        how = "declared (data.preprocess.value_type)" if self.declared else self.evidence
        done = ", ".join(self.steps) if self.steps else "used as stored"
        return f"{self.source}: {what} ({how}); preprocessing: {done}"


def _spread(sums: np.ndarray) -> tuple[float, float]:
    """(median, (p95 - p5) / median) of the positive row sums."""
    pos = sums[sums > 0]
    if len(pos) == 0:
        return 0.0, 0.0
    lo, med, hi = np.percentile(pos, [5, 50, 95])
    return float(med), float((hi - lo) / med) if med > 0 else 0.0


def _round_constant(value: float) -> float:
    """1e4-ish sums as 10000.0 (3 significant digits)."""
    return float(f"{value:.3g}")


def check_finite(
    x: sp.csr_matrix,
    source: str,
    cell_names: Sequence[str] | None = None,
    gene_names: Sequence[str] | None = None,
) -> None:
    """Refuse NaN / inf, naming the first offending cell and gene."""
    bad = ~np.isfinite(x.data)
    if not bad.any():
        return
    p = int(np.argmax(bad))
    row = int(np.searchsorted(x.indptr, p, side="right") - 1)
    col = int(x.indices[p])
    cell = repr(str(cell_names[row])) if cell_names is not None else f"row {row}"
    gene = repr(str(gene_names[col])) if gene_names is not None else f"column {col}"
    raise ValueTypeError(
        f"{source}: NaN or infinite value {x.data[p]!r} at cell {cell} (row {row}), gene {gene} "
        f"({int(bad.sum())} such values); expression values are never NaN/inf: fix the matrix upstream or drop the "
        "affected cells"
    )


def _first_at(x: sp.csr_matrix, where: np.ndarray, cell_names, gene_names) -> str:
    """``VALUE at cell 'NAME', gene 'NAME'`` of the first stored value of ``x`` that ``where`` marks."""
    p = int(np.argmax(where))
    row = int(np.searchsorted(x.indptr, p, side="right") - 1)
    cell = repr(str(cell_names[row])) if cell_names is not None else f"row {row}"
    gene = repr(str(gene_names[x.indices[p]])) if gene_names is not None else f"column {int(x.indices[p])}"
    return f"{float(x.data[p]):.4g} at cell {cell}, gene {gene}"


def detect_value_type(
    x,
    source: str = "X",
    cell_names: Sequence[str] | None = None,
    gene_names: Sequence[str] | None = None,
) -> ValueTypeReport:
    """What ``x`` (cells x genes, dense or sparse) holds; raises :class:`ValueTypeError` for NaN / inf."""
    x = sp.csr_matrix(x)
    check_finite(x, source, cell_names, gene_names)
    data = x.data
    rep = ValueTypeReport(value_type="empty", source=source, n_cells=int(x.shape[0]))
    data = data[data != 0]
    rep.n_values = int(data.size)
    if data.size == 0:
        rep.evidence = "X holds no non-zero value"
        return rep
    rep.min_value, rep.max_value = float(data.min()), float(data.max())
    rep.integer_fraction = float(np.mean(np.mod(data, 1) == 0))
    sums = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    rep.row_sum_median, rep.row_sum_spread = _spread(sums)
    if rep.min_value < 0:
        rep.value_type = "scaled"
        rep.evidence = f"{int((data < 0).sum())} negative values, min {rep.min_value:.3g}, e.g. " + _first_at(
            x, x.data < 0, cell_names, gene_names
        )
    elif rep.integer_fraction == 1.0:
        rep.value_type = "counts"
        rep.evidence = f"all {rep.n_values} non-zero values are whole numbers, max {rep.max_value:.0f}"
    elif rep.integer_fraction >= MOSTLY_WHOLE:
        rep.value_type = "mixed"
        fractional = np.mod(x.data, 1) != 0
        n_frac = int(fractional.sum())
        rep.evidence = (
            f"{rep.n_values - n_frac} of {rep.n_values} non-zero values are whole numbers (raw counts?) but {n_frac} "
            f"are not, e.g. {_first_at(x, fractional, cell_names, gene_names)}"
        )
    elif rep.row_sum_spread < CONSTANT_SPREAD:
        rep.value_type = "normalized"
        rep.normalized_to = _round_constant(rep.row_sum_median)
        rep.evidence = f"non-integer values; every cell sums to ~{rep.normalized_to:.3g}"
    elif rep.max_value <= LOG1P_MAX:
        rep.value_type = "log1p"
        e = x.copy().astype(np.float64)
        np.expm1(e.data, out=e.data)
        rep.expm1_row_sum_median, rep.expm1_row_sum_spread = _spread(np.asarray(e.sum(axis=1)).ravel())
        if rep.expm1_row_sum_spread < CONSTANT_SPREAD:
            rep.normalized_to = _round_constant(rep.expm1_row_sum_median)
        rep.evidence = f"non-integer values between {rep.min_value:.3g} and {rep.max_value:.3g} (<= {LOG1P_MAX:g})" + (
            f"; expm1 of every cell sums to ~{rep.normalized_to:.3g}" if rep.normalized_to else ""
        )
    else:
        rep.value_type = "normalized"
        rep.evidence = (
            f"non-integer values up to {rep.max_value:.3g} (too large for log1p values); cell sums vary "
            f"(median {rep.row_sum_median:.3g})"
        )
    return rep


def declared_value_type(
    x,
    value_type: str,
    source: str = "X",
    cell_names: Sequence[str] | None = None,
    gene_names: Sequence[str] | None = None,
) -> ValueTypeReport:
    """The report for a type the user declared (``data.preprocess.value_type``), refused where the data
    plainly contradicts it (negative values, non-integer "counts", "log1p" values above ``LOG1P_MAX``)."""
    if value_type not in VALUE_TYPES:
        raise ValueTypeError(f"data.preprocess.value_type must be auto or one of {VALUE_TYPES}, got {value_type!r}")
    rep = detect_value_type(x, source, cell_names, gene_names)
    detected = rep.value_type
    contradiction = (
        detected == "scaled"
        or (value_type == "counts" and rep.n_values and rep.integer_fraction < 1.0)
        or (value_type == "log1p" and rep.max_value > LOG1P_MAX)
    )
    if contradiction:
        raise ValueTypeError(
            f"{source}: data.preprocess.value_type={value_type} but the values say otherwise: {rep.evidence}; "
            "set data.preprocess.value_type=auto to use what the values are, or point data.layer at the matrix "
            f"holding {value_type}"
        )
    rep.value_type, rep.declared = value_type, True
    return rep


def preprocessing_steps(rep: ValueTypeReport, normalize_total: float | None, log1p: bool) -> list[str]:
    """Steps that turn ``rep``'s values into what a recipe wants.

    The recipe's ``normalize_total`` / ``log1p`` are defined from counts (the paper's recipes). Counts and other
    normalized values get them as they are. Log1p values are what a log1p recipe wants: used as stored, except
    that values whose expm1 sums to another constant than the recipe's ``normalize_total`` are expm1'd, normalized
    and log1p'd again; a recipe without log1p but with ``normalize_total`` gets them expm1'd then normalized.
    Scaled values cannot be brought back: :class:`ValueTypeError`, naming the fixes.
    """
    kind = rep.value_type
    if kind == "scaled":
        raise ValueTypeError(
            f"{rep.source}: holds scaled values ({rep.evidence}), e.g. z-scores after sc.pp.scale or regressed / "
            "batch-corrected data; they cannot be turned back into expression. Point the data at counts or "
            "log-normalized values: data.layer=counts (a layer holding counts), data.preprocess.use_raw=true (.raw), "
            "or write them into X"
        )
    if kind == "mixed":
        raise ValueTypeError(
            f"{rep.source}: looks like raw counts with values that are not whole numbers ({rep.evidence}); read as "
            "log-normalized values they would be a silent wrong input. Fix those values (re-export the counts), "
            "point data.layer at the counts, or declare data.preprocess.value_type=log1p / normalized if that is "
            "what the values are"
        )
    if kind == "empty":
        return []
    norm = [f"normalize_total {normalize_total:g}"] if normalize_total else []
    if kind in ("counts", "normalized"):
        return norm + (["log1p"] if log1p else [])
    # log1p values
    if log1p:
        rescale = (
            normalize_total
            and rep.normalized_to is not None
            and abs(rep.normalized_to - normalize_total) > CONSTANT_SPREAD * normalize_total
        )
        return ["expm1", *norm, "log1p"] if rescale else []
    return ["expm1", *norm] if normalize_total else []


def apply_steps(x: sp.csr_matrix, steps: Sequence[str]) -> sp.csr_matrix:
    """Run ``steps`` (from :func:`preprocessing_steps`) on the float CSR ``x`` in place; returns it."""
    for step in steps:
        if step == "expm1":
            np.expm1(x.data, out=x.data)
        elif step == "log1p":
            np.log1p(x.data, out=x.data)
        elif step.startswith("normalize_total "):
            target = float(step.split()[1])
            totals = np.asarray(x.sum(axis=1)).ravel()  # (N,) in x's dtype, as preprocess.normalize_log1p
            scale = np.divide(target, totals, out=np.zeros_like(totals), where=totals > 0)
            x.data *= np.repeat(scale, np.diff(x.indptr)).astype(x.data.dtype)
        else:
            raise ValueError(f"unknown preprocessing step {step!r}")
    return x
