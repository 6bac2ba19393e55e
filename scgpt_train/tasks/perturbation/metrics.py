"""Perturbation-response metrics, one function each, on per-condition mean expression profiles.

Inputs are mappings ``condition -> (n_genes,) profile``: ``pred`` (the method's mean prediction for the
condition) and ``true`` (the mean of the real perturbed cells). Each metric scores every condition of ``true``
(a condition missing from ``pred`` raises) and returns ``{condition: score}``; :func:`mean_over_conditions`
averages them with equal weight per condition (GEARS / scGPT average over conditions, not cells).

Definitions (GEARS / scGPT ``compute_perturbation_metrics`` unless said otherwise):

- ``pearson``: Pearson r of pred vs true over all genes; ``de_genes`` restricts to each condition's top-20 DE
  genes (``pearson_de``).
- ``pearson_delta``: Pearson r of ``pred - ctrl_mean`` vs ``true - ctrl_mean``, ``ctrl_mean`` the mean over
  ALL control cells of the dataset; on the top-20 DE genes: ``pearson_de_delta``.
- ``mse``: mean squared error (on the top-20 DE genes with ``de_genes``).
- ``direction_of_change``: share of the top-20 DE genes whose predicted change against ``ctrl_mean`` has the
  sign of the true change (a gene with no change matches only no change).
- ``pearson_delta_top_expressed``: Pearson-delta on the ``n`` (1,000) genes with the highest control mean.
- Systema (Vinas Torne et al. 2025): ``pearson_delta`` with the *perturbed centroid* as reference (the mean of
  the training perturbations' mean profiles, ``ctrl`` excluded: :func:`perturbed_centroid`), which removes the
  systematic perturbed-vs-control shift that inflates plain Pearson-delta; and ``centroid_accuracy``: for each
  condition, the share of the OTHER conditions' true profiles that are farther (Euclidean) from its prediction
  than its own true profile (1 = its own profile is the nearest; ties count as not farther).

NaN policy: a correlation is undefined - NaN for that condition - when either vector is constant (a "no change"
prediction has a zero delta everywhere) or has fewer than two genes; centroid accuracy is NaN with fewer than two
conditions. :func:`mean_over_conditions` then OMITS NaN conditions by default (``nan_policy="omit"``) and
:func:`summarize` reports how many were omitted (``n_nan/<metric>``); ``"zero"`` scores them 0 and
``"propagate"`` returns NaN if any is NaN (what ``numpy.mean`` does in the GEARS / scGPT code). A mean over no
defined value is NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

Profiles = Mapping[str, np.ndarray]
NAN_POLICIES = ("omit", "zero", "propagate")
N_TOP_EXPRESSED = 1000


def pearson(a, b) -> float:
    """Pearson r of two vectors; NaN when either is constant or shorter than 2."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"vectors differ in length: {a.shape} vs {b.shape}")
    if a.size < 2:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    na, nb = np.sqrt(np.dot(da, da)), np.sqrt(np.dot(db, db))
    scale = max(np.abs(a).max(), np.abs(b).max(), 1.0)
    if na <= 1e-12 * scale * np.sqrt(a.size) or nb <= 1e-12 * scale * np.sqrt(a.size):
        return float("nan")
    return float(np.clip(np.dot(da, db) / (na * nb), -1.0, 1.0))


def _pairs(pred: Profiles, true: Profiles):
    for cond, t in true.items():
        if cond not in pred:
            raise KeyError(f"no prediction for condition {cond!r}")
        p = np.asarray(pred[cond], dtype=np.float64).ravel()
        t = np.asarray(t, dtype=np.float64).ravel()
        if p.shape != t.shape:
            raise ValueError(f"condition {cond!r}: prediction has {p.size} genes, truth {t.size}")
        yield cond, p, t


def _genes(cond: str, de_genes: Mapping[str, np.ndarray] | None):
    if de_genes is None:
        return slice(None)
    if cond not in de_genes:
        raise KeyError(f"no DE genes for condition {cond!r}")
    return np.asarray(de_genes[cond], dtype=np.int64)


def pearson_per_condition(pred: Profiles, true: Profiles, de_genes=None) -> dict[str, float]:
    """Pearson r of the predicted vs true mean profile per condition (all genes, or its DE genes)."""
    return {c: pearson(p[_genes(c, de_genes)], t[_genes(c, de_genes)]) for c, p, t in _pairs(pred, true)}


