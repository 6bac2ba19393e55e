"""Reverse perturbation: which perturbation produced an observed cell state? Retrieval scoring and baselines.

Protocol (scGPT paper, Norman data): a gene subspace of the ``n`` (20) genes that occur most often in the
training and test conditions (:func:`subspace_genes`; ties broken by gene name), every single and pair of them as
candidates (20 + 190 = 210, :func:`candidate_conditions`). A model predicts cells for every candidate (from 40
seeded control cells each); every real query cell of a query condition retrieves its ``n_neighbors`` nearest
predicted cells (Euclidean; faiss when importable, else scikit-learn), each retrieved cell votes for its
candidate, votes are pooled over the query condition's cells, and candidates are ranked by votes (ties, and
candidates without votes, ordered by the distance between the query condition's mean and the candidate's mean
prediction, then by name): :func:`retrieve`.

Scores at K = 1..8 (:func:`score_rankings`): ``correct@K`` - the query condition is among the top K;
``relevant@K`` - some top-K candidate shares a gene with it (gene SET membership, never substring matching:
``AB`` is not ``A``). Chance levels are analytic for a uniformly random ranking of N candidates
(:func:`chance_levels`): ``correct@K = K / N``; ``relevant@K = 1 - C(N - R, K) / C(N, K)`` with R the
candidates sharing a gene with the query; the correct candidate's expected rank is ``(N + 1) / 2`` (105.5 for 210).

Baselines, each giving rankings scored the same way: :func:`random_rankings`; :func:`top_de_rankings` (the
query's top-2 differentially expressed candidate genes by |Welch t| against control cells, the second only if it
passes a noise threshold); :func:`expression_oracle_rankings` (reads the candidate genes' own expression change -
with CRISPRa the targets are over-expressed, so this measures target leakage); and retrieval with the candidate
genes masked out of the distances (:func:`genes_without`, passed as ``genes`` to :func:`retrieve`).
"""

from __future__ import annotations

import importlib.util
import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from math import comb

import numpy as np
import pandas as pd

from data_modules.perturbation.conditions import condition_genes, condition_name, normalize_condition

KS = tuple(range(1, 9))
N_SUBSPACE_GENES = 20
N_NEIGHBORS = 10
POOL_SIZE = 40  # control cells each candidate is predicted from (paper)
NULL_QUANTILE = 0.95  # evidence a gene needs (quantile over all genes) for the DE / oracle baselines to call it

Rankings = Mapping[str, Sequence[str]]


# the candidate space ----------------------------------------------------------------------------------------------
def subspace_genes(conditions: Iterable[str], n_genes: int = N_SUBSPACE_GENES) -> list[str]:
    """The ``n_genes`` genes occurring most often in ``conditions`` (pass the training and test condition lists;
    every entry counts, so a per-cell list counts cells). Ties broken by gene name."""
    counts = Counter(g for c in conditions for g in condition_genes(c))
    ranked = sorted(counts, key=lambda g: (-counts[g], g))
    if len(ranked) < n_genes:
        raise ValueError(f"only {len(ranked)} perturbed genes occur; the subspace needs {n_genes}")
    return sorted(ranked[:n_genes])


def candidate_conditions(genes: Sequence[str]) -> list[str]:
    """Every single and every pair of ``genes``, canonical names (n + n(n-1)/2 candidates)."""
    genes = sorted(dict.fromkeys(genes))
    singles = [condition_name([g]) for g in genes]
    return singles + [condition_name(p) for p in itertools.combinations(genes, 2)]


def in_subspace(condition: str, genes: Iterable[str]) -> bool:
    """Whether every gene of a perturbed ``condition`` is in ``genes`` (``ctrl`` is not a candidate)."""
    g = condition_genes(condition)
    return len(g) > 0 and set(g) <= set(genes)


def is_correct(query: str, candidate: str) -> bool:
    return normalize_condition(query) == normalize_condition(candidate)


def is_relevant(query: str, candidate: str) -> bool:
    """The candidate shares at least one gene with the query (set membership of gene names)."""
    return bool(set(condition_genes(query)) & set(condition_genes(candidate)))


# chance -----------------------------------------------------------------------------------------------------------
def n_relevant(query: str, candidates: Sequence[str]) -> int:
    return sum(is_relevant(query, c) for c in candidates)


def chance_correct(n_candidates: int, k: int) -> float:
    return min(k, n_candidates) / n_candidates


def chance_relevant(n_candidates: int, n_relevant_candidates: int, k: int) -> float:
    """P(a uniformly random top-K of N candidates holds at least one of the R relevant ones)."""
    k = min(k, n_candidates)
    return 1.0 - comb(n_candidates - n_relevant_candidates, k) / comb(n_candidates, k)


