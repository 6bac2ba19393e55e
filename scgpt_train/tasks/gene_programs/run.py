"""The whole gene-program run: programs, enrichment, the co-expression baseline, tables, report and figures."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from data_modules.atomic import write_text_atomic
from scgpt_train.tasks.gene_programs.coexpression import coexpression_features, program_scores
from scgpt_train.tasks.gene_programs.common import (
    COEXPR_PCS,
    NO_BATCH_LABELS,
    GeneProgramError,
    GeneProgramParams,
)
from scgpt_train.tasks.gene_programs.enrichment import check_gene_sets, enrichment
from scgpt_train.tasks.gene_programs.figures import plot_family_network, plot_program_heatmap
from scgpt_train.tasks.gene_programs.graph import cosine_network, leiden_programs
from scgpt_train.tasks.gene_programs.inputs import (
    gene_embeddings,
    log_expression,
    read_gene_list,
    read_gmt,
    select_hvgs,
)


def _program_of(programs: Mapping[str, Sequence[str]]) -> dict[str, str]:
    return {g: name for name, members in programs.items() for g in members}


def _best_match(members: Sequence[str], others: Mapping[str, Sequence[str]]) -> tuple[str | None, float]:
    s = set(members)
    best, score = None, 0.0
    for name, genes in others.items():
        j = len(s & set(genes)) / len(s | set(genes))
        if j > score:
            best, score = name, j
    return best, score


def _significant_terms(table: pd.DataFrame, alpha: float) -> set[str]:
    return set(table.loc[table["p_bonferroni"] < alpha, "term"])


def run_gene_programs(
    checkpoint,
    gmt: Sequence | str,
    out_dir,
    params: GeneProgramParams | None = None,
    *,
    genes_file=None,
    adata_path=None,
    gene_column: str | None = None,
    use_raw: bool = False,
    label_key: str | None = None,
    progress: bool = True,
    **settings,
) -> dict:
    """Gene-embedding programs of ``checkpoint`` with enrichment, scores and the co-expression baseline; writes
    ``out_dir`` (see docs/grn.md) and returns the summary.

    Parameters
    ----------
    checkpoint, gmt, out_dir: the model, the gene-set file(s) and the output directory.
    params: the analysis settings (:class:`GeneProgramParams`); ``settings`` (its field names) override fields.
    genes_file / adata_path: the genes tested (a list, or the HVGs of an AnnData; neither: the whole vocabulary);
    gene_column / use_raw / label_key: how the AnnData is read (label_key: cell types of the heatmap)."""
    p = replace(params or GeneProgramParams(), **settings)
    n_hvg, resolutions, resolution, n_neighbors, metric = p.n_hvg, p.resolutions, p.resolution, p.n_neighbors, p.metric
    min_genes, min_term_genes, alpha, family = p.min_genes, p.min_term_genes, p.alpha, p.family
    network_threshold, seed = p.network_threshold, p.seed
    from scgpt_train.evaluation.report import markdown_table, write_h5ad, write_json
    from scgpt_train.inference import load_for_inference, read_h5ad_checked

    say = print if progress else (lambda *a, **k: None)
    out_dir = Path(out_dir)
    resolutions = sorted({float(r) for r in resolutions} | {float(resolution)})
    gmts = [gmt] if isinstance(gmt, str | Path) else list(gmt)
    gene_sets: dict[str, list[str]] = {}
    for path in gmts:
        for term, genes in read_gmt(path).items():
            if term in gene_sets:
                raise GeneProgramError(f"gene set {term!r} of {path} is also in an earlier --gmt file")
            gene_sets[term] = genes
    model, vocab = load_for_inference(checkpoint, GeneProgramError, NO_BATCH_LABELS)

    adata = x_log = None
    names: list[str] = []
    if adata_path is not None:
        adata = read_h5ad_checked(adata_path, "--adata", GeneProgramError, use_raw)
        if label_key is not None and label_key not in adata.obs.columns:
            raise GeneProgramError(
                f"--adata {adata_path}: --label-key {label_key!r} is not an obs column "
                f"(columns: {list(adata.obs.columns)[:20]})"
            )
        x_log, names = log_expression(adata, gene_column, use_raw, adata_path)
    if genes_file is not None:
        requested, where = read_gene_list(genes_file), f"--genes {genes_file}"
    elif adata is not None:
        requested = select_hvgs(adata, names, vocab, n_hvg, gene_column, use_raw, adata_path)
        where = f"the {len(requested)} most variable vocabulary genes of {adata_path} (--n-hvg {n_hvg})"
    else:
        requested, where = vocab.genes, "the vocabulary"
    if adata is not None:  # genes the AnnData lacks cannot be scored nor co-expressed
        have = set(names)
        lacking = [g for g in requested if g not in have]
        if lacking:
            say(f"note: {len(lacking)} genes of {where} are not in {adata_path} (e.g. {lacking[:5]}); left out")
        requested = [g for g in requested if g in have]
    ge = gene_embeddings(model, vocab, requested, where)
    if ge.missing:
        say(f"note: {len(ge.missing)} genes of {where} are not in the checkpoint's vocabulary (e.g. {ge.missing[:5]})")
    genes = ge.genes
    if len(genes) < max(min_genes, 3):
        raise GeneProgramError(f"only {len(genes)} genes of {where} can be tested; need at least {max(min_genes, 3)}")
    check_gene_sets(gene_sets, vocab.genes, genes, ", ".join(str(p) for p in gmts))
    say(f"{len(genes)} genes tested ({where}); {len(gene_sets)} gene sets")

    # gene-embedding programs
    programs, labels = leiden_programs(ge.emb, genes, resolutions, n_neighbors, metric, min_genes, seed)
    all_programs = {name: g for r in resolutions for name, g in programs[r].items()}

    def enrich(progs):  # one analysis per resolution: Bonferroni over that resolution's programs x terms
        return {r: enrichment(progs[r], gene_sets, genes, min_term_genes) for r in resolutions}

    results = {"scgpt": (programs, enrich(programs))}
    # co-expression baseline on the same genes and background
    coexpr_note = None
    if x_log is not None:
        col = {g: i for i, g in enumerate(names)}
        xg = x_log[:, [col[g] for g in genes]]
        feats, ok = coexpression_features(xg, COEXPR_PCS, seed)
        c_genes = [g for g, k in zip(genes, ok, strict=True) if k]
        c_programs, _ = leiden_programs(feats, c_genes, resolutions, n_neighbors, "euclidean", min_genes, seed)
        c_programs = {r: {f"coexpr_{n}": g for n, g in p.items()} for r, p in c_programs.items()}
        results["coexpression"] = (c_programs, enrich(c_programs))
        if not ok.all():
            coexpr_note = (
                f"{int((~ok).sum())} genes without variance over the cells left out of the co-expression graph"
            )
    else:
        coexpr_note = "no --adata: the co-expression baseline needs expression values"

    # tables
    out_dir.mkdir(parents=True, exist_ok=True)
    prog_rows, per_res = [], []
    for method, (progs, enr_by_res) in results.items():
        for r in resolutions:
            names_r = list(progs[r])
            table = enr_by_res[r].table
            enriched = table[table["p_bonferroni"] < alpha]
            per_res.append(
                {
                    "method": method,
                    "resolution": r,
                    "n_tests": enr_by_res[r].n_tests,
                    "n_programs": len(names_r),
                    "n_genes_in_programs": int(sum(len(v) for v in progs[r].values())),
                    "n_programs_enriched": int(enriched["program"].nunique()),
                    "n_terms_enriched": int(enriched["term"].nunique()),
                }
            )
            for name, members in progs[r].items():
                prog_rows.append(
                    {
                        "method": method,
                        "resolution": r,
                        "program": name,
                        "n_genes": len(members),
                        "genes": ",".join(members),
                    }
                )
    programs_df = pd.DataFrame(prog_rows, columns=["method", "resolution", "program", "n_genes", "genes"])
    enrich_df = pd.concat(
        [e.table.assign(method=m, resolution=r) for m, (_, by_res) in results.items() for r, e in by_res.items()],
        ignore_index=True,
    )
    enrich_df = enrich_df[
        ["method", "resolution", *[c for c in enrich_df.columns if c not in ("method", "resolution")]]
    ]
    network_df = cosine_network(ge.emb, genes, all_programs)
    write_text_atomic(out_dir / "programs.tsv", programs_df.to_csv(sep="\t", index=False))
    write_text_atomic(out_dir / "enrichment.tsv", enrich_df.to_csv(sep="\t", index=False))
    write_text_atomic(out_dir / "networks.tsv", network_df.to_csv(sep="\t", index=False))
    write_text_atomic(out_dir / "background_genes.txt", "\n".join(genes) + "\n")

    # the main resolution: table with enrichment and co-expression match, shared / unique terms
    main = programs[float(resolution)]
    c_main = results["coexpression"][0][float(resolution)] if "coexpression" in results else {}
    enr = results["scgpt"][1][float(resolution)]
    sig_e = enr.table[(enr.table["p_bonferroni"] < alpha)]
    table_rows = []
    for name, members in main.items():
        hits = sig_e[sig_e["program"] == name]
        top = hits.iloc[0] if len(hits) else None
        match, jac = _best_match(members, c_main) if c_main else (None, None)
        table_rows.append(
            [
                name,
                len(members),
                ", ".join(members[:12]) + (" ..." if len(members) > 12 else ""),
                "-"
                if top is None
                else f"{top['term']} ({top['overlap']}/{top['n_program']}, p_bonf {top['p_bonferroni']:.2g})",
                len(hits),
                "-" if match is None else f"{match} (J {jac:.2f})",
            ]
        )
    terms_e = set().union(*(_significant_terms(e.table, alpha) for e in results["scgpt"][1].values()))
    terms_c = (
        set().union(*(_significant_terms(e.table, alpha) for e in results["coexpression"][1].values()))
        if "coexpression" in results
        else set()
    )
    shared, only_e, only_c = sorted(terms_e & terms_c), sorted(terms_e - terms_c), sorted(terms_c - terms_e)

    # scores and figures
    figures = []
    fam_re = re.compile(family)
    fam_genes = [g for g in genes if fam_re.search(g)]
    if len(fam_genes) >= 2:
        figures.append(
            plot_family_network(
                ge.emb, genes, fam_genes, _program_of(main), network_threshold, out_dir / "family_network.png",
                f"gene embeddings: {family}",
            )
        )  # fmt: skip
    if adata is not None and main:
        col = {g: i for i, g in enumerate(names)}
        scores = program_scores(x_log[:, [col[g] for g in genes]], genes, main, seed)
        for name in main:
            adata.obs[f"gp_{name}"] = scores[name].to_numpy()
        write_h5ad(adata, out_dir / "scores.h5ad")
        if label_key is not None:
            figures.append(
                plot_program_heatmap(
                    scores, adata.obs[label_key], out_dir / "program_heatmap.png",
                    f"gene-embedding programs (resolution {resolution:g}) over {label_key}",
                )
            )  # fmt: skip

    summary = {
        "checkpoint": str(checkpoint),
        "gmt": [str(p) for p in gmts],
        "genes_from": where,
        "n_genes_tested": len(genes),
        "n_genes_missing_from_vocab": len(ge.missing),
        "background": "the tested genes (background_genes.txt)",
        "n_background": len(genes),
        "graph": {"n_neighbors": n_neighbors, "metric": metric, "connectivities": "scanpy (UMAP)"},
        "leiden": {
            "resolutions": resolutions,
            "main_resolution": float(resolution),
            "seed": seed,
            "flavor": "leidenalg",
        },
        "min_program_genes": min_genes,
        "enrichment": {
            "test": "hypergeometric, one-sided (over-representation), scipy.stats.hypergeom",
            "correction": "Bonferroni over programs x tested terms, per resolution (n_tests in per_resolution)",
            "alpha": alpha,
            "min_term_genes": min_term_genes,
            "n_terms": len(gene_sets),
            "n_terms_tested": enr.n_terms_tested,
        },
        "per_resolution": per_res,
        "terms_shared": shared,
        "terms_only_scgpt": only_e,
        "terms_only_coexpression": only_c,
        "coexpression_note": coexpr_note,
        "family": {"regex": family, "genes": fam_genes},
        "figures": [str(p) for p in figures],
    }
    write_json(summary, out_dir / "summary.json")
    report = [
        "# Gene programs from gene embeddings\n",
        f"Checkpoint `{checkpoint}`; {len(genes)} genes tested ({where}); gene sets: "
        + ", ".join(f"`{Path(p).name}`" for p in gmts)
        + f" ({len(gene_sets)} sets, {enr.n_terms_tested} with >= {min_term_genes} tested genes). kNN graph k "
        f"{n_neighbors} ({metric}), Leiden (seed {seed}), programs >= {min_genes} genes; hypergeometric test, "
        f"background = the {len(genes)} tested genes, Bonferroni over programs x terms of each resolution, alpha "
        f"{alpha}.\n",
        "## Per resolution\n",
        markdown_table(
            ["method", "resolution", "programs", "genes in programs", "tests", "programs enriched", "terms enriched"],
            [
                [
                    r["method"],
                    f"{r['resolution']:g}",
                    r["n_programs"],
                    r["n_genes_in_programs"],
                    r["n_tests"],
                    r["n_programs_enriched"],
                    r["n_terms_enriched"],
                ]
                for r in per_res
            ],
        ),
        f"\n## Programs at resolution {resolution:g}\n",
        markdown_table(
            ["program", "genes", "members", "top enriched term", "terms enriched", "best co-expression match"],
            table_rows,
        )
        if table_rows
        else f"No program of >= {min_genes} genes at this resolution.\n",
        "\n## Enriched terms: gene embeddings vs co-expression (all resolutions)\n",
        f"- shared ({len(shared)}): {', '.join(shared[:30]) or '-'}\n",
        f"- only gene embeddings ({len(only_e)}): {', '.join(only_e[:30]) or '-'}\n",
        f"- only co-expression ({len(only_c)}): {', '.join(only_c[:30]) or '-'}\n",
    ]
    if coexpr_note:
        report.append(f"\nNote: {coexpr_note}.\n")
    if figures:
        report.append("\n## Figures\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in figures))
    write_text_atomic(out_dir / "report.md", "\n".join(report))
    summary["out_dir"] = str(out_dir)
    return summary
