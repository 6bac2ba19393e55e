"""Gene programs from a checkpoint's gene embeddings (the scGPT paper's GRN analysis), checked against gene sets
and against a co-expression network built through the same pipeline.

Pipeline (the official GRN tutorial's, made a function):

1. gene embeddings: ``model.gene_encoder(ids)``, the token embedding followed by its LayerNorm (what the
   transformer reads), for the tested genes: a list (``genes``), the ``n_hvg`` most variable genes of an AnnData
   among those in the vocabulary (seurat_v3 on counts, else seurat on log values), or the whole vocabulary;
2. a kNN graph over genes with scanpy's defaults as the tutorial calls them (``sc.pp.neighbors(use_rep="X")``:
   k = 15, Euclidean, UMAP connectivities; ``metric="cosine"`` as an option);
3. Leiden (``sc.tl.leiden``, leidenalg, seeded) at each of several resolutions (the tutorial uses 40); a
   program is a cluster of >= ``min_genes`` (5) genes; programs are named ``r<resolution>_<k>`` by size;
4. per program: the within-program cosine network (every gene pair's cosine similarity of embeddings), and,
   with an AnnData, a per-cell score (``sc.tl.score_genes`` on log-normalized values, seeded) in ``obs``;
5. enrichment against GMT gene sets: one-sided hypergeometric test of each program x term, the background being
   the tested genes (recorded; terms with < ``min_term_genes`` background genes are not tested), Bonferroni over
   all programs x tested terms (scipy; gseapy is not used);
6. the co-expression baseline through steps 2-5: each gene's z-scored log-expression profile over the AnnData's
   cells (Euclidean distance between z-scores is a monotone function of Pearson correlation), reduced to 50
   principal components, then the same graph, Leiden, programs and enrichment on the same genes and background;
7. a report: per-resolution counts, a program table (genes, top enriched term, best co-expression match by
   Jaccard), the terms enriched in both / only one of the two, and figures (program scores over cell types, the
   cosine network of a gene family such as HLA-* / CD3D-E-G).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from data_modules.atomic import write_text_atomic
from data_modules.vocab import GeneVocab

log = logging.getLogger(__name__)

DEFAULT_RESOLUTIONS = (1.0, 5.0, 10.0, 20.0, 40.0)
OFFICIAL_RESOLUTION = 40.0  # the GRN tutorial's Leiden resolution
MIN_PROGRAM_GENES = 5
MIN_TERM_GENES = 3
ALPHA = 0.05
DEFAULT_FAMILY = r"^(HLA-|CD3[DEG]$)"
COEXPR_PCS = 50


class GeneProgramError(ValueError):
    """An input gene-program analysis cannot use; the message names the file, gene or key and the fix."""


# ---------------------------------------------------------------------------------------
# inputs


def read_gmt(path) -> dict[str, list[str]]:
    """{term: genes} of a GMT file (name, description, genes... tab-separated); raises naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise GeneProgramError(f"--gmt {path} does not exist (fetch the MSigDB files with fetch_resources())")
    sets: dict[str, list[str]] = {}
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) < 3:
            raise GeneProgramError(
                f"{path} line {no}: a GMT line is NAME<tab>DESCRIPTION<tab>GENE..., got {len(fields)} field(s)"
            )
        genes = [g for g in fields[2:] if g]
        if fields[0] in sets:
            raise GeneProgramError(f"{path} line {no}: gene set {fields[0]!r} appears twice")
        sets[fields[0]] = list(dict.fromkeys(genes))
    if not sets:
        raise GeneProgramError(f"--gmt {path} holds no gene set")
    return sets


def read_gene_list(path) -> list[str]:
    """Genes of a text file, one per line (blank lines and # comments ignored), in order, duplicates dropped."""
    path = Path(path)
    if not path.is_file():
        raise GeneProgramError(f"--genes {path} does not exist")
    genes = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    genes = list(dict.fromkeys(g for g in genes if g))
    if not genes:
        raise GeneProgramError(f"--genes {path} lists no gene")
    return genes


@dataclass
class GeneEmbeddings:
    genes: list[str]  # tested genes (in the vocabulary), in input order
    emb: np.ndarray  # (G, d) float32: gene encoder output (embedding + LayerNorm)
    missing: list[str]  # requested genes not in the vocabulary


