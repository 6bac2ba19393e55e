"""Perturbation-response task: after fit, predict the test conditions and score them next to the baselines.

``PerturbationTask.evaluate`` (called by ``scgpt_train.pipeline`` after fit):

1. reloads the best checkpoint (selected by the checkpoint callback's monitor: ``val/pearson_delta`` in the
   perturbation experiments; ``val/pearson`` reproduces the official selection);
2. predicts every test cell from its paired control cell (all genes; :func:`.predict.predict_loader`) and
   averages predictions per condition;
3. scores the means with :mod:`.metrics` against the true condition means (reference: the mean of ALL control
   cells; DE genes: the data's top-20 non-dropout DE genes, evaluation only), overall and per GEARS subgroup of
   the test split, and the same for every baseline of :mod:`.baselines` (fitted on the training conditions only);
4. writes ``metrics.json`` (every number), ``per_condition.csv`` (one row per method x condition),
   ``test_predictions.h5ad`` (one predicted cell per test cell: obs condition / subgroup / control cell, layer
   ``truth``), and the figures ``subgroups.png`` (per-subgroup bars, ours and baselines) and ``delta_top_de.png``
   (predicted vs true change on the top-20 DE genes for a few test conditions).

Returned metrics: ``test/<metric>``, ``test/<subgroup>/<metric>``, ``baseline/<name>/<metric>``,
``baseline/<name>/<subgroup>/<metric>``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from data_modules.perturbation.conditions import CTRL
from scgpt_train.evaluation.figures import pyplot, save_figure
from scgpt_train.evaluation.report import write_h5ad, write_json, write_text
from scgpt_train.tasks.base import FineTuneTask
from scgpt_train.tasks.perturbation import baselines as B
from scgpt_train.tasks.perturbation import metrics as M
from scgpt_train.tasks.perturbation.predict import mean_by_condition, predict_loader

log = logging.getLogger(__name__)

FIGURE_METRICS = (("pearson_de_delta", "Pearson-delta, top-20 DE genes"), ("mse_de", "MSE, top-20 DE genes"))
METHOD_NAMES = {
    "scgpt": "scGPT fine-tuned",
    "no_change": "no change (control mean)",
    "train_mean": "train mean",
    "non_control_mean": "non-control mean",
    "additive": "additive",
    "linear": "linear (Ahlmann-Eltze)",
}


def score_profiles(pred, true, ctrl_mean, de_genes, train_means, subgroups, nan_policy="omit"):
    """(per-condition table, summary) of one method's mean profiles through :mod:`.metrics`."""
    table = M.per_condition_table(pred, true, ctrl_mean, de_genes, train_means=train_means)
    return table, M.summarize(table, subgroups, nan_policy)


