"""The semi-synthetic generator (data_modules/simulate.py): corpora in the project's format with the ground truth,
seeded, marginals close to the real cells it was fitted to (the table in docs/simulation.md is current), and cell
types that differ in programs rather than in one gene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_modules.simulate import (
    TISSUES,
    SimParams,
    compare_with_real,
    fit_model,
    sample_cells,
    simulate_adata,
    stats_table,
    write_corpus,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sim_cache(tmp_path_factory) -> Path:
    """One fit cache per session (tests/test_transfer.py uses the same directory): the fit reads ~18 M CSV fields."""
    return tmp_path_factory.getbasetemp() / "simulate_fit"


@pytest.fixture(scope="module")
def sim_model(sim_cache):
    return fit_model(SimParams(), sim_cache)


def test_corpus_holds_the_ground_truth_is_seeded_and_written_in_chunks(sim_model, tmp_path):
    from data_modules.store.reader import Corpus

    out = write_corpus(sim_model, tmp_path / "a", 1500, chunk_cells=400, shard_size=600, seed=3)
    manifest = Corpus(out).manifest
    assert manifest["n_cells"] == 1500 and len(manifest["shards"]) == 3
    cols = manifest["obs_columns"]
    assert set(cols["tissue"]) <= set(TISSUES[:-1])  # the held-out tissue never enters pretraining
    novel = sim_model.type_names[-sim_model.params.n_novel_types :]
    assert not set(novel) & set(cols["cell_type"]) and len(cols["cell_type"]) >= 5
    assert set(cols["dataset"]) == set(cols["batch"])
    block = Corpus(out).read_cells(0, 1500)
    assert np.all(block.counts == np.round(block.counts)) and block.counts.min() >= 1  # raw counts, no stored zeros
    again = write_corpus(sim_model, tmp_path / "b", 1500, chunk_cells=400, shard_size=600, seed=3)
    other = write_corpus(sim_model, tmp_path / "c", 1500, chunk_cells=400, shard_size=600, seed=4)
    digests = [[s["sha256"] for s in Corpus(p).manifest["shards"]] for p in (out, again, other)]
    assert digests[0] == digests[1] and digests[0] != digests[2]


def test_fine_tuning_cells_of_the_held_out_tissue_include_the_novel_type(sim_model):
    adata = simulate_adata(sim_model, 800, [TISSUES[-1]], seed=0)
    assert set(adata.obs["tissue"]) == {TISSUES[-1]}
    assert set(sim_model.type_names[-1:]) <= set(adata.obs["cell_type"])
    assert list(adata.var_names) == sim_model.genes


def test_marginals_match_the_real_cells_and_the_docs_table_is_current(sim_model, sim_cache):
    stats = compare_with_real(SimParams(), 2000, sim_cache)
    real, sim = stats["real"], stats["simulated"]
    for key in ("genes_per_cell_median", "counts_per_cell_median", "var_over_mean_median"):
        assert 0.75 < sim[key] / real[key] < 1.33, (key, sim[key], real[key])
    assert abs(sim["mean_variance_slope"] - real["mean_variance_slope"]) < 0.3
    assert abs(sim["zero_fraction"] - real["zero_fraction"]) < 0.1
    assert stats_table(stats) in (ROOT / "docs" / "simulation.md").read_text(), (
        "docs/simulation.md's table is stale: paste the output of its documented command into it"
    )


def test_cell_types_differ_in_programs_not_in_one_gene(sim_model):
    """Measured (seed 0, 2,000 cells of tissues A..E, 8 types, majority 0.22): the best single gene (a depth-3 tree
    on one of the 200 most variable genes, 3-fold CV) 0.48; logistic regression on all genes 0.96."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    x, obs = sample_cells(sim_model, np.random.default_rng(0), 1500, list(TISSUES[:-1]))
    y = obs["cell_type"].to_numpy()
    x = x.toarray()
    x = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    top = np.argsort(-x.var(0))[:100]
    single = max(
        cross_val_score(DecisionTreeClassifier(max_depth=3, random_state=0), x[:, [g]], y, cv=3).mean() for g in top
    )
    every = cross_val_score(LogisticRegression(max_iter=300), x, y, cv=3).mean()
    assert single < 0.6 and every > 0.85 and every - single > 0.3, (single, every)


def test_simulation_parameters_are_checked_where_they_enter(tmp_path):
    """A parameter out of range or a name SimParams lacks is refused with one message naming it, before any fit
    (a negative type_separation used to be accepted and silently mirror the types through the mean usage)."""
    from data_modules.errors import UserInputError
    from data_modules.simulate import SimParamsError
    from scgpt_train.benchmarks.transfer import sim_params

    with pytest.raises(SimParamsError, match=r"type_separation=-0\.5 must be a number >= 0") as info:
        SimParams(type_separation=-0.5)
    assert isinstance(info.value, UserInputError)
    with pytest.raises(SimParamsError, match=r"n_novel_types=8 must be a whole number >= 0 and below n_types"):
        SimParams(n_novel_types=8)
    with pytest.raises(SimParamsError, match=r"precision=0\.0 must be a number > 0 or null; depth_scale=nan"):
        SimParams(precision=0.0, depth_scale=float("nan"))
    with pytest.raises(SimParamsError, match=r"benchmark.simulation has no parameter\(s\) \['type_seperation'\]"):
        sim_params({"simulation": {"type_seperation": 1.5}})
    assert sim_params({"simulation": {"n_genes": 300, "type_separation": 1.5}}) == SimParams(
        n_genes=300, type_separation=1.5
    )