def expected_rank(n_candidates: int) -> float:
    """Expected rank of the correct candidate in a random ranking (tries a random guesser needs)."""
    return (n_candidates + 1) / 2


def chance_levels(queries: Sequence[str], candidates: Sequence[str], ks: Sequence[int] = KS) -> pd.DataFrame:
    """Analytic chance ``correct`` / ``relevant`` at each K, averaged over the query conditions."""
    n = len(candidates)
    queries = [normalize_condition(q) for q in dict.fromkeys(queries)]
    rel = [n_relevant(q, candidates) for q in queries]
    rows = {
        k: {
            "correct": float(np.mean([chance_correct(n, k) for _ in queries])),
            "relevant": float(np.mean([chance_relevant(n, r, k) for r in rel])),
        }
        for k in ks
    }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("K")


# retrieval --------------------------------------------------------------------------------------------------------
def nearest_neighbors(reference: np.ndarray, queries: np.ndarray, k: int, backend: str = "auto"):
    """(distances, indices) of the ``k`` nearest reference rows of each query row (Euclidean, exact)."""
    reference = np.ascontiguousarray(reference, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(reference))
    if backend == "auto":
        backend = "faiss" if importlib.util.find_spec("faiss") is not None else "sklearn"
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatL2(reference.shape[1])
        index.add(reference)
        d2, idx = index.search(queries, k)
        return np.sqrt(np.maximum(d2, 0.0)), idx
    if backend == "sklearn":
        from sklearn.neighbors import NearestNeighbors

        dist, idx = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(reference).kneighbors(queries)
        return dist, idx
    raise ValueError(f"backend must be 'auto', 'faiss' or 'sklearn', got {backend!r}")


def retrieve(
    reference: np.ndarray,
    reference_labels: Sequence[str],
    queries: np.ndarray,
    query_labels: Sequence[str],
    n_neighbors: int = N_NEIGHBORS,
    genes: np.ndarray | None = None,
    backend: str = "auto",
) -> dict[str, list[str]]:
    """Rank the candidates (the distinct ``reference_labels``) for every query condition by pooled votes.

    ``reference``: predicted cells (rows) labelled by candidate; ``queries``: real cells labelled by their true
    condition; ``genes``: column indices used for distances (e.g. :func:`genes_without` the candidate genes).
    """
    ref_labels = np.asarray([normalize_condition(c) for c in reference_labels], dtype=object)
    q_labels = np.asarray([normalize_condition(c) for c in query_labels], dtype=object)
    reference, queries = np.asarray(reference, dtype=np.float64), np.asarray(queries, dtype=np.float64)
    if reference.shape[0] != len(ref_labels) or queries.shape[0] != len(q_labels):
        raise ValueError("labels must have one entry per row of reference / queries")
    if genes is not None:
        reference, queries = reference[:, genes], queries[:, genes]
    candidates = list(dict.fromkeys(ref_labels))
    centroids = np.stack([reference[ref_labels == c].mean(axis=0) for c in candidates])
    _, idx = nearest_neighbors(reference, queries, n_neighbors, backend)
    out = {}
    for q in dict.fromkeys(q_labels):
        rows = np.flatnonzero(q_labels == q)
        votes = Counter(ref_labels[idx[rows]].ravel().tolist())
        dist = np.sqrt(((centroids - queries[rows].mean(axis=0)) ** 2).sum(axis=1))
        order = sorted(range(len(candidates)), key=lambda i: (-votes.get(candidates[i], 0), dist[i], candidates[i]))
        out[q] = [candidates[i] for i in order]
    return out


def genes_without(gene_names: Sequence[str], exclude: Iterable[str]) -> np.ndarray:
    """Column indices of every gene not in ``exclude`` (to mask the candidate genes out of retrieval)."""
    exclude = set(exclude)
    return np.asarray([i for i, g in enumerate(gene_names) if g not in exclude], dtype=np.int64)


# scoring ----------------------------------------------------------------------------------------------------------
def rank_of_correct(query: str, ranking: Sequence[str]) -> float:
    """1-based rank of the query condition in ``ranking`` (inf if absent)."""
    q = normalize_condition(query)
    for i, c in enumerate(ranking, start=1):
        if normalize_condition(c) == q:
            return float(i)
    return float("inf")


