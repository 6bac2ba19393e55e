"""Simple baselines that independent re-evaluations found to match or beat scGPT.

- ``l1_lr``: L1 logistic regression (liblinear), C chosen by stratified k-fold CV, on the same
  log-normalized genes the model sees.
- ``hvg_pca``: PCA of the log-normalized highly variable genes (the model's genes after the task's
  HVG selection), centred, not scaled.
- ``harmony``: Harmony (harmonypy) on that PCA embedding, corrected for the batch key.
- ``scvi``: scVI (scvi-tools) trained on the raw counts of the same genes, batch as covariate; a small,
  seeded training budget (the task config's ``scvi`` block) so that it runs on a CPU.

Harmony / scVI come with the ``baselines`` extra (``make setup`` installs it); where their packages are
missing they are reported as not installed (:func:`available_baselines`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

PAPER_C_GRID = tuple(10.0 ** np.arange(-3, 5))  # 1e-3 .. 1e4
OPTIONAL_PACKAGES = {"harmony": "harmonypy", "scvi": "scvi"}


def available_baselines() -> dict[str, bool]:
    """Which optional integration baselines can run here (their package importable)."""
    return {name: importlib.util.find_spec(pkg) is not None for name, pkg in OPTIONAL_PACKAGES.items()}


def log_normalized(x: sp.csr_matrix, source: str) -> sp.csr_matrix:
    """Log-normalized values (the annotation recipe's normalize_total 1e4 + log1p, through
    ``data_modules.value_types``: counts / other normalized values get both, log1p values are used as stored)."""
    from data_modules.value_types import apply_steps, detect_value_type, preprocessing_steps

    x = sp.csr_matrix(x, dtype=np.float64, copy=True)
    steps = preprocessing_steps(detect_value_type(x, source), 1e4, True)
    return apply_steps(x, steps).astype(np.float32)


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


def harmony_embedding(pcs: np.ndarray, batches, seed: int = 0, **harmony_kwargs) -> np.ndarray:
    """(N, d) Harmony-corrected embedding of the (N, d) ``pcs``; ``harmony_kwargs`` go to
    ``harmonypy.run_harmony`` (e.g. ``theta``, ``max_iter_harmony``, ``ncores``)."""
    import harmonypy
    import pandas as pd

    pcs = np.asarray(pcs, dtype=np.float64)
    meta = pd.DataFrame({"batch": np.asarray(batches).astype(str)})
    if len(meta) != pcs.shape[0]:
        raise ValueError(f"{pcs.shape[0]} cells in the embedding but {len(meta)} batch labels")
    result = harmonypy.run_harmony(pcs, meta, ["batch"], random_state=seed, verbose=False, **harmony_kwargs)
    z = np.asarray(result.Z_corr)
    if z.shape != pcs.shape:  # harmonypy < 2 returned (d, N)
        z = z.T
    return np.ascontiguousarray(z, dtype=np.float32)


def has_integer_values(x) -> bool:
    """True when every stored value of ``x`` (dense or sparse) is a whole number."""
    values = x.data if sp.issparse(x) else np.asarray(x)
    return bool(np.all(np.mod(values, 1) == 0))


@contextlib.contextmanager
def scvi_training(seed: int, num_threads: int | None):
    """Seeded, quiet scvi-tools training on capped CPU threads: yields (the ``scvi`` module, a scratch dir for
    Lightning's files) inside ``warnings.catch_warnings()`` (the caller adds its filters); torch's thread count
    is restored afterwards. Shared by scVI, totalVI and MultiVI."""
    import scvi
    import torch

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.seed = int(seed)
    threads = torch.get_num_threads()
    try:
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
            yield scvi, tmp
    finally:
        torch.set_num_threads(threads)


def scvi_embedding(
    counts,
    batches,
    seed: int = 0,
    n_latent: int = 30,
    n_hidden: int = 128,
    n_layers: int = 2,
    gene_likelihood: str = "nb",
    max_epochs: int | None = 100,
    batch_size: int = 128,
    train_size: float = 1.0,
    accelerator: str = "auto",
    num_threads: int | None = 1,
    log_dir: str | Path | None = None,
) -> np.ndarray:
    """(N, n_latent) scVI latent means of the (N, genes) raw ``counts``, batch as the covariate.

    Training is seeded (``scvi.settings.seed``: torch, numpy and the data split). ``num_threads`` caps
    torch's CPU threads during training (restored afterwards; None leaves them): on few shared cores more
    threads only contend (100 epochs of the 700-cell demo: about 17 s with one thread, minutes with two
    under load). ``max_epochs=None`` uses scvi-tools' heuristic (400 epochs below 20,000 cells).
    Non-integer values are used as given (scVI's likelihood is defined for them, but they are not counts:
    the caller reports it)."""
    import anndata as ad
    import pandas as pd

    x = sp.csr_matrix(counts, dtype=np.float32)
    if x.nnz and x.data.min() < 0:
        raise ValueError("scVI needs non-negative counts; got negative values (log-transformed data?)")
    batches = np.asarray(batches).astype(str)
    if len(batches) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} cells in the counts but {len(batches)} batch labels")
    obs = pd.DataFrame({"batch": pd.Categorical(batches)}, index=np.arange(len(batches)).astype(str))
    adata = ad.AnnData(X=x, obs=obs)
    with scvi_training(seed, num_threads) as (scvi, tmp):
        # non-integer inputs make every step warn that values lie outside the NB's support
        warnings.filterwarnings("ignore", message="The value argument must be within the support")
        warnings.filterwarnings("ignore", message=".*not contain unnormalized count data")
        warnings.filterwarnings("ignore", message=".*log_every_n_steps")
        warnings.filterwarnings("ignore", message=".*does not have many workers")
        scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
        model = scvi.model.SCVI(
            adata, n_latent=n_latent, n_hidden=n_hidden, n_layers=n_layers, gene_likelihood=gene_likelihood
        )
        model.train(
            max_epochs=None if max_epochs is None else int(max_epochs),
            accelerator=accelerator,
            devices=1,
            train_size=float(train_size),
            batch_size=int(batch_size),
            enable_progress_bar=False,
            default_root_dir=str(log_dir or tmp),
        )
        z = model.get_latent_representation()
    return np.ascontiguousarray(z, dtype=np.float32)