def pearson_delta(pred: Profiles, true: Profiles, reference, de_genes=None) -> dict[str, float]:
    """Pearson r of ``pred - reference`` vs ``true - reference`` per condition (``reference``: the control mean
    for Pearson-delta, the perturbed centroid for Systema's variant)."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    out = {}
    for c, p, t in _pairs(pred, true):
        g = _genes(c, de_genes)
        out[c] = pearson((p - ref)[g], (t - ref)[g])
    return out


def mse(pred: Profiles, true: Profiles, de_genes=None) -> dict[str, float]:
    """Mean squared error per condition (all genes, or its DE genes)."""
    out = {}
    for c, p, t in _pairs(pred, true):
        g = _genes(c, de_genes)
        out[c] = float(np.mean((p[g] - t[g]) ** 2))
    return out


def direction_of_change(pred: Profiles, true: Profiles, ctrl_mean, de_genes) -> dict[str, float]:
    """Share of each condition's DE genes whose predicted change vs ``ctrl_mean`` has the true change's sign."""
    ref = np.asarray(ctrl_mean, dtype=np.float64).ravel()
    out = {}
    for c, p, t in _pairs(pred, true):
        g = _genes(c, de_genes)
        same = np.sign((p - ref)[g]) == np.sign((t - ref)[g])
        out[c] = float(np.mean(same)) if same.size else float("nan")
    return out


def top_expressed_genes(ctrl_mean, n: int = N_TOP_EXPRESSED) -> np.ndarray:
    """Indices of the ``n`` genes with the highest control mean (all genes if fewer; ties by index)."""
    ctrl_mean = np.asarray(ctrl_mean, dtype=np.float64).ravel()
    return np.sort(np.argsort(-ctrl_mean, kind="stable")[:n])


def pearson_delta_top_expressed(pred: Profiles, true: Profiles, ctrl_mean, n: int = N_TOP_EXPRESSED):
    """Pearson-delta on the ``n`` most expressed control genes, per condition."""
    genes = top_expressed_genes(ctrl_mean, n)
    return pearson_delta(pred, true, ctrl_mean, de_genes={c: genes for c in true})


def perturbed_centroid(train_means: Profiles, ctrl: str = "ctrl") -> np.ndarray:
    """Systema's reference: the unweighted mean of the training perturbations' mean profiles (``ctrl`` excluded)."""
    profiles = [np.asarray(v, dtype=np.float64).ravel() for c, v in train_means.items() if c != ctrl]
    if not profiles:
        raise ValueError("no perturbed training condition to build the perturbed centroid from")
    return np.mean(profiles, axis=0)


def pearson_delta_perturbed_centroid(pred: Profiles, true: Profiles, train_means: Profiles, de_genes=None):
    """Systema's Pearson-delta: the change against the perturbed centroid of the training perturbations."""
    return pearson_delta(pred, true, perturbed_centroid(train_means), de_genes)


def centroid_accuracy(pred: Profiles, true: Profiles, genes=None) -> dict[str, float]:
    """Systema's centroid accuracy per condition: the share of the other conditions' true profiles farther
    (Euclidean, on ``genes`` or all genes) from the condition's prediction than its own true profile."""
    conds = list(true)
    g = slice(None) if genes is None else np.asarray(genes, dtype=np.int64)
    t = np.stack([np.asarray(true[c], dtype=np.float64).ravel()[g] for c in conds]) if conds else np.zeros((0, 0))
    out = {}
    for i, (c, p, _) in enumerate(_pairs(pred, true)):
        if len(conds) < 2:
            out[c] = float("nan")
            continue
        d = np.sqrt(((t - p[g]) ** 2).sum(axis=1))
        out[c] = float(np.sum(np.delete(d, i) > d[i]) / (len(conds) - 1))
    return out


def mean_over_conditions(scores: Mapping[str, float], nan_policy: str = "omit") -> float:
    """Unweighted mean over conditions; NaN entries omitted / scored 0 / propagated (see the module docstring)."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    v = np.asarray(list(scores.values()), dtype=np.float64)
    if v.size == 0:
        return float("nan")
    if nan_policy == "propagate":
        return float(v.mean())
    if nan_policy == "zero":
        return float(np.where(np.isnan(v), 0.0, v).mean())
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def subgroup_means(
    scores: Mapping[str, float], subgroups: Mapping[str, Sequence[str]], nan_policy: str = "omit"
) -> dict[str, float]:
    """GEARS subgroup analysis: the mean score over the conditions of each subgroup (NaN for an empty one)."""
    return {
        name: mean_over_conditions({c: scores[c] for c in members if c in scores}, nan_policy)
        for name, members in subgroups.items()
    }


METRICS = (
    "pearson",
    "pearson_de",
    "pearson_delta",
    "pearson_de_delta",
    "mse_de",
    "direction_de",
    "pearson_delta_top1000",
    "pearson_delta_pc",
    "pearson_de_delta_pc",
    "centroid_accuracy",
)


def per_condition_table(
    pred: Profiles,
    true: Profiles,
    ctrl_mean,
    de_genes: Mapping[str, np.ndarray],
    train_means: Profiles | None = None,
    n_top_expressed: int = N_TOP_EXPRESSED,
) -> pd.DataFrame:
    """Every metric per condition (rows: the conditions of ``true``); Systema's columns need ``train_means``."""
    cols = {
        "pearson": pearson_per_condition(pred, true),
        "pearson_de": pearson_per_condition(pred, true, de_genes),
        "pearson_delta": pearson_delta(pred, true, ctrl_mean),
        "pearson_de_delta": pearson_delta(pred, true, ctrl_mean, de_genes),
        "mse_de": mse(pred, true, de_genes),
        "direction_de": direction_of_change(pred, true, ctrl_mean, de_genes),
        "pearson_delta_top1000": pearson_delta_top_expressed(pred, true, ctrl_mean, n_top_expressed),
        "centroid_accuracy": centroid_accuracy(pred, true),
    }
    if train_means is not None:
        cols["pearson_delta_pc"] = pearson_delta_perturbed_centroid(pred, true, train_means)
        cols["pearson_de_delta_pc"] = pearson_delta_perturbed_centroid(pred, true, train_means, de_genes)
    table = pd.DataFrame(cols, index=pd.Index(list(true), name="condition"))
    return table[[m for m in METRICS if m in table.columns]]


def summarize(
    table: pd.DataFrame, subgroups: Mapping[str, Sequence[str]] | None = None, nan_policy: str = "omit"
) -> dict[str, float]:
    """Means over conditions of every column of :func:`per_condition_table`, NaN counts (``n_nan/<metric>``),
    the number of conditions, and with ``subgroups`` the per-subgroup means (``<subgroup>/<metric>``)."""
    out: dict[str, float] = {"n_conditions": float(len(table))}
    for m in table.columns:
        scores = table[m].to_dict()
        out[m] = mean_over_conditions(scores, nan_policy)
        out[f"n_nan/{m}"] = float(table[m].isna().sum())
        for name, value in subgroup_means(scores, subgroups or {}, nan_policy).items():
            out[f"{name}/{m}"] = value
    return out
