"""Reverse-perturbation retrieval: candidate space, scoring by gene-set membership, chance levels, baselines
(issue #12)."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from scgpt_train.tasks.perturbation import reverse as R


def test_subspace_genes_by_occurrence_with_name_ties():
    conds = ["A+ctrl", "A+B", "B+C", "C+ctrl", "D+ctrl", "ctrl"]  # A 2, B 2, C 2, D 1
    assert R.subspace_genes(conds, 3) == ["A", "B", "C"]
    assert R.subspace_genes(conds, 2) == ["A", "B"]  # three genes tie at 2: by name
    assert R.subspace_genes(conds + ["D+ctrl", "D+A"], 2) == ["A", "D"]  # repeats count (cells or conditions)
    with pytest.raises(ValueError, match="only 4"):
        R.subspace_genes(conds, 5)


def test_candidate_conditions():
    assert R.candidate_conditions(["B", "A", "C"]) == ["A+ctrl", "B+ctrl", "C+ctrl", "A+B", "A+C", "B+C"]
    twenty = R.candidate_conditions([f"G{i:02d}" for i in range(20)])
    assert len(twenty) == 210 and len(set(twenty)) == 210
    assert R.in_subspace("G01+G03", [f"G{i:02d}" for i in range(20)]) and not R.in_subspace("G01+X", ["G01"])
    assert not R.in_subspace("ctrl", ["G01"])


def test_relevance_is_gene_set_membership_not_substring():
    assert not R.is_relevant("AB+ctrl", "A+ctrl")  # "A" is a substring of "AB", not the same gene
    assert not R.is_relevant("CD4+ctrl", "CD47+ctrl")
    assert R.is_relevant("A+B", "B+C") and R.is_relevant("ctrl+A", "A+ctrl")
    assert R.is_correct("B+A", "A+B") and not R.is_correct("A+B", "A+ctrl")


def test_chance_levels_analytic():
    n = 210
    assert R.chance_correct(n, 1) == pytest.approx(1 / 210)
    assert R.expected_rank(n) == pytest.approx(105.5)  # the paper's "random needs 105.5 tries"
    cands = R.candidate_conditions([f"G{i:02d}" for i in range(20)])
    assert R.n_relevant("G00+G01", cands) == 39  # 2 singles + 19 + 19 - 1 pairs
    assert R.n_relevant("G00+ctrl", cands) == 20  # 1 single + 19 pairs
    assert R.chance_relevant(n, 39, 1) == pytest.approx(39 / 210)
    assert R.chance_relevant(n, 39, 2) == pytest.approx(1 - comb(171, 2) / comb(210, 2))
    table = R.chance_levels(["G00+G01", "G02+ctrl"], cands, ks=[1, 8])
    assert table.loc[1, "correct"] == pytest.approx(1 / 210)
    assert table.loc[8, "relevant"] == pytest.approx(
        (1 - comb(171, 8) / comb(210, 8) + 1 - comb(190, 8) / comb(210, 8)) / 2
    )


def test_random_rankings_match_analytic_chance():
    cands = R.candidate_conditions(["A", "B", "C", "D"])  # 10 candidates; A+B is relevant to 7 of them
    assert R.n_relevant("A+B", cands) == 7
    hits1 = hits2 = correct3 = 0
    trials = 3000
    for seed in range(trials):
        ranking = R.random_rankings(["A+B"], cands, seed=seed)["A+B"]
        hits1 += R.is_relevant("A+B", ranking[0])
        hits2 += any(R.is_relevant("A+B", c) for c in ranking[:2])
        correct3 += "A+B" in ranking[:3]
    assert hits1 / trials == pytest.approx(0.7, abs=0.03)
    assert hits2 / trials == pytest.approx(1 - comb(3, 2) / comb(10, 2), abs=0.03)
    assert correct3 / trials == pytest.approx(0.3, abs=0.03)


REFERENCE = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 10.0], [10.0, 11.0], [5.0, 5.0], [5.0, 6.0]])
REF_LABELS = ["A+ctrl", "A+ctrl", "B+ctrl", "B+ctrl", "A+B", "B+A"]


def test_retrieve_votes_and_order():
    queries = np.array([[0.0, 0.4], [0.2, 0.5]])
    ranking = R.retrieve(REFERENCE, REF_LABELS, queries, ["A+ctrl", "ctrl+A"], n_neighbors=2, backend="sklearn")
    # both cells' 2 nearest predicted cells are A's: 4 votes; the rest by centroid distance: A+B (5, 5.5), B
    assert ranking == {"A+ctrl": ["A+ctrl", "A+B", "B+ctrl"]}


def test_retrieve_pools_votes_over_the_query_cells():
    # one cell of the A+B query sits on A (2 votes for A), three sit between A+B cells (6 votes for A+B)
    queries = np.array([[0.0, 0.5], [5.0, 5.5], [5.1, 5.5], [4.9, 5.5]])
    ranking = R.retrieve(REFERENCE, REF_LABELS, queries, ["A+B"] * 4, n_neighbors=2, backend="sklearn")
    assert ranking["A+B"][:2] == ["A+B", "A+ctrl"]
    summary, per_query = R.score_rankings(ranking, ks=[1, 2])
    assert per_query.loc["A+B", "rank"] == 1 and summary.loc[1, "correct"] == 1.0


def test_masking_candidate_genes_changes_retrieval():
    # column 0 is the target gene's own expression (identifies the candidate); column 1 points the other way
    reference = np.array([[5.0, 0.0], [5.0, 0.1], [0.0, 5.0], [0.0, 5.1]])
    labels = ["A+ctrl", "A+ctrl", "B+ctrl", "B+ctrl"]
    query = np.array([[5.0, 4.0]])
    full = R.retrieve(reference, labels, query, ["A+ctrl"], n_neighbors=1, backend="sklearn")
    keep = R.genes_without(["A", "X"], exclude=["A", "B"])
    assert keep.tolist() == [1]
    masked = R.retrieve(reference, labels, query, ["A+ctrl"], n_neighbors=1, genes=keep, backend="sklearn")
    assert full["A+ctrl"][0] == "A+ctrl" and masked["A+ctrl"][0] == "B+ctrl"


def test_score_rankings_hand_case():
    rankings = {
        "A+B": ["A+C", "A+B", "C+ctrl"],  # relevant at 1, correct at 2
        "C+ctrl": ["A+B", "A+ctrl", "B+C"],  # relevant at 3, never correct
    }
    summary, per_query = R.score_rankings(rankings, ks=[1, 2, 3])
    assert summary["correct"].tolist() == [0.0, 0.5, 0.5]
    assert summary["relevant"].tolist() == [0.5, 0.5, 1.0]
    assert per_query.loc["A+B", "rank"] == 2 and per_query.loc["C+ctrl", "rank"] == float("inf")


def test_nearest_neighbors_backends():
    dist, idx = R.nearest_neighbors(REFERENCE, np.array([[10.0, 10.2]]), 2, backend="sklearn")
    assert idx[0].tolist() == [2, 3] and dist[0, 0] == pytest.approx(0.2, abs=1e-6)
    with pytest.raises(ValueError, match="backend"):
        R.nearest_neighbors(REFERENCE, REFERENCE, 1, backend="annoy")


def test_nearest_neighbors_faiss_agrees():
    pytest.importorskip("faiss")
    dist_f, idx_f = R.nearest_neighbors(REFERENCE, np.array([[10.0, 10.2]]), 2, backend="faiss")
    assert idx_f[0].tolist() == [2, 3]


NOISE_GENES = [f"N{i:02d}" for i in range(40)]  # genes that are never targets, for a realistic noise level


def _cells(n, changes: dict, genes, rng, sd=0.3):
    mean = np.array([1.0 + changes.get(g, 0.0) for g in genes])
    return rng.normal(mean, sd, size=(n, len(genes)))


def test_top_de_baseline_ranks_the_top_two_genes_first():
    genes = ["A", "B", "C", "D", *NOISE_GENES]
    cands = R.candidate_conditions(["A", "B", "C", "D"])
    rng = np.random.default_rng(0)
    ctrl = _cells(40, {}, genes, rng)
    query = np.vstack(
        [
            _cells(15, {"A": 2.0, "C": -1.0, "N00": 8.0}, genes, rng),  # N00 changes most but is no candidate gene
            _cells(15, {"D": 1.5}, genes, rng),
        ]
    )
    labels = ["A+C"] * 15 + ["D+ctrl"] * 15
    ranking = R.top_de_rankings(query, labels, ctrl, genes, cands)
    assert ranking["A+C"][0] == "A+C"
    assert ranking["D+ctrl"][0] == "D+ctrl"  # no second candidate gene passes the noise threshold
    summary, _ = R.score_rankings(ranking, ks=[1])
    assert summary.loc[1, "correct"] == 1.0


def test_expression_oracle_reads_the_targets():
    genes = ["A", "B", "C", *NOISE_GENES]
    cands = R.candidate_conditions(["A", "B", "C"])
    rng = np.random.default_rng(1)
    ctrl = np.ones(len(genes))

    def mean(changes):
        return ctrl + rng.normal(0, 0.05, len(genes)) + np.array([changes.get(g, 0.0) for g in genes])

    means = {"A+B": mean({"A": 3.0, "B": 2.0}), "C+ctrl": mean({"C": 3.0})}
    up = R.expression_oracle_rankings(means, ctrl, genes, cands, direction="up")
    assert up["A+B"][0] == "A+B" and up["C+ctrl"][0] == "C+ctrl"
    down = R.expression_oracle_rankings({"B+ctrl": mean({"B": -0.9})}, ctrl, genes, cands, direction="down")
    assert down["B+ctrl"][0] == "B+ctrl"
    with pytest.raises(ValueError, match="direction"):
        R.expression_oracle_rankings(means, ctrl, genes, cands, direction="sideways")
