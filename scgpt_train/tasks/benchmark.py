"""Benchmark harness: one fine-tune per seed (through ``pipeline.run``), baselines on the same data and split,
aggregated into a markdown table with the paper's numbers beside ours."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from scgpt_train.tasks.baselines import available_baselines
from scgpt_train.tasks.metrics import INTEGRATION_BACKEND
from scgpt_train.tasks.report import markdown_table, mean_std, write_json, write_text

log = logging.getLogger(__name__)

COLUMNS = {
    "annotation": [
        ("accuracy", "accuracy"),
        ("precision", "macro precision"),
        ("recall", "macro recall"),
        ("macro_f1", "macro F1"),
    ],
    "integration": [
        ("avg_bio", "AvgBIO"),
        ("avg_batch", "AvgBATCH"),
        ("overall", "overall"),
        ("nmi", "NMI"),
        ("ari", "ARI"),
        ("asw_label", "ASW label"),
        ("asw_batch", "ASW batch"),
        ("graph_connectivity", "graph conn."),
    ],
}
METHOD_NAMES = {
    "scgpt": "scGPT fine-tuned",
    "l1_lr": "L1 logistic regression",
    "hvg_pca": "HVG + PCA",
    "harmony": "Harmony",
    "scvi": "scVI",
}
FIGURES = ("confusion_matrix.png", "confusion_matrix_l1_lr.png", "umap.png", "umap_hvg_pca.png")


BENCHMARK_KEYS = ("benchmark", "seeds", "overrides", "paths", "hydra")  # configs/benchmark.yaml's own keys


def split_cli_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Command-line arguments of ``scripts/benchmark.py`` -> (its own, train.py overrides for every seed).

    Keys of configs/benchmark.yaml (``benchmark=``, ``seeds=``, ``overrides=``, ``paths.*``, ``hydra.*``) and
    flags (``--cfg job``, ``-m``) stay with the benchmark; anything else (``data.path=ref.h5ad``,
    ``trainer=gpu``, ``pretrained=CKPT``) is a train.py override, as if written into ``overrides=[...]``."""
    own: list[str] = []
    train: list[str] = []
    flag_value = False
    for arg in args:
        if flag_value:  # the value of a flag such as --cfg job / --package
            own.append(arg)
            flag_value = False
            continue
        if arg.startswith("-"):
            own.append(arg)
            flag_value = arg in ("--cfg", "-c", "--package", "-p", "--info", "-i", "--config-name", "-cn")
            continue
        key = arg.lstrip("+~").split("=", 1)[0]
        root = key.split(".", 1)[0].split("/", 1)[0]
        (own if root in BENCHMARK_KEYS else train).append(arg)
    return own, train


def data_source_note(bench: Mapping, overrides: Sequence[str]) -> str:
    """The report's first line: the benchmark's own dataset, or its recipe on the data the overrides point at."""
    own = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") in ("data.path", "data.query_path")]
    if own:
        files = ", ".join(f"`{p}`" for p in own)
        return f"Benchmark `{bench['name']}`: its recipe on {files} (not its own data: {bench.get('dataset', '')})."
    return f"Benchmark `{bench['name']}`: {bench.get('dataset', '')}."


def describe_data(run_dir: Path) -> list[str]:
    """Report lines on the data a fine-tune actually used, from its ``data_report.json`` (none if absent)."""
    import json

    path = Path(run_dir) / "data_report.json"
    if not path.is_file():
        return []
    rep = json.loads(path.read_text())
    files = ", ".join(f"`{p}`" for p in (rep.get("path"), rep.get("query_path")) if p)
    split = ", ".join(f"{k} {v:,}" for k, v in (rep.get("cells_per_split") or {}).items() if v)
    lines = [
        f"Data used: {files or 'see data_report.json'}; {rep.get('n_cells', 0):,} cells ({split}); "
        f"{rep.get('n_model_genes', 0):,} genes in the model; {len(rep.get('labels') or [])} labels"
        + (f", {len(rep['batches'])} batches" if rep.get("batches") else "")
        + "."
    ]
    for v in rep.get("values") or []:
        steps = ", ".join(v.get("steps") or []) or "used as stored"
        lines.append(f"Values of {v.get('source')}: {v.get('value_type')} ({v.get('evidence', '')}); {steps}.")
    lines += [f"Data warning: {w}" for w in rep.get("warnings") or []]
    return lines


