"""The whole gene-program run: programs, enrichment, the co-expression baseline, tables, report and figures."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
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


@dataclass
class _Inputs:
    """What the programs are computed from: the gene sets, the model's gene embeddings and the cells, if any."""

    gmts: list
    gene_sets: dict[str, list[str]]
    where: str  # which genes were tested, in words
    ge: object  # GeneEmbeddings of the tested genes
    adata: object | None = None
    x_log: object | None = None  # (cells, names) log-normalized expression of ``adata``
    names: list[str] = field(default_factory=list)  # the AnnData's gene names

    @property
    def genes(self) -> list[str]:
        return self.ge.genes


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
    checkpoint, gmt, out_dir
        The model, the gene-set file(s) and the output directory.
    params : GeneProgramParams, optional
        The analysis settings; ``settings`` (its field names) override fields.
    genes_file, adata_path
        The genes tested (a list, or the HVGs of an AnnData; neither: the whole vocabulary).
    gene_column, use_raw, label_key
        How the AnnData is read (label_key: cell types of the heatmap).
    progress : bool
        Print notes on left-out genes.
    """
    p = replace(params or GeneProgramParams(), **settings)
    say = print if progress else (lambda *a, **k: None)
    out_dir = Path(out_dir)
    resolutions = sorted({float(r) for r in p.resolutions} | {float(p.resolution)})
    inputs = _read_inputs(checkpoint, gmt, p, genes_file, adata_path, gene_column, use_raw, label_key, say)
    results, coexpr_note = _programs(inputs, p, resolutions)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_res = _write_tables(inputs, results, resolutions, p, out_dir)
    table_rows, terms = _main_resolution_table(results, p)
    figures, fam_genes = _scores_and_figures(inputs, results, p, label_key, out_dir)
    enr = results["scgpt"][1][float(p.resolution)]
    shared, only_e, only_c = terms
    genes = inputs.genes
    summary = {
        "checkpoint": str(checkpoint),
        "gmt": [str(g) for g in inputs.gmts],
        "genes_from": inputs.where,
        "n_genes_tested": len(genes),
        "n_genes_missing_from_vocab": len(inputs.ge.missing),
        "background": "the tested genes (background_genes.txt)",
        "n_background": len(genes),
        "graph": {"n_neighbors": p.n_neighbors, "metric": p.metric, "connectivities": "scanpy (UMAP)"},
        "leiden": {
            "resolutions": resolutions,
            "main_resolution": float(p.resolution),
            "seed": p.seed,
            "flavor": "leidenalg",
        },
        "min_program_genes": p.min_genes,
        "enrichment": {
            "test": "hypergeometric, one-sided (over-representation), scipy.stats.hypergeom",
            "correction": "Bonferroni over programs x tested terms, per resolution (n_tests in per_resolution)",
            "alpha": p.alpha,
            "min_term_genes": p.min_term_genes,
            "n_terms": len(inputs.gene_sets),
            "n_terms_tested": enr.n_terms_tested,
        },
        "per_resolution": per_res,
        "terms_shared": shared,
        "terms_only_scgpt": only_e,
        "terms_only_coexpression": only_c,
        "coexpression_note": coexpr_note,
        "family": {"regex": p.family, "genes": fam_genes},
        "figures": [str(f) for f in figures],
    }
    from scgpt_train.evaluation.report import write_json

    write_json(summary, out_dir / "summary.json")
    write_text_atomic(out_dir / "report.md", _report(summary, inputs, per_res, table_rows, p))
    summary["out_dir"] = str(out_dir)
    return summary


# compute ---------------------------------------------------------------------------------------------------------
def _read_inputs(checkpoint, gmt, p: GeneProgramParams, genes_file, adata_path, gene_column, use_raw, label_key, say):
    """The gene sets, the model's embeddings of the tested genes (a list, the AnnData's HVGs or the vocabulary) and
    the AnnData's log expression; genes the AnnData or the vocabulary lack are left out with a note."""
    from scgpt_train.inference import load_for_inference, read_h5ad_checked

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
        requested = select_hvgs(adata, names, vocab, p.n_hvg, gene_column, use_raw, adata_path)
        where = f"the {len(requested)} most variable vocabulary genes of {adata_path} (--n-hvg {p.n_hvg})"
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
    if len(genes) < max(p.min_genes, 3):
        raise GeneProgramError(f"only {len(genes)} genes of {where} can be tested; need at least {max(p.min_genes, 3)}")
    check_gene_sets(gene_sets, vocab.genes, genes, ", ".join(str(g) for g in gmts))
    say(f"{len(genes)} genes tested ({where}); {len(gene_sets)} gene sets")
    return _Inputs(gmts, gene_sets, where, ge, adata, x_log, names)