def score_rankings(rankings: Rankings, ks: Sequence[int] = KS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, per_query): summary rows K with the mean ``correct`` and ``relevant`` over query conditions;
    per_query rows the query conditions with ``correct@K`` / ``relevant@K`` (0/1) and ``rank`` of the correct one."""
    per = {}
    for q, ranking in rankings.items():
        q = normalize_condition(q)
        row = {"rank": rank_of_correct(q, ranking)}
        for k in ks:
            top = list(ranking[:k])
            row[f"correct@{k}"] = float(any(is_correct(q, c) for c in top))
            row[f"relevant@{k}"] = float(any(is_relevant(q, c) for c in top))
        per[q] = row
    per_query = pd.DataFrame.from_dict(per, orient="index").rename_axis("query")
    summary = pd.DataFrame(
        {
            "correct": [per_query[f"correct@{k}"].mean() for k in ks],
            "relevant": [per_query[f"relevant@{k}"].mean() for k in ks],
        },
        index=pd.Index(list(ks), name="K"),
    )
    return summary, per_query


# baselines --------------------------------------------------------------------------------------------------------
def random_rankings(queries: Iterable[str], candidates: Sequence[str], seed: int = 0) -> dict[str, list[str]]:
    """A seeded uniformly random ranking of the candidates per query condition."""
    rng = np.random.default_rng(seed)
    cands = list(candidates)
    return {normalize_condition(q): [cands[i] for i in rng.permutation(len(cands))] for q in dict.fromkeys(queries)}


def rank_by_gene_scores(gene_scores: Mapping[str, float], candidates: Sequence[str], null: float) -> list[str]:
    """Candidates by the summed evidence of their genes, higher first (ties by name); a single's empty slot scores
    ``null``, the evidence a gene needs to be called perturbed. Rank 1 is therefore the pair of the two best genes
    when the second one beats ``null``, else the single of the best gene."""

    def score(c):
        genes = condition_genes(c)
        return sum(gene_scores.get(g, null) for g in genes) + null * (2 - len(genes))

    return sorted(candidates, key=lambda c: (-score(c), c))


def top_de_rankings(
    query_x: np.ndarray,
    query_labels: Sequence[str],
    ctrl_x: np.ndarray,
    gene_names: Sequence[str],
    candidates: Sequence[str],
    null_quantile: float = NULL_QUANTILE,
) -> dict[str, list[str]]:
    """The query's top-2 differentially expressed candidate genes: |Welch t| of every gene (query cells vs control
    cells); only candidate genes can form candidates, so rank 1 is the pair of the two highest-|t| candidate
    genes, or the single of the best one when the second does not pass the ``null_quantile`` quantile of |t|
    over all genes (:func:`rank_by_gene_scores`)."""
    query_x, ctrl_x = np.asarray(query_x, dtype=np.float64), np.asarray(ctrl_x, dtype=np.float64)
    labels = np.asarray([normalize_condition(c) for c in query_labels], dtype=object)
    n_c = len(ctrl_x)
    c_mean = ctrl_x.mean(axis=0)
    c_var = ctrl_x.var(axis=0, ddof=1) if n_c > 1 else np.zeros(ctrl_x.shape[1])
    out = {}
    for q in dict.fromkeys(labels):
        xq = query_x[labels == q]
        q_var = xq.var(axis=0, ddof=1) if len(xq) > 1 else np.zeros(xq.shape[1])
        se = np.sqrt(q_var / len(xq) + c_var / n_c)
        diff = np.abs(xq.mean(axis=0) - c_mean)
        t = np.divide(diff, se, out=np.where(diff > 0, np.inf, 0.0), where=se > 0)
        null = float(np.quantile(t[np.isfinite(t)], null_quantile)) if np.isfinite(t).any() else 0.0
        out[q] = rank_by_gene_scores(dict(zip(gene_names, t, strict=True)), candidates, null=null)
    return out


def expression_oracle_rankings(
    query_means: Mapping[str, np.ndarray],
    ctrl_mean: np.ndarray,
    gene_names: Sequence[str],
    candidates: Sequence[str],
    direction: str = "up",
    null_quantile: float = NULL_QUANTILE,
) -> dict[str, list[str]]:
    """Rank candidates by the change of the candidate genes' own mean expression in the query against control:
    ``direction`` ``"up"`` (CRISPRa: targets rise), ``"down"`` (CRISPRi / knock-down) or ``"abs"``; the null
    level is the ``null_quantile`` quantile of that score over all genes (:func:`rank_by_gene_scores`)."""
    sign = {"up": 1.0, "down": -1.0}.get(direction)
    if sign is None and direction != "abs":
        raise ValueError(f"direction must be 'up', 'down' or 'abs', got {direction!r}")
    out = {}
    for q, m in query_means.items():
        change = np.asarray(m, dtype=np.float64) - np.asarray(ctrl_mean, dtype=np.float64)
        score = np.abs(change) if sign is None else sign * change
        null = float(np.quantile(score, null_quantile))
        out[normalize_condition(q)] = rank_by_gene_scores(
            dict(zip(gene_names, score, strict=True)), candidates, null=null
        )
    return out
