"""``scripts/benchmark.py benchmark=perturbation_<name>``: fine-tune over seeds, every baseline through the same
metrics, and one report.

Each seed is a full ``train.py`` run (``pipeline.run``; its :class:`.task.PerturbationTask` scores the test
conditions, ours and the baselines, overall and per GEARS subgroup). With ``vary_split: true`` the GEARS split
seed follows the run seed, so the spread over seeds includes the choice of test conditions (baselines then vary
too); otherwise every seed uses the experiment's split (the paper's seed 1) and only the fine-tune varies.

Writes into the benchmark dir: ``report.md`` (what was run, a line saying when the data are simulated, the table
of every method - ours mean +- sd over seeds, each baseline, paper numbers where given - and the per-subgroup
tables), ``results.csv`` (one row per method x subgroup x metric: mean, sd, n, the per-seed values),
``results.json``, ``subgroups.png`` (per-subgroup bars, mean +- sd over seeds) and the first seed's
``delta_top_de.png``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data_modules.perturbation.splits import SUBGROUPS
from scgpt_train.benchmarks.harness import (
    method_metrics,
    pinned_threads,
    pretrained_rows_notes,
    pretrained_rows_table,
    pretrained_variants,
    run_pretrained_rows,
    run_seed,
    seed_config,
    write_report,
)
from scgpt_train.evaluation.report import markdown_table, mean_std, write_text
from scgpt_train.tasks.perturbation.task import METHOD_NAMES, plot_subgroups

log = logging.getLogger(__name__)

TABLE_METRICS = (
    ("pearson_de_delta", "Pearson-delta DE-20"),
    ("pearson_delta", "Pearson-delta"),
    ("mse_de", "MSE DE-20 (lower better)"),
    ("direction_de", "direction DE-20"),
    ("pearson_delta_pc", "Pearson-delta vs pert. centroid"),
    ("centroid_accuracy", "centroid accuracy"),
    ("pearson", "Pearson (raw)"),
)
SUBGROUP_METRICS = (("pearson_de_delta", "Pearson-delta DE-20"), ("mse_de", "MSE DE-20"))
PRETRAINED_COLUMNS = (("pearson_de_delta", "Pearson-delta DE-20"), ("pearson_delta", "Pearson-delta"),
                      ("mse_de", "MSE DE-20 (lower better)"))  # fmt: skip


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def results_frame(per_seed: Sequence[Mapping[str, float]], methods: Sequence[str], seeds: Sequence[int]):
    """Long table: method, subgroup (``all`` or a GEARS subgroup), metric, mean, sd, n (finite seeds), values."""
    rows = []
    for method in methods:
        for key, values in method_metrics(per_seed, method).items():
            if key.startswith("n_nan/") or key == "n_conditions":
                continue
            subgroup, metric = key.split("/", 1) if "/" in key else ("all", key)
            mean, sd, n = _stats(values)
            rows.append({
                "method": method, "subgroup": subgroup, "metric": metric, "mean": mean, "sd": sd, "n_seeds": n,
                "values": ";".join(f"{v:.6g}" for v in values), "seeds": ";".join(str(s) for s in seeds),
            })  # fmt: skip
    return pd.DataFrame(rows, columns=["method", "subgroup", "metric", "mean", "sd", "n_seeds", "values", "seeds"])


def simulated_note(simulated, bench: Mapping, shows: str) -> list[str]:
    """The report's first line when the data are simulated (the data's own description, else the config's)."""
    if not (simulated or bench.get("simulated")):
        return []
    what = str(simulated or bench.get("dataset", ""))
    return [
        f"**The data are SIMULATED**: {what} Numbers here show that the pipeline {shows}; they say nothing about "
        "real perturbation data."
    ]


def overall_table(per_seed, methods, paper: Mapping | None, n_seeds: int) -> str:
    header = ["method", "source"] + [title for _, title in TABLE_METRICS]
    rows = []
    for method in methods:
        values = method_metrics(per_seed, method)
        seeds = f"{n_seeds} seed{'s' if n_seeds != 1 else ''}"
        source = f"ours ({seeds})" if method == "scgpt" else f"baseline ({seeds})"
        cells = [mean_std(values.get(k, [])) for k, _ in TABLE_METRICS]
        rows.append([METHOD_NAMES.get(method, method), source, *cells])
    for method, numbers in (paper or {}).items():
        rows.append([METHOD_NAMES.get(method, method), "paper"]
                    + [f"{numbers[k]:.3f}" if k in numbers else "-" for k, _ in TABLE_METRICS])  # fmt: skip
    return markdown_table(header, rows)


def cell_eval_table(per_seed, methods) -> str | None:
    """cell-eval's metrics (mean over perturbations; mean ± sd over seeds) per method, or None if it did not run."""
    names = sorted(
        {k.split("/", 1)[1] for m in methods for k in method_metrics(per_seed, m) if k.startswith("cell_eval/")}
    )
    if not names:
        return None
    rows = []
    for method in methods:
        values = method_metrics(per_seed, method)
        rows.append([METHOD_NAMES.get(method, method)] + [mean_std(values.get(f"cell_eval/{n}", [])) for n in names])
    return markdown_table(["method", *names], rows)


