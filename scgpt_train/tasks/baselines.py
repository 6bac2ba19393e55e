"""Simple baselines that independent re-evaluations found to match or beat scGPT.

- ``l1_lr``: L1 logistic regression (liblinear), C chosen by stratified k-fold CV, on the same
  log-normalized genes the model sees.
- ``hvg_pca``: PCA of the log-normalized highly variable genes (the model's genes after the task's
  HVG selection), centred, not scaled.
- ``harmony`` / ``scvi``: run only where their packages are installed (:func:`available_baselines`).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

PAPER_C_GRID = tuple(10.0 ** np.arange(-3, 5))  # 1e-3 .. 1e4
OPTIONAL_PACKAGES = {"harmony": "harmonypy", "scvi": "scvi"}


def available_baselines() -> dict[str, bool]:
    """Which optional integration baselines can run here (their package importable)."""
    return {name: importlib.util.find_spec(pkg) is not None for name, pkg in OPTIONAL_PACKAGES.items()}


def l1_logistic_regression(
    x_train, y_train, x_test, c_grid=PAPER_C_GRID, cv: int = 5, seed: int = 0, max_iter: int = 1000
) -> tuple[np.ndarray, float]:
    """Predicted labels of ``x_test`` and the chosen C. Classes with fewer cells than folds are kept; the
    fold count shrinks to the smallest class size (at least 2) so stratified CV stays possible."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.multiclass import OneVsRestClassifier

    y_train = np.asarray(y_train).astype(str)
    _, counts = np.unique(y_train, return_counts=True)
    folds = int(min(cv, max(2, counts.min())))
    # liblinear is one-vs-rest (recent scikit-learn wants that explicit for >2 classes)
    model = OneVsRestClassifier(
        LogisticRegression(penalty="l1", solver="liblinear", max_iter=max_iter, random_state=seed)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only n members"
        warnings.simplefilter("ignore", FutureWarning)  # penalty= is deprecated in scikit-learn 1.8
        if len(c_grid) > 1:
            search = GridSearchCV(
                model,
                {"estimator__C": list(c_grid)},
                cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                scoring="accuracy",
                n_jobs=1,
            )
            search.fit(x_train, y_train)
            best, c = search.best_estimator_, float(search.best_params_["estimator__C"])
        else:
            c = float(c_grid[0])
            best = model.set_params(estimator__C=c).fit(x_train, y_train)
    return best.predict(x_test), c


def hvg_pca_embedding(x, n_pcs: int = 50, seed: int = 0) -> np.ndarray:
    """(N, n_pcs) PCA of log-normalized expression (rows = cells), centred."""
    from sklearn.decomposition import PCA

    dense = x.toarray() if sp.issparse(x) else np.asarray(x)
    n = int(min(n_pcs, dense.shape[0] - 1, dense.shape[1]))
    return (
        PCA(n_components=n, random_state=seed, svd_solver="arpack" if n < min(dense.shape) else "full")
        .fit_transform(dense.astype(np.float64))
        .astype(np.float32)
    )