@torch.no_grad()
def gene_embeddings(model, vocab: GeneVocab, genes: Sequence[str], where: str = "the gene list") -> GeneEmbeddings:
    """The gene encoder's output (token embedding + its LayerNorm) of every gene of ``genes`` in the vocabulary."""
    ids = vocab.map_genes(list(genes)).ids
    known = ids >= 0
    if not known.any():
        raise GeneProgramError(
            f"none of the {len(genes)} genes of {where} (e.g. {list(genes)[:3]}) is in the checkpoint's vocabulary "
            f"(e.g. {vocab.genes[:3]}); use gene symbols of the vocabulary's kind"
        )
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = model.gene_encoder(torch.as_tensor(ids[known], device=device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    kept = [g for g, k in zip(genes, known) if k]
    return GeneEmbeddings(kept, out.astype(np.float32), [g for g, k in zip(genes, known) if not k])


def adata_gene_names(adata, gene_column: str | None, use_raw: bool, path) -> list[str]:
    var = adata.raw.var if use_raw else adata.var
    if gene_column is None:
        return [str(g) for g in var.index]
    if gene_column not in var.columns:
        raise GeneProgramError(
            f"--adata {path}: --gene-column {gene_column!r} is not a var column (columns: {list(var.columns)[:15]})"
        )
    return [str(g) for g in var[gene_column]]


def log_expression(adata, gene_column: str | None, use_raw: bool, path) -> tuple[sp.csr_matrix, list[str]]:
    """(cells x genes) log-normalized CSR of an AnnData (counts normalized to 1e4 + log1p; log values as stored)
    and its gene names; duplicated names keep their first column."""
    from scgpt_train.tasks.reference_map import log_normalized

    names = adata_gene_names(adata, gene_column, use_raw, path)
    x = adata.raw.X if use_raw else adata.X
    if x is None:
        raise GeneProgramError(f"--adata {path}: {'.raw.X' if use_raw else 'X'} is empty")
    _, first = np.unique(np.asarray(names), return_index=True)
    keep = np.sort(first)
    x = sp.csr_matrix(x)[:, keep]
    return log_normalized(x, f"{path}: {'.raw.X' if use_raw else 'X'}"), [names[i] for i in keep]


def select_hvgs(adata, names: list[str], vocab: GeneVocab, n_hvg: int, gene_column, use_raw, path) -> list[str]:
    """The ``n_hvg`` most variable genes among those of the AnnData in the vocabulary (seurat_v3 on counts with
    scikit-misc, else seurat on log values), in the AnnData's order."""
    import anndata as ad

    from data_modules.preprocess import select_hvg
    from data_modules.value_types import detect_value_type

    x_raw = sp.csr_matrix(adata.raw.X if use_raw else adata.X)
    all_names = adata_gene_names(adata, gene_column, use_raw, path)
    col = {g: i for i, g in reversed(list(enumerate(all_names)))}
    in_vocab = [g for g in names if vocab.map_genes([g]).ids[0] >= 0]
    if not in_vocab:
        raise GeneProgramError(
            f"--adata {path}: none of its {len(names)} genes (e.g. {names[:3]}) is in the checkpoint's vocabulary "
            f"(e.g. {vocab.genes[:3]}); pass --gene-column with the var column holding gene symbols"
        )
    cols = [col[g] for g in in_vocab]
    counts = x_raw[:, cols]
    is_counts = detect_value_type(counts, str(path)).value_type == "counts"
    from scgpt_train.tasks.reference_map import log_normalized

    logx = log_normalized(counts, str(path))
    probe = ad.AnnData(X=logx, var=pd.DataFrame(index=in_vocab))
    mask, flavor = select_hvg(probe, n_hvg, "seurat_v3" if is_counts else "seurat", counts if is_counts else None)
    log.info("%d HVGs (%s) among %d vocabulary genes of %s", int(mask.sum()), flavor, len(in_vocab), path)
    return [g for g, m in zip(in_vocab, mask) if m]


# ---------------------------------------------------------------------------------------
# graph, Leiden, programs


def knn_connectivities(x: np.ndarray, n_neighbors: int = 15, metric: str = "euclidean", seed: int = 0):
    """scanpy's kNN graph of the rows of ``x`` (``sc.pp.neighbors(use_rep="X")``): (n, n) CSR connectivities."""
    import anndata as ad
    import scanpy as sc

    if metric not in ("euclidean", "cosine"):
        raise GeneProgramError(f"--metric must be euclidean or cosine, got {metric!r}")
    a = ad.AnnData(X=np.asarray(x, dtype=np.float32))
    k = int(min(n_neighbors, max(2, a.n_obs - 1)))
    sc.pp.neighbors(a, n_neighbors=k, use_rep="X", metric=metric, random_state=seed)
    return a.obsp["connectivities"].tocsr()


def leiden_labels(connectivities, resolution: float, seed: int = 0) -> np.ndarray:
    """(n,) int cluster of every node: ``sc.tl.leiden`` (leidenalg, scanpy's defaults) with ``random_state=seed``."""
    import anndata as ad
    import scanpy as sc

    n = connectivities.shape[0]
    a = ad.AnnData(X=sp.csr_matrix((n, 1), dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sc.tl.leiden(a, resolution=float(resolution), random_state=seed, adjacency=connectivities, flavor="leidenalg")
    return a.obs["leiden"].astype(int).to_numpy()


def programs_from_labels(
    genes: Sequence[str], labels: np.ndarray, resolution: float, min_genes: int = MIN_PROGRAM_GENES
) -> dict[str, list[str]]:
    """{name: genes} of the clusters with >= ``min_genes`` genes, largest first (ties: first gene), named
    ``r<resolution>_<k>``."""
    groups: dict[int, list[str]] = {}
    for g, lab in zip(genes, labels):
        groups.setdefault(int(lab), []).append(g)
    kept = sorted((sorted(v) for v in groups.values() if len(v) >= min_genes), key=lambda v: (-len(v), v[0]))
    tag = f"{resolution:g}"
    return {f"r{tag}_{k}": v for k, v in enumerate(kept)}


def leiden_programs(
    x: np.ndarray,
    genes: Sequence[str],
    resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
    n_neighbors: int = 15,
    metric: str = "euclidean",
    min_genes: int = MIN_PROGRAM_GENES,
    seed: int = 0,
) -> tuple[dict[float, dict[str, list[str]]], dict[float, np.ndarray]]:
    """Programs per resolution ({resolution: {name: genes}}) and the Leiden labels per resolution."""
    conn = knn_connectivities(x, n_neighbors, metric, seed)
    programs, labels = {}, {}
    for r in resolutions:
        labels[float(r)] = leiden_labels(conn, r, seed)
        programs[float(r)] = programs_from_labels(genes, labels[float(r)], r, min_genes)
    return programs, labels


def cosine_network(emb: np.ndarray, genes: Sequence[str], programs: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Every gene pair within each program with the cosine similarity of their embeddings."""
    pos = {g: i for i, g in enumerate(genes)}
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    rows = []
    for name, members in programs.items():
        idx = np.array([pos[g] for g in members])
        sim = unit[idx] @ unit[idx].T
        a, b = np.triu_indices(len(idx), 1)
        rows.append(
            pd.DataFrame(
                {
                    "program": name,
                    "gene_a": np.asarray(members)[a],
                    "gene_b": np.asarray(members)[b],
                    "cosine": sim[a, b],
                }
            )
        )
    return (
        pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["program", "gene_a", "gene_b", "cosine"])
    )


# ---------------------------------------------------------------------------------------
# enrichment


@dataclass
class EnrichmentResult:
    table: pd.DataFrame  # one row per program x tested term with overlap >= 1
    n_tests: int  # programs x tested terms: the Bonferroni factor
    n_terms_tested: int
    n_terms_skipped: int  # terms with < min_term_genes genes in the background
    background: list[str]


def check_gene_sets(gene_sets: Mapping[str, Sequence[str]], vocab_genes, tested, where: str) -> None:
    """Refuse gene sets that share no gene with the vocabulary, or no gene with the tested genes."""
    all_genes = {g for s in gene_sets.values() for g in s}
    vocab_set = set(vocab_genes)
    if not all_genes & vocab_set:
        raise GeneProgramError(
            f"{where}: none of its {len(all_genes)} genes (e.g. {sorted(all_genes)[:3]}) is in the checkpoint's "
            f"vocabulary (e.g. {list(vocab_genes)[:3]}); the gene sets and the checkpoint must name genes the same "
            "way (symbols vs Ensembl ids, human vs mouse)"
        )
    if not all_genes & set(tested):
        raise GeneProgramError(
            f"{where}: none of its genes is among the {len(tested)} tested genes (e.g. {list(tested)[:3]}); test "
            "more genes (--n-hvg, --genes) or use gene sets of this tissue"
        )


def enrichment(
    programs: Mapping[str, Sequence[str]],
    gene_sets: Mapping[str, Sequence[str]],
    background: Sequence[str],
    min_term_genes: int = MIN_TERM_GENES,
) -> EnrichmentResult:
    """Hypergeometric over-representation of every term in every program, background = ``background`` (the tested
    genes): p = P(X >= overlap), X ~ Hypergeom(M = |background|, n = |term ∩ background|, N = |program|);
    Bonferroni over programs x tested terms (terms with >= ``min_term_genes`` background genes)."""
    from scipy.stats import hypergeom

    bg = list(dict.fromkeys(background))
    pos = {g: i for i, g in enumerate(bg)}
    m = len(bg)
    names = list(programs)
    prog = np.zeros((len(names), m), dtype=bool)
    for i, name in enumerate(names):
        outside = [g for g in programs[name] if g not in pos]
        if outside:
            raise GeneProgramError(f"program {name}: genes outside the background {outside[:5]}")
        prog[i, [pos[g] for g in programs[name]]] = True
    terms = [(t, [pos[g] for g in dict.fromkeys(genes) if g in pos]) for t, genes in gene_sets.items()]
    tested = [(t, cols) for t, cols in terms if len(cols) >= min_term_genes]
    term_mat = np.zeros((len(tested), m), dtype=bool)
    for j, (_, cols) in enumerate(tested):
        term_mat[j, cols] = True
    overlap = prog.astype(np.int64) @ term_mat.T.astype(np.int64)  # (P, T)
    n_prog = prog.sum(1)  # (P,)
    n_term = term_mat.sum(1)  # (T,)
    n_tests = len(names) * len(tested)
    rows = []
    pi, tj = np.nonzero(overlap)
    if len(pi):
        k = overlap[pi, tj]
        p = hypergeom.sf(k - 1, m, n_term[tj], n_prog[pi])
        for a, b, kk, pv in zip(pi, tj, k, p):
            genes = [bg[c] for c in np.flatnonzero(prog[a] & term_mat[b])]
            rows.append(
                {
                    "program": names[a],
                    "term": tested[b][0],
                    "n_program": int(n_prog[a]),
                    "n_term_background": int(n_term[b]),
                    "n_background": m,
                    "overlap": int(kk),
                    "expected": float(n_prog[a] * n_term[b] / m),
                    "p_value": float(pv),
                    "p_bonferroni": float(min(1.0, pv * n_tests)),
                    "overlap_genes": ",".join(genes),
                }
            )
    cols = [
        "program",
        "term",
        "n_program",
        "n_term_background",
        "n_background",
        "overlap",
        "expected",
        "p_value",
        "p_bonferroni",
        "overlap_genes",
    ]
    table = pd.DataFrame(rows, columns=cols).sort_values(["p_value", "program", "term"], ignore_index=True)
    return EnrichmentResult(table, n_tests, len(tested), len(terms) - len(tested), bg)


# ---------------------------------------------------------------------------------------
# co-expression baseline and program scores


def coexpression_features(
    x_log: sp.csr_matrix, n_pcs: int = COEXPR_PCS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(genes x features) of each gene's z-scored profile over cells, reduced to ``n_pcs`` components, and the
    (G,) bool mask of genes with any variance (the others have no co-expression and are left out)."""
    from sklearn.decomposition import PCA

    x = np.asarray(x_log.toarray() if sp.issparse(x_log) else x_log, dtype=np.float64).T  # (G, cells)
    sd = x.std(1)
    ok = sd > 0
    z = (x[ok] - x[ok].mean(1, keepdims=True)) / sd[ok, None]
    n = int(min(n_pcs, z.shape[0] - 1, z.shape[1]))
    feats = PCA(n_components=n, random_state=seed).fit_transform(z).astype(np.float32) if n >= 2 else z
    return feats, ok


def program_scores(x_log: sp.csr_matrix, genes: Sequence[str], programs, seed: int = 0) -> pd.DataFrame:
    """(cells x programs) ``sc.tl.score_genes`` scores (mean of the program minus a matched control set)."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(X=sp.csr_matrix(x_log, dtype=np.float32), var=pd.DataFrame(index=list(genes)))
    out = {}
    for name, members in programs.items():
        sc.tl.score_genes(a, list(members), score_name="_score", random_state=seed, ctrl_size=50)
        out[name] = a.obs["_score"].to_numpy(dtype=np.float32)
    return pd.DataFrame(out, index=a.obs_names)


# ---------------------------------------------------------------------------------------
# figures


def plot_program_heatmap(scores: pd.DataFrame, cell_types, path, title: str) -> Path:
    """Mean program score per cell type, z-scored per program across cell types."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scgpt_train.tasks.report import _save_fig

    means = scores.groupby(np.asarray(cell_types).astype(str)).mean().T  # (programs, types)
    z = means.sub(means.mean(1), axis=0).div(means.std(1).replace(0, 1), axis=0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * z.shape[1], 1.2 + 0.28 * z.shape[0]))
    im = ax.imshow(z.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-2, vmax=2)
    ax.set_xticks(range(z.shape[1]), z.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(z.shape[0]), z.index, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="mean score (z across cell types)")
    return _save_fig(fig, Path(path))


def plot_family_network(
    emb: np.ndarray,
    genes: Sequence[str],
    family: Sequence[str],
    program_of: Mapping[str, str],
    threshold: float,
    path,
    title: str,
) -> Path:
    """Genes of a family as nodes, edges where the embeddings' cosine similarity >= ``threshold`` (width ~ cosine),
    nodes coloured by program."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    from scgpt_train.tasks.report import _save_fig

    pos = {g: i for i, g in enumerate(genes)}
    idx = np.array([pos[g] for g in family])
    unit = emb[idx] / np.maximum(np.linalg.norm(emb[idx], axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    graph = nx.Graph()
    graph.add_nodes_from(family)
    for a, b in zip(*np.triu_indices(len(family), 1)):
        if sim[a, b] >= threshold:
            graph.add_edge(family[a], family[b], weight=float(sim[a, b]))
    layout = nx.spring_layout(graph, seed=0, weight="weight")
    groups = sorted({program_of.get(g, "none") for g in family})
    cmap = plt.get_cmap("tab20")
    colors = [cmap(groups.index(program_of.get(g, "none")) % 20) for g in family]
    fig, ax = plt.subplots(figsize=(6, 5))
    widths = [3 * graph[u][v]["weight"] for u, v in graph.edges]
    nx.draw_networkx_edges(graph, layout, ax=ax, width=widths, alpha=0.5)
    nx.draw_networkx_nodes(graph, layout, ax=ax, node_color=colors, node_size=260)
    nx.draw_networkx_labels(graph, layout, ax=ax, font_size=7)
    for k, grp in enumerate(groups):
        ax.scatter([], [], color=cmap(k % 20), label=grp)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False, title="program", title_fontsize=7)
    ax.set_title(f"{title} (edges: cosine >= {threshold:g})", fontsize=9)
    ax.axis("off")
    return _save_fig(fig, Path(path))


# ---------------------------------------------------------------------------------------
# the whole run


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
    *,
    genes_file=None,
    adata_path=None,
    n_hvg: int = 1200,
    gene_column: str | None = None,
    use_raw: bool = False,
    label_key: str | None = None,
    resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
    resolution: float = OFFICIAL_RESOLUTION,
    n_neighbors: int = 15,
    metric: str = "euclidean",
    min_genes: int = MIN_PROGRAM_GENES,
    min_term_genes: int = MIN_TERM_GENES,
    alpha: float = ALPHA,
    family: str = DEFAULT_FAMILY,
    network_threshold: float = 0.3,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Gene-embedding programs of ``checkpoint`` with enrichment, scores and the co-expression baseline; writes
    ``out_dir`` (see docs/grn.md) and returns the summary."""
    from scgpt_train.tasks.reference_map import load_model
    from scgpt_train.tasks.report import markdown_table, write_h5ad, write_json

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
    model, vocab = load_model(checkpoint)

    adata = x_log = None
    names: list[str] = []
    if adata_path is not None:
        from scgpt_train.tasks.reference_map import read_h5ad_checked

        adata = read_h5ad_checked(adata_path, "--adata")
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
        c_genes = [g for g, k in zip(genes, ok) if k]
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