def subgroup_table(per_seed, methods, metric: str) -> str:
    header = ["method"] + list(SUBGROUPS)
    rows = []
    for method in methods:
        values = method_metrics(per_seed, method)
        rows.append([METHOD_NAMES.get(method, method)] + [mean_std(values.get(f"{g}/{metric}", [])) for g in SUBGROUPS])
    return markdown_table(header, rows)


def beats(per_seed, metric: str, higher_better: bool, ours: str = "scgpt", other: str = "no_change") -> str | None:
    """A sentence comparing two methods' mean over seeds on ``metric`` (None when either is missing)."""
    a, _, na = _stats(method_metrics(per_seed, ours).get(metric, []))
    b, _, nb = _stats(method_metrics(per_seed, other).get(metric, []))
    if not (na and nb):
        return None
    better = a > b if higher_better else a < b
    verdict = "better than" if better else "not better than"
    return f"{metric}: {METHOD_NAMES[ours]} {a:.3f} is {verdict} {METHOD_NAMES.get(other, other)} {b:.3f}"


def run_perturbation_benchmark(
    bench: Mapping, seeds: Sequence[int], out_dir: Path, extra_overrides: Sequence[str] = (), compose=None
) -> dict:
    """Fine-tune + baselines for every seed, then report.md / results.csv / results.json / figures."""
    pretrained_variants(bench)  # a wrong variant name is refused before any run
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    baselines = list(bench.get("baselines") or [])
    methods = ["scgpt", *baselines]
    threads = torch.get_num_threads()
    per_seed, seconds, simulated = [], [], None
    start = time.perf_counter()
    with pinned_threads(bench.get("torch_threads")):
        for seed in seeds:
            seed_dir = out_dir / f"seed_{seed}"
            t0 = time.perf_counter()
            per_seed.append(run_seed(seed_config(bench, seed, seed_dir, extra_overrides, compose)))
            seconds.append(time.perf_counter() - t0)
            if simulated is None and (seed_dir / "metrics.json").exists():
                simulated = json.loads((seed_dir / "metrics.json").read_text()).get("simulated")
        total = time.perf_counter() - start
        pretrained = run_pretrained_rows(bench, seeds, out_dir / "pretrained", extra_overrides, compose)

    frame = results_frame(per_seed, methods, seeds)
    write_text(frame.to_csv(index=False), out_dir / "results.csv")
    figures = []
    means = {m: {} for m in methods}
    sds = {m: {} for m in methods}
    for r in frame.itertuples():
        key = r.metric if r.subgroup == "all" else f"{r.subgroup}/{r.metric}"
        means[r.method][key], sds[r.method][key] = r.mean, r.sd
    plot_subgroups(means, list(SUBGROUPS), out_dir / "subgroups.png", errors=sds)
    figures.append("subgroups.png")
    first = out_dir / f"seed_{seeds[0]}" / "delta_top_de.png"
    if first.exists():
        shutil.copyfile(first, out_dir / "delta_top_de.png")
        figures.append("delta_top_de.png")

    notes = simulated_note(simulated, bench, "runs and learns")
    notes += [
        f"Benchmark `{bench['name']}`: {bench.get('dataset', '')}.",
        f"Fine-tune: `train.py experiment={bench['experiment']}`, seeds {list(seeds)}"
        + (" (the GEARS split seed follows the seed)" if bench.get("vary_split") else " (one split)")
        + "; ours and baselines = mean ± sd over seeds.",
        "Scored on the test conditions' mean profiles (scgpt_train/tasks/perturbation/metrics.py): Pearson-delta "
        "against the mean of all control cells, DE-20 = each condition's top-20 DE genes (evaluation only), "
        "subgroups of the GEARS simulation split; undefined correlations (a constant predicted change, as 'no "
        "change' gives) are left out of the means.",
        "Baselines are fitted on the training conditions only (scgpt_train/tasks/perturbation/baselines.py).",
        f"Runtime: {total:.0f} s for {len(seeds)} seeds ({', '.join(f'{s:.0f}' for s in seconds)} s each; "
        f"torch threads: {bench.get('torch_threads') or threads}).",
        *pretrained_rows_notes(pretrained, len(seeds)),
    ]
    checks = [beats(per_seed, "mse_de", False), beats(per_seed, "direction_de", True),
              beats(per_seed, "pearson_de_delta", True, other="additive"),
              beats(per_seed, "pearson_de_delta", True, other="linear")]  # fmt: skip
    checks = [c for c in checks if c]
    cell_eval = cell_eval_table(per_seed, methods)
    cell_eval_text = (
        "\n## cell-eval\n\ncell-eval's metric profile (task.cell_eval; the package's own code) on the predicted test "
        "cells (a baseline: its condition profile for each cell) against the real ones, both with the same control "
        "cells; mean over perturbations, then mean ± sd over seeds. Outputs: seed_<n>/cell_eval/<method>/.\n\n"
        + cell_eval
        if cell_eval
        else "\n## cell-eval\n\nNot run: task.cell_eval is off or the cell-eval package is not installed "
        "(seed_<n>/metrics.json says which).\n"
    )
    body = (
        "## All test conditions\n\n"
        + overall_table(per_seed, methods, bench.get("paper"), len(seeds))
        + ("\n## From a pretrained checkpoint\n\n" + pretrained_rows_table(pretrained, PRETRAINED_COLUMNS)
           if pretrained else "")
        + "".join(f"\n## Per subgroup: {title}\n\n" + subgroup_table(per_seed, methods, metric)
                  for metric, title in SUBGROUP_METRICS)
        + ("\n## Against the simplest baselines\n\n" + "\n".join(f"- {c}" for c in checks) + "\n" if checks else "")
        + cell_eval_text
    )  # fmt: skip
    result = {
        "benchmark": dict(bench),
        "seeds": list(seeds),
        "per_seed": per_seed,
        "seconds": seconds,
        "figures": figures,
        "simulated": simulated,
        "pretrained_rows": pretrained,
    }
    write_report(out_dir, bench["name"], notes, body, result, figures, file="report.md")
    return result