def _programs(inputs: _Inputs, p: GeneProgramParams, resolutions: list[float]) -> tuple[dict, str | None]:
    """({method: (programs per resolution, enrichment per resolution)}, a note on the co-expression baseline):
    Leiden programs of the gene embeddings and, with an AnnData, of the genes' co-expression."""
    genes = inputs.genes

    def enrich(progs):  # one analysis per resolution: Bonferroni over that resolution's programs x terms
        return {r: enrichment(progs[r], inputs.gene_sets, genes, p.min_term_genes) for r in resolutions}

    args = (p.n_neighbors, p.metric, p.min_genes, p.seed)
    programs, _ = leiden_programs(inputs.ge.emb, genes, resolutions, *args)
    results = {"scgpt": (programs, enrich(programs))}
    # co-expression baseline on the same genes and background
    if inputs.x_log is None:
        return results, "no --adata: the co-expression baseline needs expression values"
    col = {g: i for i, g in enumerate(inputs.names)}
    feats, ok = coexpression_features(inputs.x_log[:, [col[g] for g in genes]], COEXPR_PCS, p.seed)
    c_genes = [g for g, k in zip(genes, ok, strict=True) if k]
    c_programs, _ = leiden_programs(feats, c_genes, resolutions, p.n_neighbors, "euclidean", p.min_genes, p.seed)
    c_programs = {r: {f"coexpr_{n}": g for n, g in progs.items()} for r, progs in c_programs.items()}
    results["coexpression"] = (c_programs, enrich(c_programs))
    note = None
    if not ok.all():
        note = f"{int((~ok).sum())} genes without variance over the cells left out of the co-expression graph"
    return results, note


# tables ----------------------------------------------------------------------------------------------------------
def _write_tables(inputs: _Inputs, results: dict, resolutions, p: GeneProgramParams, out_dir: Path) -> list[dict]:
    """programs.tsv, enrichment.tsv, networks.tsv, background_genes.txt; returns the per-resolution rows."""
    prog_rows, per_res = [], []
    for method, (progs, enr_by_res) in results.items():
        for r in resolutions:
            table = enr_by_res[r].table
            enriched = table[table["p_bonferroni"] < p.alpha]
            per_res.append(
                {
                    "method": method,
                    "resolution": r,
                    "n_tests": enr_by_res[r].n_tests,
                    "n_programs": len(progs[r]),
                    "n_genes_in_programs": int(sum(len(v) for v in progs[r].values())),
                    "n_programs_enriched": int(enriched["program"].nunique()),
                    "n_terms_enriched": int(enriched["term"].nunique()),
                }
            )
            prog_rows += [
                {"method": method, "resolution": r, "program": name, "n_genes": len(members),
                 "genes": ",".join(members)}
                for name, members in progs[r].items()
            ]  # fmt: skip
    programs_df = pd.DataFrame(prog_rows, columns=["method", "resolution", "program", "n_genes", "genes"])
    enrich_df = pd.concat(
        [e.table.assign(method=m, resolution=r) for m, (_, by_res) in results.items() for r, e in by_res.items()],
        ignore_index=True,
    )
    enrich_df = enrich_df[
        ["method", "resolution", *[c for c in enrich_df.columns if c not in ("method", "resolution")]]
    ]
    all_programs = {name: g for r in resolutions for name, g in results["scgpt"][0][r].items()}
    network_df = cosine_network(inputs.ge.emb, inputs.genes, all_programs)
    write_text_atomic(out_dir / "programs.tsv", programs_df.to_csv(sep="\t", index=False))
    write_text_atomic(out_dir / "enrichment.tsv", enrich_df.to_csv(sep="\t", index=False))
    write_text_atomic(out_dir / "networks.tsv", network_df.to_csv(sep="\t", index=False))
    write_text_atomic(out_dir / "background_genes.txt", "\n".join(inputs.genes) + "\n")
    return per_res