class PerturbationTask(FineTuneTask):
    """Evaluation of a perturbation fine-tune on the test conditions, beside the baselines: a
    :class:`FineTuneTask` whose prediction hook (:meth:`predict`) reads the test conditions' profiles.

    use_best: reload the best checkpoint before predicting. baselines: names from
    ``scgpt_train.tasks.perturbation.baselines.BASELINES``. nan_policy: how undefined per-condition scores
    enter the means (see :mod:`.metrics`). n_figure_conditions: conditions in ``delta_top_de.png``.
    cell_eval: cell-eval profile run on ours and the baselines (``minimal``, ``full``, ...; None: off); skipped,
    and said so in metrics.json, when the package is not installed.
    """

    name = title = "perturbation"
    known_baselines = B.BASELINES

    def __init__(
        self,
        use_best: bool = True,
        baselines: list[str] | tuple[str, ...] = B.BASELINES,
        nan_policy: str = "omit",
        figures: bool = True,
        write_h5ad: bool = True,
        n_figure_conditions: int = 4,
        batch_size: int | None = None,
        seed: int = 0,
        cell_eval: str | None = "minimal",
    ):
        if nan_policy not in M.NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {M.NAN_POLICIES}, got {nan_policy!r}")
        super().__init__(bool(use_best), baselines, False, bool(write_h5ad), True, seed, batch_size)
        self.nan_policy, self.figures, self.n_figure_conditions = nan_policy, bool(figures), int(n_figure_conditions)
        self.cell_eval = cell_eval or None

    def predict(self, module, datamodule, device) -> dict[str, np.ndarray]:
        """The test conditions' predicted profiles (:func:`.predict.predict_loader`)."""
        return predict_loader(module.model, datamodule.loader("test", self.batch_size), device)

    def report(self, trainer, datamodule, outputs: dict, output_dir: Path, best: str | None) -> dict[str, float]:
        return self.score(datamodule, outputs, output_dir, best)

    def score(self, dm, preds: dict[str, np.ndarray], output_dir: Path, best: str | None = None) -> dict[str, float]:
        data, split = dm.data, dm.split
        test = [c for c in split.test if c != CTRL]
        pred_means = mean_by_condition(preds["pred"], preds["condition"], dm.conditions)
        missing = [c for c in test if c not in pred_means]
        if missing:
            raise ValueError(f"no test predictions for {len(missing)} conditions (e.g. {missing[0]!r})")
        true_means = data.condition_means(test)
        ctrl_mean = data.control_mean
        de = {c: data.top_de_20[c] for c in test}
        train = B.training_profiles_from(data, split)
        subgroups = {k: v for k, v in split.test_subgroup.items()}
        methods = {"scgpt": {c: pred_means[c] for c in test}}
        methods.update(B.run_baselines(train, test, self.baselines))
        tables, summaries = {}, {}
        for method, pred in methods.items():
            tables[method], summaries[method] = score_profiles(
                pred, true_means, ctrl_mean, de, train.condition_means, subgroups, self.nan_policy
            )
        metrics = {f"test/{k}": v for k, v in summaries["scgpt"].items()}
        for method in self.baselines:
            metrics.update({f"baseline/{method}/{k}": v for k, v in summaries[method].items()})
        cell_eval_status = self._cell_eval(dm, preds, methods, output_dir, metrics)
        metrics = {k: float(v) for k, v in metrics.items()}

        subgroup_of = {c: g for g, members in subgroups.items() for c in members}
        long = pd.concat(
            [t.assign(method=m, subgroup=[subgroup_of.get(c, "") for c in t.index]).reset_index()
             for m, t in tables.items()], ignore_index=True,
        )  # fmt: skip
        write_text(long.to_csv(index=False), output_dir / "per_condition.csv")
        write_json(
            {
                "task": self.name,
                "best_checkpoint": best,
                "metrics": metrics,
                "summaries": summaries,
                "subgroups": subgroups,
                "nan_policy": self.nan_policy,
                "cell_eval": cell_eval_status,
                "data": dm.report(),
                "simulated": getattr(dm, "simulated", None),
            },
            output_dir / "metrics.json",
        )
        if self.write_h5ad:
            self._write_predictions(dm, preds, subgroup_of, output_dir / "test_predictions.h5ad")
        if self.figures:
            plot_subgroups(summaries, list(subgroups), output_dir / "subgroups.png")
            chosen = pick_conditions(test, subgroup_of, self.n_figure_conditions)
            plot_delta_top_de(methods, true_means, ctrl_mean, de, data.gene_names, chosen,
                              output_dir / "delta_top_de.png")  # fmt: skip
        return metrics

    def _cell_eval(self, dm, preds, methods, output_dir: Path, metrics: dict) -> str:
        """cell-eval's profile for ours and every baseline (:mod:`.cell_eval`), into ``metrics`` as
        ``test/cell_eval/<metric>`` and ``baseline/<name>/cell_eval/<metric>``; returns what was done."""
        from scgpt_train.tasks.perturbation.cell_eval import cell_eval_available, cell_eval_methods

        if self.cell_eval is None:
            return "off (task.cell_eval=null)"
        if not cell_eval_available():
            log.warning("cell-eval is not installed (pip install cell-eval==0.8.2): its metric profile is not run")
            return "not installed"
        names = np.asarray(dm.conditions, dtype=object)[preds["condition"]].astype(str)
        control = dm.data.adata.X[dm.data.control_cells]
        control = control.toarray() if hasattr(control, "toarray") else np.asarray(control)
        results = cell_eval_methods(methods, preds["pred"], preds["truth"], names, control, dm.data.gene_names,
                                    output_dir / "cell_eval", self.cell_eval)  # fmt: skip
        for method, values in results.items():
            prefix = "test" if method == "scgpt" else f"baseline/{method}"
            metrics.update({f"{prefix}/cell_eval/{k}": v for k, v in values.items()})
        return f"profile {self.cell_eval} (cell-eval {_version('cell-eval')}), outputs in cell_eval/<method>/"

    def _write_predictions(self, dm, preds, subgroup_of, path: Path) -> None:
        names = np.asarray(dm.conditions, dtype=object)[preds["condition"]].astype(str)
        obs_names = dm.data.adata.obs_names.to_numpy().astype(str)
        obs = pd.DataFrame(
            {
                "condition": names,
                "subgroup": [subgroup_of.get(c, "") for c in names],
                "cell": obs_names[preds["cell_index"]],
                "control_cell": obs_names[preds["control_index"]],
            },
            index=[f"pred{i}" for i in range(len(names))],
        )
        var = pd.DataFrame({"gene_name": dm.data.gene_names}, index=dm.data.adata.var_names.astype(str))
        out = ad.AnnData(X=preds["pred"].astype(np.float32), obs=obs, var=var)
        out.layers["truth"] = preds["truth"].astype(np.float32)
        write_h5ad(out, path)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def pick_conditions(conditions, subgroup_of: dict, n: int) -> list[str]:
    """Up to ``n`` conditions, one per subgroup in turn (sorted names), for the delta figure."""
    by_group: dict[str, list[str]] = {}
    for c in sorted(conditions):
        by_group.setdefault(subgroup_of.get(c, ""), []).append(c)
    chosen: list[str] = []
    while len(chosen) < n and any(by_group.values()):
        for group in sorted(by_group):
            if by_group[group] and len(chosen) < n:
                chosen.append(by_group[group].pop(0))
    return chosen