# reverse perturbation ---------------------------------------------------------------------------------------------
def run_reverse_benchmark(
    bench: Mapping, seeds: Sequence[int], out_dir: Path, extra_overrides: Sequence[str] = (), compose=None
) -> dict:
    """Per seed: fine-tune (``bench["experiment"]``), then the reverse-perturbation protocol with the best
    checkpoint on that run's split (:mod:`.reverse_run`); report.md / results.csv / reverse_topk.png aggregate
    correct@K and relevant@K over seeds (mean +- sd) beside the chance levels and the baselines."""
    from data_modules.perturbation import PerturbationSplit, read_gears
    from scgpt_train.tasks.perturbation.predict import load_predictor
    from scgpt_train.tasks.perturbation.reverse_run import markdown, plot_topk, reverse_perturbation, write_outputs

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = dict(bench.get("reverse") or {})
    tables, seconds, simulated, last = [], [], None, None
    start = time.perf_counter()
    with pinned_threads(bench.get("torch_threads")):
        for seed in seeds:
            seed_dir = out_dir / f"seed_{seed}"
            t0 = time.perf_counter()
            cfg = seed_config(
                bench, seed, seed_dir, extra_overrides, compose, ["task.figures=false", "task.write_h5ad=false"]
            )
            run_seed(cfg)
            saved = json.loads((seed_dir / "metrics.json").read_text())
            simulated = simulated or saved.get("simulated")
            best = saved.get("best_checkpoint") or str(seed_dir / "checkpoints" / "last.ckpt")
            model, vocab = load_predictor(best)
            data = read_gears(str(cfg.data.path))
            split = PerturbationSplit.load(seed_dir / "split.json")
            last = reverse_perturbation(model, vocab, data, split, seed=seed, **params)
            write_outputs(last, seed_dir / "reverse", f"Reverse perturbation, seed {seed}", [f"Model: {best}."])
            tables.append(last.table().assign(seed=seed))
            seconds.append(time.perf_counter() - t0)
    total = time.perf_counter() - start

    long = pd.concat(tables, ignore_index=True)
    write_text(long.to_csv(index=False), out_dir / "results.csv")
    grouped = long.groupby(["method", "K"], sort=False)[["correct", "relevant"]]
    means = grouped.mean().reset_index()
    sds = grouped.std(ddof=1).reset_index() if len(seeds) > 1 else None
    plot_topk(means, out_dir / "reverse_topk.png", sds)
    notes = simulated_note(simulated, bench, "runs")
    notes += [
        f"Benchmark `{bench['name']}`: {bench.get('dataset', '')}.",
        f"Per seed: `train.py experiment={bench['experiment']}` (seeds {list(seeds)}"
        + (", the GEARS split seed follows the seed" if bench.get("vary_split") else "")
        + "), then the reverse protocol with the best checkpoint on that run's test conditions "
        f"(settings {params or 'defaults'}); mean ± sd over seeds.",
        f"Last seed: subspace ({last.subspace_from} conditions) {', '.join(last.genes)}; "
        f"{len(last.candidates)} candidates; "
        f"{len(last.queries)} query conditions; a random guesser needs "
        f"{(len(last.candidates) + 1) / 2:.1f} tries on average.",
        "Baselines: top-2 DE genes of the query; the candidate genes' own expression change (oracle: reads the "
        "targets directly); the model's retrieval with the candidate genes masked; a random ranking; chance is "
        "analytic.",
        f"Runtime: {total:.0f} s for {len(seeds)} seeds ({', '.join(f'{s:.0f}' for s in seconds)} s each).",
    ]
    result = {"benchmark": dict(bench), "seeds": list(seeds), "seconds": seconds, "simulated": simulated,
              "means": means.to_dict(orient="records")}  # fmt: skip
    write_report(out_dir, bench["name"], notes, markdown(means, sds), result, ["reverse_topk.png"], file="report.md")
    return result
