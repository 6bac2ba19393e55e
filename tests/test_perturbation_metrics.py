"""Perturbation metrics on hand-computed arrays, and the baselines (including: no test data leaks) (issue #12)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scgpt_train.tasks.perturbation import baselines as B
from scgpt_train.tasks.perturbation import metrics as M


# metrics ----------------------------------------------------------------------------------------------------------
def test_pearson_hand_values():
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # deviations (-1.5 -.5 .5 1.5) and (-1.5 .5 -.5 1.5): sum of products 4, sums of squares 5 and 5 -> 0.8
    assert M.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))  # constant: undefined
    assert math.isnan(M.pearson([0.1, 0.1, 0.1], [1, 2, 3]))
    assert math.isnan(M.pearson([1.0], [2.0]))


CTRL = np.array([1.0, 1.0, 1.0, 1.0])
PRED = {"A+ctrl": np.array([2.0, 3.0, 2.0, 4.0])}  # delta 1 2 1 3
TRUE = {"A+ctrl": np.array([2.0, 2.0, 3.0, 4.0])}  # delta 1 1 2 3
DE = {"A+ctrl": np.array([0, 3])}


def test_pearson_and_pearson_delta_hand_values():
    # raw: (2 3 2 4) vs (2 2 3 4): deviations (-.75 .25 -.75 1.25) / (-.75 -.75 .25 1.25) -> 1.75 / 2.75
    assert M.pearson_per_condition(PRED, TRUE)["A+ctrl"] == pytest.approx(7 / 11)
    # deltas (1 2 1 3) vs (1 1 2 3): the same deviations -> 7/11
    assert M.pearson_delta(PRED, TRUE, CTRL)["A+ctrl"] == pytest.approx(7 / 11)
    # on DE genes 0 and 3 only: (1, 3) vs (1, 3) -> 1
    assert M.pearson_delta(PRED, TRUE, CTRL, DE)["A+ctrl"] == pytest.approx(1.0)
    # a reference that is not the control changes Pearson-delta: reference (2 3 2 4) makes pred's delta zero
    assert math.isnan(M.pearson_delta(PRED, TRUE, PRED["A+ctrl"])["A+ctrl"])


def test_mse_and_direction_hand_values():
    assert M.mse({"c": np.array([1.0, 2.0])}, {"c": np.array([1.0, 4.0])})["c"] == pytest.approx(2.0)
    assert M.mse({"c": np.array([1.0, 2.0])}, {"c": np.array([1.0, 4.0])}, {"c": [1]})["c"] == pytest.approx(4.0)
    # signs of change: pred (+ - 0 0), true (+ - + 0): genes 0, 1 and 3 agree -> 3/4
    pred = {"c": np.array([2.0, 0.0, 1.0, 1.0])}
    true = {"c": np.array([3.0, 0.0, 2.0, 1.0])}
    assert M.direction_of_change(pred, true, CTRL, {"c": [0, 1, 2, 3]})["c"] == pytest.approx(0.75)
    assert M.direction_of_change(pred, true, CTRL, {"c": [0, 1]})["c"] == pytest.approx(1.0)


def test_top_expressed_genes_and_pearson_delta_on_them():
    ctrl = np.array([5.0, 1.0, 3.0, 4.0])
    assert M.top_expressed_genes(ctrl, 2).tolist() == [0, 3]
    assert M.top_expressed_genes(ctrl, 10).tolist() == [0, 1, 2, 3]
    pred = {"c": ctrl + np.array([1.0, 9.0, -9.0, 2.0])}
    true = {"c": ctrl + np.array([2.0, -5.0, 5.0, 4.0])}
    # on genes 0 and 3 the deltas (1, 2) and (2, 4) correlate perfectly; on all genes they do not
    assert M.pearson_delta_top_expressed(pred, true, ctrl, 2)["c"] == pytest.approx(1.0)
    assert M.pearson_delta(pred, true, ctrl)["c"] < 0


def test_perturbed_centroid_and_systema_pearson_delta():
    train = {
        "ctrl": np.array([9.0, 9.0, 9.0]),
        "A+ctrl": np.array([1.0, 2.0, 0.0]),
        "B+ctrl": np.array([3.0, 4.0, 2.0]),
    }
    centroid = M.perturbed_centroid(train)
    np.testing.assert_allclose(centroid, [2.0, 3.0, 1.0])  # ctrl excluded, conditions weigh the same
    pred = {"C+ctrl": np.array([3.0, 3.0, 2.0])}  # delta vs centroid (1 0 1)
    true = {"C+ctrl": np.array([4.0, 3.0, 3.0])}  # delta (2 0 2)
    assert M.pearson_delta_perturbed_centroid(pred, true, train)["C+ctrl"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no perturbed"):
        M.perturbed_centroid({"ctrl": np.zeros(3)})


def test_centroid_accuracy_hand_values():
    true = {"A": np.array([0.0, 0.0]), "B": np.array([2.0, 0.0]), "C": np.array([0.0, 2.0])}
    pred = {
        "A": np.array([0.0, 0.0]),  # own 0; B 2, C 2 farther -> 2/2
        "B": np.array([1.5, 0.0]),  # own .5; A 1.5, C 2.5 farther -> 2/2
        "C": np.array([1.0, 0.0]),  # own sqrt(5); A 1, B 1 nearer -> 0/2
    }
    acc = M.centroid_accuracy(pred, true)
    assert acc == {"A": 1.0, "B": 1.0, "C": 0.0}
    tie = M.centroid_accuracy(
        {"A": np.array([1.0, 0.0]), "B": np.array([1.0, 0.0])}, {"A": [0.0, 0.0], "B": [2.0, 0.0]}
    )
    assert tie == {"A": 0.0, "B": 0.0}  # equidistant: the other is not farther
    assert math.isnan(M.centroid_accuracy({"A": [0.0]}, {"A": [0.0]})["A"])


def test_mean_over_conditions_nan_policy():
    scores = {"a": 1.0, "b": float("nan"), "c": 0.5}
    assert M.mean_over_conditions(scores) == pytest.approx(0.75)
    assert M.mean_over_conditions(scores, "zero") == pytest.approx(0.5)
    assert math.isnan(M.mean_over_conditions(scores, "propagate"))
    assert math.isnan(M.mean_over_conditions({"a": float("nan")}))
    assert math.isnan(M.mean_over_conditions({}))
    with pytest.raises(ValueError, match="nan_policy"):
        M.mean_over_conditions(scores, "ignore")


def test_subgroup_means_unweighted():
    scores = {"A+B": 1.0, "C+D": 0.0, "E+ctrl": 0.4, "F+ctrl": 0.6}
    groups = {"combo_seen2": ["A+B", "C+D"], "unseen_single": ["E+ctrl", "F+ctrl"], "combo_seen0": []}
    out = M.subgroup_means(scores, groups)
    assert out["combo_seen2"] == pytest.approx(0.5) and out["unseen_single"] == pytest.approx(0.5)
    assert math.isnan(out["combo_seen0"])


def test_per_condition_table_and_summary():
    ctrl = np.array([1.0, 1.0, 1.0, 1.0])
    true = {"A+ctrl": np.array([2.0, 2.0, 3.0, 4.0]), "B+ctrl": np.array([0.0, 1.0, 1.0, 1.0])}
    de = {"A+ctrl": np.array([0, 3]), "B+ctrl": np.array([0, 1])}
    no_change = {c: ctrl.copy() for c in true}
    table = M.per_condition_table(no_change, true, ctrl, de, train_means={"X+ctrl": np.full(4, 2.0)})
    assert list(table.index) == ["A+ctrl", "B+ctrl"]
    assert table["pearson_delta"].isna().all()  # a zero delta has no correlation
    summary = M.summarize(table, {"unseen_single": ["A+ctrl", "B+ctrl"]})
    assert summary["n_conditions"] == 2 and summary["n_nan/pearson_delta"] == 2
    assert math.isnan(summary["pearson_delta"])
    # mse on DE: A+ctrl genes 0, 3: (1^2 + 3^2) / 2 = 5; B+ctrl genes 0, 1: (1^2 + 0) / 2 = .5 -> mean 2.75
    assert summary["mse_de"] == pytest.approx(2.75)
    assert summary["unseen_single/mse_de"] == pytest.approx(2.75)
    assert summary["direction_de"] == pytest.approx(0.25)  # only B+ctrl gene 1 (no change in both) agrees
    with pytest.raises(KeyError, match="C\\+ctrl"):
        M.pearson_per_condition({}, {"C+ctrl": np.zeros(3)})


# baselines --------------------------------------------------------------------------------------------------------
GENES = np.array(["A", "B", "C"])
CELLS = [
    ("ctrl", [1.0, 1.0, 1.0]),
    ("ctrl", [3.0, 1.0, 1.0]),  # control mean (2 1 1)
    ("A+ctrl", [0.0, 2.0, 1.0]),  # A mean (0 2 1): change (-2 1 0)
    ("B+ctrl", [2.0, 0.0, 3.0]),
    ("B+ctrl", [2.0, 0.0, 3.0]),
    ("B+ctrl", [2.0, 0.0, 0.0]),  # B mean (2 0 2): change (0 -1 1)
    ("A+B", [9.0, 9.0, 9.0]),  # test conditions below: never to be seen
    ("C+ctrl", [7.0, 7.0, 7.0]),
    ("A+C", [5.0, 5.0, 5.0]),
]
TRAIN = ["ctrl", "A+ctrl", "B+ctrl"]
TEST = ["A+B", "A+C", "C+ctrl"]


def _train(cells=CELLS):
    x = np.array([v for _, v in cells])
    return B.training_profiles(x, [c for c, _ in cells], GENES, TRAIN)


def test_mean_baselines_hand_values():
    train = _train()
    np.testing.assert_allclose(B.no_change(train, ["A+B"])["A+B"], [2.0, 1.0, 1.0])
    # condition-weighted: mean of A (0 2 1) and B (2 0 2)
    np.testing.assert_allclose(B.train_mean(train, ["A+B"])["A+B"], [1.0, 1.0, 1.5])
    # cell-weighted: the 4 perturbed training cells
    np.testing.assert_allclose(B.non_control_mean(train, ["A+B"])["A+B"], [1.5, 0.5, 1.75])


def test_additive_hand_values_and_fallback():
    train = _train()
    pred = B.additive(train, TEST + ["ctrl+A", "ctrl"])
    np.testing.assert_allclose(pred["A+B"], [2 - 2 + 0, 1 + 1 - 1, 1 + 0 + 1])  # ctrl + dA + dB = (0 1 2)
    # C has no training single: its change is the train-mean change (1 1 1.5) - (2 1 1) = (-1 0 .5)
    np.testing.assert_allclose(pred["A+C"], [2 - 2 - 1, 1 + 1 + 0, 1 + 0 + 0.5])
    np.testing.assert_allclose(pred["C+ctrl"], [1.0, 1.0, 1.5])  # an unseen single = the train mean
    np.testing.assert_allclose(pred["A+ctrl"], [0.0, 2.0, 1.0])  # a training single = its own mean
    np.testing.assert_allclose(pred["ctrl"], [2.0, 1.0, 1.0])


def test_no_test_data_leaks_into_baselines():
    """Changing every test cell (values and numbers) changes no baseline prediction."""
    before = B.run_baselines(_train(), TEST)
    rng = np.random.default_rng(0)
    changed = [(c, (rng.normal(size=3) * 100).tolist()) if c not in TRAIN else (c, v) for c, v in CELLS]
    changed += [("A+B", [50.0, -50.0, 3.0])] * 5 + [("C+ctrl", [-8.0, 8.0, 0.0])]
    after = B.run_baselines(_train(changed), TEST)
    for name in B.BASELINES:
        for c in TEST:
            np.testing.assert_array_equal(before[name][c], after[name][c])
    train = _train(changed)
    assert set(train.condition_means) == {"A+ctrl", "B+ctrl"} and set(train.n_cells) == {"ctrl", "A+ctrl", "B+ctrl"}


def test_training_profiles_errors():
    with pytest.raises(ValueError, match="no 'ctrl'"):
        B.training_profiles(np.ones((2, 3)), ["A+ctrl", "B+ctrl"], GENES, ["A+ctrl", "B+ctrl"])
    with pytest.raises(ValueError, match="unknown baselines"):
        B.run_baselines(_train(), TEST, names=["oracle"])


def test_linear_model_closed_form():
    """The fit follows the published closed form: PCA gene embedding of the training pseudobulk (ctrl included),
    perturbation embedding = the perturbed gene's row, ridge 0.1 on both sides."""
    rng = np.random.default_rng(3)
    genes = np.array([f"g{i}" for i in range(12)])
    ctrl = rng.uniform(1, 3, 12)
    means = {f"g{i}+ctrl": ctrl + rng.normal(0, 1, 12) for i in range(6)}
    train = B.TrainingProfiles(genes, ctrl, means, ctrl, {})
    model = B.LinearModel(train, n_pcs=3, ridge=0.1)

    y = np.stack([ctrl, *means.values()], axis=1)
    u, s, _ = np.linalg.svd(y - y.mean(axis=0), full_matrices=False)
    g = u[:, :3] * s[:3]
    p = np.stack([np.zeros(3)] + [g[i] for i in range(6)], axis=1)
    change = y - ctrl[:, None]
    center = change.mean(axis=1, keepdims=True)
    w = (
        np.linalg.inv(g.T @ g + 0.1 * np.eye(3))
        @ g.T
        @ (change - center)
        @ p.T
        @ np.linalg.inv(p @ p.T + 0.1 * np.eye(3))
    )
    expected = ctrl + center[:, 0] + g @ w @ (g[7] + g[9])
    np.testing.assert_allclose(model.predict(["g7+g9"])["g7+g9"], expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(model.predict(["ctrl"])["ctrl"], ctrl + center[:, 0])
    # a gene outside the data gets a zero embedding: the train-mean-like prediction
    np.testing.assert_allclose(model.predict(["ZZZ+ctrl"])["ZZZ+ctrl"], ctrl + center[:, 0])


def test_linear_model_fits_a_linear_world():
    """When perturbation effects are linear in the gene embedding, the model with little ridge recovers them for a
    held-out gene far better than the train mean."""
    rng = np.random.default_rng(7)
    n_genes, k = 40, 3
    basis = rng.normal(size=(n_genes, k))
    ctrl = 5.0 + rng.normal(size=n_genes)
    effect = {i: basis @ basis[i] * 0.3 for i in range(n_genes)}  # gene i's effect lives in the embedding
    genes = np.array([f"g{i}" for i in range(n_genes)])
    means = {f"g{i}+ctrl": ctrl + effect[i] for i in range(30)}
    train = B.TrainingProfiles(genes, ctrl, means, ctrl, {})
    held = [f"g{i}+ctrl" for i in range(30, 40)]
    pred = B.linear(train, held, n_pcs=10, ridge=0.1)
    true = {f"g{i}+ctrl": ctrl + effect[i] for i in range(30, 40)}
    linear = M.mean_over_conditions(M.pearson_delta(pred, true, ctrl))
    mean = M.mean_over_conditions(M.pearson_delta(B.train_mean(train, held), true, ctrl))
    assert linear > 0.9 and linear > mean + 0.3
