"""Perturbation-response baselines that independent evaluations found to match or beat the deep models.

Every baseline sees only :class:`TrainingProfiles`, built by :func:`training_profiles` from the cells of the
TRAINING conditions alone (the matrix is sliced to those cells before anything is computed), so no baseline can
see validation or test data. Each returns ``{condition: predicted mean profile}`` for the requested conditions.

- ``no_change``: the mean of the training control cells.
- ``train_mean``: the mean of the training perturbations' mean profiles (each condition weighs the same).
- ``non_control_mean``: the mean of all training perturbed cells (each cell weighs the same).
- ``additive``: ``ctrl + sum of the single-gene changes`` with each single's change taken from the training
  singles; a gene whose single is not in training contributes the train-mean change instead
  (``train_mean - ctrl``). For a single that is in training this is its training mean.
- ``linear`` (Ahlmann-Eltze, Huber & Anders 2024): pseudobulk the training conditions (``ctrl`` included),
  gene embedding ``G`` = the first ``n_pcs`` (10) principal components of that genes x conditions matrix,
  perturbation embedding ``P`` = the rows of ``G`` of the perturbed genes (summed for a pair; ``ctrl`` = 0),
  fit ``Y - b ~ G W P^T`` with ridge ``lambda`` = 0.1 in closed form
  ``W = (G^T G + lambda I)^-1 G^T (Y - b) P (P^T P + lambda I)^-1`` (``Y``: change against the control mean,
  ``b``: its mean over training conditions), predict ``ctrl + b + G W p``. Summing the two embeddings for pairs
  is our extension (the published model scores singles).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from data_modules.perturbation.conditions import CTRL, condition_genes, normalize_condition, normalize_conditions

BASELINES = ("no_change", "train_mean", "non_control_mean", "additive", "linear")
LINEAR_N_PCS = 10
LINEAR_RIDGE = 0.1


@dataclass(frozen=True)
class TrainingProfiles:
    """What the baselines may know: training-condition means only."""

    gene_names: np.ndarray
    ctrl_mean: np.ndarray
    condition_means: dict[str, np.ndarray]  # perturbed training conditions (ctrl excluded)
    perturbed_cell_mean: np.ndarray
    n_cells: dict[str, int]

    @property
    def train_mean(self) -> np.ndarray:
        return np.mean(list(self.condition_means.values()), axis=0)


def training_profiles(x, cell_conditions: Sequence[str], gene_names, train_conditions: Iterable[str]):
    """Means of the training conditions' cells. ``x`` (cells x genes) is sliced to those cells first."""
    train = set(normalize_conditions(train_conditions))
    labels = np.asarray(normalize_conditions(cell_conditions), dtype=object)
    keep = np.flatnonzero(np.isin(labels, list(train)))
    x_train = x[keep]
    labels = labels[keep]
    x_train = x_train.tocsr() if sp.issparse(x_train) else np.asarray(x_train)

    def mean(rows):
        return np.asarray(x_train[rows].mean(axis=0), dtype=np.float64).ravel()

    ctrl_rows = np.flatnonzero(labels == CTRL)
    if ctrl_rows.size == 0:
        raise ValueError("the training conditions have no 'ctrl' cells")
    pert_rows = np.flatnonzero(labels != CTRL)
    if pert_rows.size == 0:
        raise ValueError("the training conditions have no perturbed cells")
    conds = [c for c in dict.fromkeys(labels) if c != CTRL]
    return TrainingProfiles(
        gene_names=np.asarray(gene_names).astype(str),
        ctrl_mean=mean(ctrl_rows),
        condition_means={c: mean(np.flatnonzero(labels == c)) for c in conds},
        perturbed_cell_mean=mean(pert_rows),
        n_cells={c: int(np.sum(labels == c)) for c in [CTRL, *conds]},
    )


def training_profiles_from(data, split) -> TrainingProfiles:
    """:func:`training_profiles` of a ``PerturbationData`` with a ``PerturbationSplit``'s training conditions."""
    return training_profiles(data.adata.X, data.cell_conditions, data.gene_names, split.train)