def plot_subgroups(summaries: dict, subgroups: list[str], path, errors: dict | None = None) -> Path:
    """Grouped bars: per subgroup (and all test conditions), one bar per method, for each figure metric.
    ``summaries``: {method: {metric or <subgroup>/<metric>: value}}; ``errors`` the same layout (bar sd)."""
    plt = pyplot()
    groups = ["all", *subgroups]
    methods = list(summaries)
    fig, axes = plt.subplots(1, len(FIGURE_METRICS), figsize=(6.5 * len(FIGURE_METRICS), 4.2), squeeze=False)
    width = 0.8 / max(1, len(methods))
    cmap = plt.get_cmap("tab10")
    for ax, (metric, title) in zip(axes[0], FIGURE_METRICS, strict=True):
        for k, method in enumerate(methods):
            keys = [metric if g == "all" else f"{g}/{metric}" for g in groups]
            vals = [summaries[method].get(key, np.nan) for key in keys]
            err = None if errors is None else [errors[method].get(key, 0.0) for key in keys]
            xs = np.arange(len(groups)) + (k - (len(methods) - 1) / 2) * width
            ax.bar(xs, np.nan_to_num(vals, nan=0.0), width, yerr=err, color=cmap(k % 10),
                   label=METHOD_NAMES.get(method, method), capsize=2)  # fmt: skip
        ax.set_xticks(range(len(groups)), groups, rotation=20, fontsize=8)
        ax.set_title(title)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_delta_top_de(methods, true_means, ctrl_mean, de, gene_names, conditions, path) -> Path:
    """Per chosen condition: true vs predicted change against control on its top-20 DE genes, every method."""
    plt = pyplot()
    n = max(1, len(conditions))
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.6 * n), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, cond in zip(axes[:, 0], conditions, strict=True):
        genes = np.asarray(de[cond])
        xs = np.arange(len(genes))
        ax.scatter(xs, (true_means[cond] - ctrl_mean)[genes], color="black", marker="_", s=250, label="true",
                   zorder=3)  # fmt: skip
        for k, (method, pred) in enumerate(methods.items()):
            ax.scatter(xs + 0.1 * (k - len(methods) / 2), (pred[cond] - ctrl_mean)[genes], color=cmap(k % 10),
                       s=12, label=METHOD_NAMES.get(method, method))  # fmt: skip
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xticks(xs, np.asarray(gene_names)[genes], rotation=90, fontsize=6)
        ax.set_ylabel("change vs ctrl")
        ax.set_title(cond, fontsize=9)
    axes[0][0].legend(fontsize=6, ncol=4, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)