def compose_train(overrides: Sequence[str]):
    """configs/train.yaml composed with ``overrides`` (Hydra's compose API, inside the caller's initialized
    config dir): how every benchmark runner builds a seed's run config unless given its own ``compose``."""
    from hydra import compose

    return compose(config_name="train", overrides=list(overrides))


def train_overrides(bench: Mapping, seed: int, seed_dir: Path, extra: Sequence[str]) -> list[str]:
    """Overrides of configs/train.yaml for one seed of ``bench``."""
    over = [
        f"experiment={bench['experiment']}",
        f"seed={seed}",
        f"paths.output_dir={seed_dir}",
        f"task.baselines=[{','.join(bench.get('baselines') or [])}]",
        "logger=csv",
    ]
    if bench["task"] == "annotation" and bench.get("l1_c_grid"):
        over.append(f"task.l1_c_grid=[{','.join(str(float(c)) for c in bench['l1_c_grid'])}]")
    return over + list(bench.get("train_overrides") or []) + list(extra)


def method_metrics(per_seed: list[dict[str, float]], method: str) -> dict[str, list[float]]:
    """{metric: [value per seed]} of ``method`` (scgpt = ``test/...``, baselines = ``baseline/<m>/...``)."""
    prefix = "test/" if method == "scgpt" else f"baseline/{method}/"
    out: dict[str, list[float]] = {}
    for metrics in per_seed:
        for key, value in metrics.items():
            if key.startswith(prefix):
                out.setdefault(key[len(prefix) :], []).append(float(value))
    return out


def ours_rows(
    per_seed: list[dict[str, float]],
    methods: Sequence[str],
    cols: Sequence[tuple[str, str]],
    names: Mapping[str, str],
    skip_reason: Callable[[str], str],
    n_seeds: int,
) -> tuple[list[list[str]], dict]:
    """Table rows of our runs of ``methods`` (mean ± std over seeds of each column; a method without numbers
    gets the row "ours (<skip_reason(method)>)") and the aggregated numbers {method: {metric: mean/std/values}}."""
    rows, summary = [], {}
    for method in methods:
        values = method_metrics(per_seed, method)
        name = names.get(method, method)
        if not values:
            reason = skip_reason(method)
            rows.append([name, f"ours ({reason})"] + ["-"] * len(cols))
            summary[method] = {"skipped": reason}
            continue
        summary[method] = {
            k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
            for k, v in values.items()
        }
        rows.append([name, f"ours ({n_seeds} seeds)"] + [mean_std(values.get(k, [])) for k, _ in cols])
    return rows, summary


def results_table(
    task: str, per_seed: list[dict[str, float]], baselines: Sequence[str], paper: Mapping | None, n_seeds: int
) -> tuple[str, dict]:
    """Markdown table (ours: mean ± std over seeds; paper rows where given) and the aggregated numbers."""
    cols = COLUMNS[task]
    header = ["method", "source"] + [title for _, title in cols]
    installed = available_baselines()

    def skip_reason(method: str) -> str:
        return "not installed" if installed.get(method) is False else "no result"

    methods = ["scgpt", *baselines]
    rows, summary = ours_rows(per_seed, methods, cols, METHOD_NAMES, skip_reason, n_seeds)
    legend = mark_collapsed(rows, per_seed, methods, summary)
    for method, numbers in (paper or {}).items():
        source = "paper" if method == "scgpt" else "paper / re-evaluation"
        rows.append(
            [METHOD_NAMES.get(method, method), source] + [f"{numbers[k]:.3f}" if k in numbers else "-" for k, _ in cols]
        )
    return markdown_table(header, rows) + legend, summary


COLLAPSE_MARKS = {
    "collapsed": ("†", "predictions collapsed to one class"),
    "no_better_than_majority": ("‡", "no better than always predicting the majority class"),
}


def mark_collapsed(rows: list[list[str]], per_seed: list[dict[str, float]], methods: Sequence[str], summary: dict):
    """Mark each metric of a method whose predictions collapsed / were no better than the majority class in some
    seed (the task's ``<method>/collapsed`` and ``no_better_than_majority`` flags); returns the table's legend and
    records the seeds in ``summary[method]["flags"]``."""
    legend = []
    for row, method in zip(rows, methods):
        flags = method_metrics(per_seed, method)
        marks = []
        for key, (mark, text) in COLLAPSE_MARKS.items():
            hit = int(sum(v > 0 for v in flags.get(key, [])))
            if hit:
                marks.append(mark)
                summary[method].setdefault("flags", {})[key] = hit
                legend.append(f"{mark} {row[0]}: {text} in {hit} of {len(per_seed)} seeds")
        if marks:
            row[2:] = [f"{c} {''.join(marks)}" if c != "-" else c for c in row[2:]]
    return "".join(f"\n{line}\n" for line in legend)


