"""cell-eval's metric profiles on the test predictions (the ``cell-eval`` package, Arc Institute; not rewritten).

``cell_eval_inputs`` lays out one method's predictions as cell-eval reads them: a predicted and a real AnnData
over the same genes, ``obs[pert_col]`` the condition, both holding the same control cells (``ctrl``). The real
side is the test cells and every control cell; the predicted side is one predicted cell per test cell (for a
baseline: its mean profile of the cell's condition) and the same control cells. Predicted log1p values below 0
(a regression head can undershoot) are clipped to 0, since cell-eval refuses negative "log-normalized" data.

``run_cell_eval`` runs ``MetricsEvaluator(...).compute(profile=...)`` and returns the mean over perturbations of
each numeric metric; the per-perturbation table and the aggregate are written as CSV under ``out_dir``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from data_modules.perturbation.conditions import CTRL

log = logging.getLogger(__name__)
PERT_COL = "condition"


def cell_eval_available() -> bool:
    return importlib.util.find_spec("cell_eval") is not None


def cell_eval_inputs(
    pred_cells: np.ndarray,
    true_cells: np.ndarray,
    cell_conditions: Sequence[str],
    control_cells: np.ndarray,
    gene_names: Sequence[str],
) -> tuple[ad.AnnData, ad.AnnData]:
    """(predicted, real) AnnData for cell-eval (module doc). ``pred_cells`` / ``true_cells``: (n, G) per test cell,
    ``cell_conditions``: (n,) their conditions, ``control_cells``: (m, G) real control cells."""
    n, m = len(pred_cells), len(control_cells)
    if len(true_cells) != n or len(cell_conditions) != n:
        raise ValueError(f"{n} predicted cells but {len(true_cells)} true cells / {len(cell_conditions)} conditions")
    obs = pd.DataFrame(
        {PERT_COL: list(map(str, cell_conditions)) + [CTRL] * m},
        index=[f"test{i}" for i in range(n)] + [f"ctrl{i}" for i in range(m)],
    )
    var = pd.DataFrame(index=pd.Index(np.asarray(gene_names).astype(str)))
    control = np.asarray(control_cells, dtype=np.float32)
    pred = np.clip(np.vstack([np.asarray(pred_cells, dtype=np.float32), control]), 0.0, None)
    real = np.vstack([np.asarray(true_cells, dtype=np.float32), control])
    return ad.AnnData(pred, obs=obs.copy(), var=var.copy()), ad.AnnData(real, obs=obs.copy(), var=var.copy())


def run_cell_eval(pred: ad.AnnData, real: ad.AnnData, out_dir: str | Path, profile: str = "minimal") -> dict:
    """cell-eval's ``profile`` on (pred, real); {metric: mean over perturbations} of its numeric metrics."""
    from cell_eval import MetricsEvaluator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluator = MetricsEvaluator(pred, real, control_pert=CTRL, pert_col=PERT_COL, num_threads=1, outdir=str(out_dir))
    per_pert, agg = evaluator.compute(profile=profile, write_csv=False)
    per_pert.write_csv(out_dir / "results.csv")
    agg.write_csv(out_dir / "agg_results.csv")
    means = agg.filter(agg["statistic"] == "mean").to_dicts()[0]
    return {k: float(v) for k, v in means.items() if k != "statistic" and v is not None and np.isfinite(float(v))}


def cell_eval_methods(
    methods: Mapping[str, Mapping[str, np.ndarray]],
    scgpt_cells: np.ndarray,
    true_cells: np.ndarray,
    cell_conditions: Sequence[str],
    control_cells: np.ndarray,
    gene_names: Sequence[str],
    out_dir: str | Path,
    profile: str = "minimal",
) -> dict[str, dict[str, float]]:
    """cell-eval for scGPT (its per-cell predictions) and each baseline of ``methods`` (its condition profile for
    every test cell); {method: {metric: mean}}, CSVs under ``out_dir/<method>/``."""
    out: dict[str, dict[str, float]] = {}
    for method, profiles in methods.items():
        if method == "scgpt":
            cells = scgpt_cells
        else:
            cells = np.stack([profiles[c] for c in cell_conditions])
        pred, real = cell_eval_inputs(cells, true_cells, cell_conditions, control_cells, gene_names)
        out[method] = run_cell_eval(pred, real, Path(out_dir) / method, profile)
        log.info("cell-eval (%s) %s: %s", profile, method, out[method])
    return out