def _main_resolution_table(results: dict, p: GeneProgramParams) -> tuple[list[list], tuple[list, list, list]]:
    """(the main resolution's programs with their top enriched term and best co-expression match; the enriched
    terms shared by both methods, only the gene embeddings', only co-expression's, over all resolutions)."""
    main = results["scgpt"][0][float(p.resolution)]
    c_main = results["coexpression"][0][float(p.resolution)] if "coexpression" in results else {}
    enr = results["scgpt"][1][float(p.resolution)]
    sig_e = enr.table[(enr.table["p_bonferroni"] < p.alpha)]
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
    terms_e = set().union(*(_significant_terms(e.table, p.alpha) for e in results["scgpt"][1].values()))
    terms_c = (
        set().union(*(_significant_terms(e.table, p.alpha) for e in results["coexpression"][1].values()))
        if "coexpression" in results
        else set()
    )
    return table_rows, (sorted(terms_e & terms_c), sorted(terms_e - terms_c), sorted(terms_c - terms_e))


# report ----------------------------------------------------------------------------------------------------------
def _scores_and_figures(inputs: _Inputs, results: dict, p: GeneProgramParams, label_key, out_dir: Path):
    """(figures, the family's genes): the gene family's cosine network; with an AnnData the main programs' scores
    per cell (scores.h5ad) and, with ``label_key``, their heatmap over the cell types."""
    from scgpt_train.evaluation.report import write_h5ad

    genes, main = inputs.genes, results["scgpt"][0][float(p.resolution)]
    figures = []
    fam_re = re.compile(p.family)
    fam_genes = [g for g in genes if fam_re.search(g)]
    if len(fam_genes) >= 2:
        figures.append(
            plot_family_network(
                inputs.ge.emb, genes, fam_genes, _program_of(main), p.network_threshold,
                out_dir / "family_network.png", f"gene embeddings: {p.family}",
            )
        )  # fmt: skip
    adata = inputs.adata
    if adata is not None and main:
        col = {g: i for i, g in enumerate(inputs.names)}
        scores = program_scores(inputs.x_log[:, [col[g] for g in genes]], genes, main, p.seed)
        for name in main:
            adata.obs[f"gp_{name}"] = scores[name].to_numpy()
        write_h5ad(adata, out_dir / "scores.h5ad")
        if label_key is not None:
            figures.append(
                plot_program_heatmap(
                    scores, adata.obs[label_key], out_dir / "program_heatmap.png",
                    f"gene-embedding programs (resolution {p.resolution:g}) over {label_key}",
                )
            )  # fmt: skip
    return figures, fam_genes


def _report(summary: dict, inputs: _Inputs, per_res: list[dict], table_rows: list, p: GeneProgramParams) -> str:
    """report.md: the settings, the per-resolution table, the main resolution's programs, the shared terms."""
    from scgpt_train.evaluation.report import markdown_table

    genes, enr_tested = inputs.genes, summary["enrichment"]["n_terms_tested"]
    shared, only_e, only_c = summary["terms_shared"], summary["terms_only_scgpt"], summary["terms_only_coexpression"]
    report = [
        "# Gene programs from gene embeddings\n",
        f"Checkpoint `{summary['checkpoint']}`; {len(genes)} genes tested ({inputs.where}); gene sets: "
        + ", ".join(f"`{Path(g).name}`" for g in inputs.gmts)
        + f" ({len(inputs.gene_sets)} sets, {enr_tested} with >= {p.min_term_genes} tested genes). kNN graph k "
        f"{p.n_neighbors} ({p.metric}), Leiden (seed {p.seed}), programs >= {p.min_genes} genes; hypergeometric "
        f"test, background = the {len(genes)} tested genes, Bonferroni over programs x terms of each resolution, "
        f"alpha {p.alpha}.\n",
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
        ),  # fmt: skip
        f"\n## Programs at resolution {p.resolution:g}\n",
        markdown_table(
            ["program", "genes", "members", "top enriched term", "terms enriched", "best co-expression match"],
            table_rows,
        )
        if table_rows
        else f"No program of >= {p.min_genes} genes at this resolution.\n",
        "\n## Enriched terms: gene embeddings vs co-expression (all resolutions)\n",
        f"- shared ({len(shared)}): {', '.join(shared[:30]) or '-'}\n",
        f"- only gene embeddings ({len(only_e)}): {', '.join(only_e[:30]) or '-'}\n",
        f"- only co-expression ({len(only_c)}): {', '.join(only_c[:30]) or '-'}\n",
    ]
    if summary["coexpression_note"]:
        report.append(f"\nNote: {summary['coexpression_note']}.\n")
    if summary["figures"]:
        figures = [Path(f) for f in summary["figures"]]
        report.append("\n## Figures\n\n" + "".join(f"![{f.stem}]({f.name})\n" for f in figures))
    return "\n".join(report)