def run_benchmark(
    bench: Mapping, seeds: Sequence[int], out_dir: Path, extra_overrides: Sequence[str] = (), compose=None
) -> dict:
    """Fine-tune + baselines for every seed, then ``benchmark.md`` / ``results.json`` / figures in ``out_dir``.

    ``compose(overrides) -> DictConfig`` composes configs/train.yaml (Hydra's compose API by default)."""
    own_reports = {"perturbation": "run_perturbation_benchmark", "reverse_perturbation": "run_reverse_benchmark"}
    if bench.get("task") == "zeroshot":  # no fine-tuning: scgpt_train/tasks/reference_map/benchmark.py
        from scgpt_train.tasks.reference_map import run_zeroshot_benchmark

        return run_zeroshot_benchmark(bench, seeds, out_dir, extra_overrides, compose)
    if bench.get("task") == "multiomic":  # variants x (multi-omic, RNA-only) runs: scgpt_train/tasks/multiomic/
        from scgpt_train.tasks.multiomic.benchmark import run_multiomic_benchmark

        return run_multiomic_benchmark(bench, seeds, out_dir, extra_overrides, compose)
    if bench.get("task") == "grn":  # no fine-tuning: scgpt_train/tasks/attention_grn/benchmark.py
        from scgpt_train.tasks.attention_grn.benchmark import run_grn_benchmark

        return run_grn_benchmark(bench, seeds, out_dir, extra_overrides, compose)
    if bench.get("task") in own_reports:  # per-subgroup / top-K tables: scgpt_train/tasks/perturbation/benchmark.py
        from scgpt_train.tasks.perturbation import benchmark as perturbation

        return getattr(perturbation, own_reports[bench["task"]])(bench, seeds, out_dir, extra_overrides, compose)
    from scgpt_train.pipeline import run

    compose = compose or compose_train

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for seed in seeds:
        seed_dir = out_dir / f"seed_{seed}"
        cfg = compose(train_overrides(bench, seed, seed_dir, extra_overrides))
        log.info("benchmark %s: seed %s -> %s", bench["name"], seed, seed_dir)
        metrics = run(cfg)
        per_seed.append({k: float(v) for k, v in metrics.items()})
    first = out_dir / f"seed_{seeds[0]}"
    figures = []
    for name in FIGURES:  # the first seed's figures beside the table
        if (first / name).exists():
            shutil.copyfile(first / name, out_dir / name)
            figures.append(name)
    table, summary = results_table(
        bench["task"], per_seed, list(bench.get("baselines") or []), bench.get("paper"), len(seeds)
    )
    user = [o for o in extra_overrides if not o.startswith("paths.cache_dir=")]
    notes = [
        data_source_note(bench, user),
        f"Fine-tune: `train.py experiment={bench['experiment']}`, seeds {list(seeds)}; ours = mean ± std over seeds.",
        "Baselines run on the same preprocessed genes and the same splits as the model.",
    ]
    if user:
        notes.append("Overrides given: " + " ".join(f"`{o}`" for o in user) + ".")
    notes += describe_data(first)
    if bench["task"] == "integration":
        notes.append(
            f"Metrics: {INTEGRATION_BACKEND}; the paper used scib (Louvain), so values can differ slightly. "
            "overall = 0.6 AvgBIO + 0.4 AvgBATCH."
        )
    else:
        notes.append("Metrics on the query cells; macro averages over the classes present in truth or prediction.")
    skipped = [METHOD_NAMES.get(m, m) for m, s in summary.items() if "skipped" in s]
    if skipped:
        notes.append(f"Not run here: {', '.join(skipped)} (package not installed).")
    text = (
        f"# {bench['name']}\n\n"
        + "\n".join(f"- {n}" for n in notes)
        + "\n\n"
        + table
        + "".join(f"\n![{f}]({f})\n" for f in figures)
    )
    write_text(text, out_dir / "benchmark.md")
    result = {
        "benchmark": dict(bench),
        "seeds": list(seeds),
        "per_seed": per_seed,
        "summary": summary,
        "figures": figures,
        "table": table,
    }
    write_json(result, out_dir / "results.json")
    print(text)
    return result
