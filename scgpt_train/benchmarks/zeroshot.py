"""``benchmark=zeroshot_<dataset>``: zero-shot reference mapping over seeds, beside its baselines (no fine-tuning)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from scgpt_train.benchmarks.harness import COLLAPSE_MARKS, demo_checkpoint, write_report
from scgpt_train.tasks.reference_map.common import (
    BASELINES,
    DEFAULT_K,
    METHOD_NAMES,
    ReferenceMapError,
    ReferenceMapParams,
)
from scgpt_train.tasks.reference_map.run import run_reference_map

log = logging.getLogger(__name__)


def _demo_dataset(name: str):
    from data_modules.demo import pbmc68k_log_normalized

    if name != "pbmc68k":
        raise ReferenceMapError(f"benchmark data.builder must be 'pbmc68k', got {name!r}")
    return pbmc68k_log_normalized()


def collapse_marks(row: list, seeds: list[dict], agg: dict) -> list[str]:
    """Mark a method's numbers † / ‡ (harness.COLLAPSE_MARKS) when its kNN / baseline predictions collapsed
    to one class or were no better than the reference's majority class in some seed; returns the legend lines."""
    legend, marks = [], ""
    for key, (mark, text) in COLLAPSE_MARKS.items():
        hit = sum(float(s.get(key, 0.0)) > 0 for s in seeds)
        if hit:
            marks += mark
            agg.setdefault("flags", {})[key] = hit
            legend.append(f"{mark} {row[0]}: {text} in {hit} of {len(seeds)} seeds")
    if marks:
        row[2:] = [f"{c} {marks}" for c in row[2:]]
    return legend


def run_zeroshot_benchmark(bench, seeds, out_dir, extra_overrides=(), compose=None) -> dict:
    """Zero-shot reference mapping over ``seeds``: for each seed a stratified reference / query split (from
    ``data.builder`` with ``data.query_fraction``; or the fixed ``data.reference`` / ``data.query`` files) and
    seeded embeddings, scGPT kNN beside HVG+PCA kNN and L1-LR; ``benchmark.md`` (mean ± std over seeds),
    ``results.json``, the first seed's confusion matrix and query UMAPs in ``out_dir``."""
    from data_modules.preprocess import stratified_split
    from scgpt_train.evaluation.figures import plot_confusion, plot_umap, umap_coordinates
    from scgpt_train.evaluation.metrics import confusion_matrix
    from scgpt_train.evaluation.report import markdown_table, mean_std

    if extra_overrides:
        log.warning("zero-shot benchmarks train nothing: overrides %s are ignored", list(extra_overrides))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(bench["checkpoint"]) if bench.get("checkpoint") else demo_checkpoint()
    data = dict(bench.get("data") or {})
    label_key = data.get("label_key", "cell_type")
    k = int(bench.get("k", DEFAULT_K))
    per_seed, figures = [], []
    t0 = time.perf_counter()
    for i, seed in enumerate(seeds):
        seed_dir = out_dir / f"seed_{seed}"
        if data.get("reference"):
            ref, query = Path(data["reference"]), Path(data["query"])
        else:
            from scgpt_train.evaluation.report import write_h5ad

            cells = _demo_dataset(data.get("builder", "pbmc68k"))
            tr, te = stratified_split(
                cells.obs[label_key].astype(str).to_numpy(), data.get("query_fraction", 0.3), seed
            )
            ref, query = (
                write_h5ad(cells[tr].copy(), seed_dir / "reference.h5ad"),
                write_h5ad(cells[te].copy(), seed_dir / "query.h5ad"),
            )
        params = ReferenceMapParams(
            k=k,
            seed=int(seed),
            batch_size=int(bench.get("batch_size", 64)),
            precision=str(bench.get("precision", "auto")),
            baselines=tuple(bench.get("baselines") or BASELINES),
            n_hvg=int(bench.get("n_hvg", 2000)),
            n_pcs=int(bench.get("n_pcs", 50)),
            l1_c_grid=bench.get("l1_c_grid"),
            progress=False,
        )
        summary = run_reference_map(checkpoint, ref, query, label_key, seed_dir / "mapped.h5ad", params)
        per_seed.append(summary["metrics"])
        if i == 0:  # figures of the first seed
            import anndata as ad

            mapped = ad.read_h5ad(seed_dir / "mapped.h5ad")
            truth = mapped.obs[label_key].astype(str).to_numpy()
            pred = mapped.obs["ref_pred"].astype(str).to_numpy()
            cm, classes = confusion_matrix(truth, pred)
            figures.append(plot_confusion(cm, classes, out_dir / "confusion_matrix.png", "scGPT zero-shot kNN: query"))
            if bench.get("umap", True):
                coords = umap_coordinates(mapped.obsm["X_scgpt"], seed=int(seed))
                colors = {"cell type": truth, "kNN prediction": pred}
                figures.append(plot_umap(coords, colors, out_dir / "umap.png", "scGPT zero-shot, query"))
    methods = list(per_seed[0])
    rows, legend = [], []
    agg = {}
    for m in methods:
        vals = {key: [s[m][key] for s in per_seed] for key in ("accuracy", "macro_f1", "precision", "recall")}
        agg[m] = {key: {"mean": float(np.mean(v)), "values": v} for key, v in vals.items()}
        rows.append([METHOD_NAMES.get(m, m), f"ours ({len(seeds)} seeds)"] + [mean_std(vals[c]) for c in vals])
        legend += collapse_marks(rows[-1], [s[m] for s in per_seed], agg[m])
    for m, numbers in (bench.get("paper") or {}).items():
        rows.append([METHOD_NAMES.get(m, m), "paper / re-evaluation"] + [numbers.get(c, "-") for c in agg[methods[0]]])
    table = markdown_table(["method", "source", "accuracy", "macro F1", "macro precision", "macro recall"], rows)
    table += "".join(f"\n{line}\n" for line in legend)
    notes = [
        f"Benchmark `{bench['name']}`: {bench.get('dataset', '')}.",
        f"Checkpoint `{checkpoint}` (zero-shot: no fine-tuning); L2-normalized cell embeddings, kNN vote k = {k}.",
        "Baselines on the same reference / query split: HVG+PCA kNN (PCA fitted on the reference) and L1 logistic "
        "regression on the same HVGs of the log-normalized genes the model reads.",
        f"Seeds {list(seeds)}: the split"
        + (" (fixed files: the seed changes only binning ties / gene sampling)" if data.get("reference") else "")
        + " and the embedding seed; ours = mean ± std over seeds. Wall time "
        f"{time.perf_counter() - t0:.0f} s.",
    ]
    result = {
        "benchmark": dict(bench),
        "checkpoint": str(checkpoint),
        "seeds": list(seeds),
        "per_seed": per_seed,
        "summary": agg,
        "table": table,
    }
    write_report(out_dir, bench["name"], notes, table, result, [Path(f).name for f in figures])
    return result
