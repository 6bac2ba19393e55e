"""``benchmark=grn_<dataset>``: gene-embedding programs vs co-expression with enrichment, and attention-GRN targets
vs random / co-expression / DE baselines, in one report (no fine-tuning).

Config keys (``configs/benchmark/grn_demo.yaml``): ``checkpoint`` (null: the newest ``make train`` demo run),
``gene_programs`` (``data``, ``label_key``, ``gmt`` files, ``n_hvg``, ``resolutions``, ``resolution``; omitted:
not run) and ``attention_grn`` (a list of parts, each ``name``, ``data``, ``tf_targets`` and the options of
:func:`run_attention_grn`). ``data``: ``pbmc68k`` (scanpy's pbmc68k_reduced), ``perturbation_demo``
(``data_modules/perturbation/demo.py``) or an h5ad path. ``tf_targets``: ``collectri`` (``fetch_tf_targets()``),
``planted`` (the perturbation demo's planted programs: target gene -> its downstream genes) or a TSV path. GMT
names without a directory are looked up in the resource cache (``fetch_resources()``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from scgpt_train.benchmarks.harness import demo_checkpoint, write_report
from scgpt_train.tasks.attention_grn.common import AttentionGRNParams, GRNError
from scgpt_train.tasks.attention_grn.run import METHOD_NAMES, run_attention_grn


def load_data(name, out_dir: Path):
    """(AnnData, path written) of a benchmark ``data`` entry."""
    import anndata as ad

    if name == "pbmc68k":
        from data_modules.demo import pbmc68k_log_normalized

        adata = pbmc68k_log_normalized()
    elif name == "perturbation_demo":
        from data_modules.perturbation.demo import make_perturbation_demo

        adata = make_perturbation_demo()
    elif Path(name).is_file():
        return ad.read_h5ad(name), Path(name)
    else:
        raise GRNError(f"benchmark data {name!r}: use pbmc68k, perturbation_demo or an existing h5ad path")
    path = out_dir / f"{name}.h5ad"
    if not path.exists():
        from scgpt_train.evaluation.report import write_h5ad

        write_h5ad(adata, path)
    return adata, path


def planted_targets(adata, path: Path) -> Path:
    """The perturbation demo's planted programs as a TF-target TSV (source = perturbed gene, target = its
    downstream program genes)."""
    from data_modules.perturbation.demo import demo_spec

    spec = demo_spec(adata)
    rows = [(t, g) for t, prog in spec["programs"].items() for g in prog["genes"]]
    pd.DataFrame(rows, columns=["source", "target"]).to_csv(path, sep="\t", index=False)
    return path


def resolve_tf_targets(spec, adata, out_dir: Path, cache_dir=None) -> Path:
    if spec == "collectri":
        from scgpt_train.resources.pypi import fetch_tf_targets

        return fetch_tf_targets(cache_dir)
    if spec == "planted":
        return planted_targets(adata, out_dir / "planted_targets.tsv")
    if not Path(spec).is_file():
        raise GRNError(f"tf_targets {spec!r}: use collectri, planted or an existing TSV")
    return Path(spec)


def resolve_gmts(names, cache_dir=None) -> list[Path]:
    from scgpt_train.resources.pypi import default_cache_dir, fetch_resources

    out = []
    for n in names:
        p = Path(n)
        if p.parent == Path("."):
            fetch_resources(cache_dir)
            p = Path(cache_dir or default_cache_dir()) / "resources" / n
        if not p.is_file():
            raise GRNError(f"gene set file {n} not found (looked at {p})")
        out.append(p)
    return out


def run_grn_benchmark(bench: Mapping, seeds, out_dir, extra_overrides=(), compose=None) -> dict:
    """Gene programs and attention-GRN parts of ``bench`` (seed = ``seeds[0]``); ``report.md``, ``results.json``
    and figures in ``out_dir``."""
    import logging

    from scgpt_train.evaluation.report import markdown_table
    from scgpt_train.tasks.gene_programs import GeneProgramParams, run_gene_programs

    cache = bench.get("cache_dir")
    ignored = []
    for o in extra_overrides:  # scripts/benchmark.py passes paths.cache_dir: the resource cache
        if str(o).startswith("paths.cache_dir="):
            cache = cache or str(o).split("=", 1)[1]
        else:
            ignored.append(o)
    if ignored:
        logging.getLogger(__name__).warning("grn benchmarks train nothing: overrides %s ignored", ignored)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = int(list(seeds)[0]) if seeds else 0
    checkpoint = Path(bench["checkpoint"]) if bench.get("checkpoint") else demo_checkpoint()
    sections, result = [], {"benchmark": dict(bench), "checkpoint": str(checkpoint), "seed": seed, "parts": {}}
    progress = bool(bench.get("progress", False))

    gp_cfg = bench.get("gene_programs")
    if gp_cfg:
        t = time.perf_counter()
        _, path = load_data(gp_cfg.get("data", "pbmc68k"), out_dir)
        gp_dir = out_dir / "gene_programs"
        s = run_gene_programs(
            checkpoint,
            resolve_gmts(gp_cfg.get("gmt") or ["h.all.v7.5.1.symbols.gmt", "c2.cp.v7.5.1.symbols.gmt"], cache),
            gp_dir,
            GeneProgramParams(
                n_hvg=int(gp_cfg.get("n_hvg", 1200)),
                resolutions=tuple(float(r) for r in gp_cfg.get("resolutions", [1, 5, 10, 20, 40])),
                resolution=float(gp_cfg.get("resolution", 40)),
                seed=seed,
            ),
            adata_path=path,
            label_key=gp_cfg.get("label_key"),
            progress=progress,
        )
        rows = [
            [r["method"], f"{r['resolution']:g}", r["n_programs"], r["n_genes_in_programs"], r["n_tests"],
             r["n_programs_enriched"], r["n_terms_enriched"]]
            for r in s["per_resolution"]
        ]  # fmt: skip
        sections.append(
            "## Gene-embedding programs vs co-expression\n\n"
            f"Data `{gp_cfg.get('data', 'pbmc68k')}`: {s['n_genes_tested']} genes tested ({s['genes_from']}); "
            f"{s['enrichment']['n_terms_tested']} gene sets with >= {s['enrichment']['min_term_genes']} tested "
            "genes; hypergeometric, Bonferroni over programs x terms per resolution, alpha "
            f"{s['enrichment']['alpha']}. Details: [gene_programs/report.md](gene_programs/report.md).\n\n"
            + markdown_table(
                [
                    "method",
                    "resolution",
                    "programs",
                    "genes in programs",
                    "tests",
                    "programs enriched",
                    "terms enriched",
                ],
                rows,
            )  # fmt: skip
            + f"\nTerms enriched at any resolution: {len(s['terms_shared'])} by both, "
            f"{len(s['terms_only_scgpt'])} only by the gene embeddings, {len(s['terms_only_coexpression'])} only by "
            f"co-expression (e.g. {', '.join(s['terms_only_coexpression'][:5]) or '-'}).\n"
            + "".join(f"\n![{Path(f).stem}](gene_programs/{Path(f).name})\n" for f in s["figures"])
        )
        result["parts"]["gene_programs"] = {
            "per_resolution": s["per_resolution"],
            "terms_shared": s["terms_shared"],
            "terms_only_scgpt": s["terms_only_scgpt"],
            "terms_only_coexpression": s["terms_only_coexpression"],
            "seconds": time.perf_counter() - t,
        }

    for part in bench.get("attention_grn") or []:
        t = time.perf_counter()
        name = part["name"]
        adata, _ = load_data(part.get("data", "pbmc68k"), out_dir)
        part_dir = out_dir / name
        part_dir.mkdir(parents=True, exist_ok=True)
        tf = resolve_tf_targets(part.get("tf_targets", "collectri"), adata, part_dir, cache)
        params = AttentionGRNParams.from_config(part, seed=seed, progress=progress)
        s = run_attention_grn(checkpoint, adata, tf, part_dir, params)
        agg = pd.DataFrame(s["aggregate"])
        k = s["params"]["top_k"]
        rows = [
            [r["setting"], METHOD_NAMES.get(r["method"], r["method"]), r["n_sources"], r["precision_at_k"],
             f"{r['overlap_total']:.1f}", f"{r['expected_total']:.1f}",
             "-" if pd.isna(r["n_sources_p05"]) else int(r["n_sources_p05"])]
            for r in agg.to_dict(orient="records")
        ]  # fmt: skip
        sections.append(
            f"## Attention GRN: {name}\n\n{part.get('description', '')}\n\n"
            f"Data `{part.get('data', 'pbmc68k')}` ({s['n_genes']} genes, {s['input_style']} input), resource "
            f"`{Path(s['tf_targets']).name}`, {len(s['sources'])} source genes, cells per condition scored: "
            f"{_short(s['scored_cells_per_condition'])}. Top {k}; precision = known targets in the top {k} / {k}; "
            f"expected = the hypergeometric mean. Details: [{name}/report.md]({name}/report.md).\n\n"
            + markdown_table(
                [
                    "setting",
                    "method",
                    "sources",
                    f"precision@{k}",
                    "overlap (sum)",
                    "expected (sum)",
                    "sources p < 0.05",
                ],
                rows,
            )  # fmt: skip
            + "".join(f"\n![{Path(f).stem}]({name}/{Path(f).name})\n" for f in s["figures"])
        )
        result["parts"][name] = {
            "aggregate": s["aggregate"],
            "sources": s["sources"],
            "scored_cells_per_condition": s["scored_cells_per_condition"],
            "seconds": time.perf_counter() - t,
        }
    paper = bench.get("paper")
    if paper:
        sections.append("## The paper\n\n" + "\n".join(f"- {k}: {v}" for k, v in paper.items()) + "\n")
    wall = time.perf_counter() - t0
    result["seconds"] = wall
    notes = [
        bench.get("dataset", ""),
        f"Checkpoint `{checkpoint}` (no fine-tuning); seed {seed}; wall time {wall:.0f} s.",
    ]
    write_report(out_dir, bench["name"], notes, "\n".join(sections), result, file="report.md")
    return result


def _short(d: Mapping, n: int = 4) -> str:
    items = list(d.items())
    text = ", ".join(f"{k}: {v}" for k, v in items[:n])
    return text + (f", ... ({len(items)} conditions)" if len(items) > n else "")