def _canonical(conditions: Iterable[str]) -> list[str]:
    return [normalize_condition(c) for c in conditions]


def no_change(train: TrainingProfiles, conditions: Iterable[str]) -> dict[str, np.ndarray]:
    return {c: train.ctrl_mean.copy() for c in _canonical(conditions)}


def train_mean(train: TrainingProfiles, conditions: Iterable[str]) -> dict[str, np.ndarray]:
    m = train.train_mean
    return {c: m.copy() for c in _canonical(conditions)}


def non_control_mean(train: TrainingProfiles, conditions: Iterable[str]) -> dict[str, np.ndarray]:
    return {c: train.perturbed_cell_mean.copy() for c in _canonical(conditions)}


def additive(train: TrainingProfiles, conditions: Iterable[str]) -> dict[str, np.ndarray]:
    fallback = train.train_mean - train.ctrl_mean
    out = {}
    for c in _canonical(conditions):
        pred = train.ctrl_mean.copy()
        for g in condition_genes(c):
            single = train.condition_means.get(f"{g}+{CTRL}")
            pred += fallback if single is None else single - train.ctrl_mean
        out[c] = pred
    return out


class LinearModel:
    """The linear baseline of Ahlmann-Eltze et al., fitted on :class:`TrainingProfiles` (see module docstring)."""

    def __init__(self, train: TrainingProfiles, n_pcs: int = LINEAR_N_PCS, ridge: float = LINEAR_RIDGE):
        conds = [CTRL, *train.condition_means]
        y = np.stack([train.ctrl_mean, *train.condition_means.values()], axis=1)  # genes x conditions
        centred = y - y.mean(axis=0, keepdims=True)  # PCA with genes as observations, conditions as features
        u, s, _ = np.linalg.svd(centred, full_matrices=False)
        k = int(min(n_pcs, len(s)))
        self.gene_embedding = u[:, :k] * s[:k]  # genes x k
        self.gene_index = {g: i for i, g in enumerate(train.gene_names)}
        self.ctrl_mean = train.ctrl_mean
        change = y - train.ctrl_mean[:, None]
        self.center = change.mean(axis=1)
        p = np.stack([self.embed(c) for c in conds], axis=1)  # k x conditions
        a = self.gene_embedding
        eye = np.eye(k)
        left = np.linalg.solve(a.T @ a + ridge * eye, a.T @ (change - self.center[:, None]))
        self.weights = np.linalg.solve(p @ p.T + ridge * eye, (left @ p.T).T).T  # k x k
        self.n_pcs, self.ridge = k, ridge

    def embed(self, condition: str) -> np.ndarray:
        """Perturbation embedding: the summed gene-embedding rows of the perturbed genes (zero for ctrl or a gene
        outside the data)."""
        out = np.zeros(self.gene_embedding.shape[1])
        for g in condition_genes(condition):
            if g in self.gene_index:
                out += self.gene_embedding[self.gene_index[g]]
        return out

    def predict(self, conditions: Iterable[str]) -> dict[str, np.ndarray]:
        return {
            c: self.ctrl_mean + self.center + self.gene_embedding @ (self.weights @ self.embed(c))
            for c in _canonical(conditions)
        }


def linear(train: TrainingProfiles, conditions: Iterable[str], n_pcs: int = LINEAR_N_PCS, ridge: float = LINEAR_RIDGE):
    return LinearModel(train, n_pcs=n_pcs, ridge=ridge).predict(conditions)


def run_baselines(
    train: TrainingProfiles, conditions: Iterable[str], names: Sequence[str] = BASELINES
) -> dict[str, dict[str, np.ndarray]]:
    """``{baseline: {condition: predicted mean profile}}`` for every named baseline."""
    functions = {
        "no_change": no_change,
        "train_mean": train_mean,
        "non_control_mean": non_control_mean,
        "additive": additive,
        "linear": linear,
    }
    unknown = [n for n in names if n not in functions]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; available: {list(functions)}")
    conditions = list(conditions)
    return {n: functions[n](train, conditions) for n in names}
