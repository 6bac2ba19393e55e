"""``benchmark=annotation_<dataset>`` / ``integration_<dataset>``: one fine-tune per seed (``pipeline.run``; the
task's ``evaluate`` scores ours and the baselines on the same data and split), aggregated into a markdown table
with the paper's numbers beside ours."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from scgpt_train.benchmarks.harness import (
    METHOD_NAMES,
    data_source_note,
    describe_data,
    pretrained_rows_notes,
    pretrained_rows_table,
    pretrained_variants,
    results_table,
    run_pretrained_rows,
    run_seed,
    seed_config,
    write_report,
)
from scgpt_train.evaluation.metrics import INTEGRATION_BACKEND

FIGURES = ("confusion_matrix.png", "confusion_matrix_l1_lr.png", "umap.png", "umap_hvg_pca.png")
# the columns of the pretrained rows (full fine-tune / LoRA / frozen encoder from one checkpoint)
PRETRAINED_COLUMNS = {
    "annotation": [("accuracy", "accuracy"), ("macro_f1", "macro F1")],
    "integration": [("avg_bio", "AvgBIO"), ("avg_batch", "AvgBATCH"), ("overall", "overall")],
}


def run_finetune_benchmark(
    bench: Mapping, seeds: Sequence[int], out_dir: Path, extra_overrides: Sequence[str] = (), compose=None
) -> dict:
    """Fine-tune + baselines for every seed, then ``benchmark.md`` / ``results.json`` / figures in ``out_dir``.

    ``compose(overrides) -> DictConfig`` composes configs/train.yaml (Hydra's compose API by default)."""
    pretrained_variants(bench)  # a wrong variant name is refused before any run
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for seed in seeds:
        per_seed.append(run_seed(seed_config(bench, seed, out_dir / f"seed_{seed}", extra_overrides, compose)))
    first = out_dir / f"seed_{seeds[0]}"
    figures = []
    for name in FIGURES:  # the first seed's figures beside the table
        if (first / name).exists():
            shutil.copyfile(first / name, out_dir / name)
            figures.append(name)
    table, summary = results_table(
        bench["task"], per_seed, list(bench.get("baselines") or []), bench.get("paper"), len(seeds)
    )
    pretrained = run_pretrained_rows(bench, seeds, out_dir / "pretrained", extra_overrides, compose)
    if pretrained:
        table += "\n## From a pretrained checkpoint\n\n" + pretrained_rows_table(
            pretrained, PRETRAINED_COLUMNS[bench["task"]]
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
    notes += pretrained_rows_notes(pretrained, len(seeds))
    skipped = [METHOD_NAMES.get(m, m) for m, s in summary.items() if "skipped" in s]
    if skipped:
        notes.append(f"Not run here: {', '.join(skipped)} (package not installed).")
    result = {
        "benchmark": dict(bench),
        "seeds": list(seeds),
        "per_seed": per_seed,
        "summary": summary,
        "figures": figures,
        "table": table,
        "pretrained_rows": pretrained,
    }
    write_report(out_dir, bench["name"], notes, table, result, figures)
    return result
