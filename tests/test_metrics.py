"""Metric code against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from scgpt_train.evaluation.metrics import (
    aggregate_integration,
    classification_metrics,
    confusion_matrix,
    integration_metrics,
    knn_graph,
)


def test_classification_metrics_by_hand():
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", "b", "a"]
    cm, classes = confusion_matrix(y_true, y_pred)
    assert classes == ["a", "b", "c"]
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    m = classification_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)  # c never predicted: precision 0
    assert m["recall"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)


def test_classification_metrics_agree_with_sklearn():
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    y_true = rng.choice(list("abcde"), 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.choice(list("abcdf"), 200))  # f: predicted only
    m = classification_metrics(y_true, y_pred)
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert (m["accuracy"], m["precision"], m["recall"], m["macro_f1"]) == pytest.approx(
        (accuracy_score(y_true, y_pred), p, r, f)
    )


def test_label_silhouette_by_hand():
    import scib_metrics

    x = np.array([[0.0], [1.0], [10.0], [11.0]], dtype=np.float32)
    s = [(10.5 - 1) / 10.5, (9.5 - 1) / 9.5, (9.5 - 1) / 9.5, (10.5 - 1) / 10.5]  # (b - a) / max(a, b)
    assert scib_metrics.silhouette_label(x, np.array(["a", "a", "b", "b"])) == pytest.approx(
        (np.mean(s) + 1) / 2, abs=1e-6
    )


def test_batch_silhouette_by_hand():
    import scib_metrics

    x = np.array([[0.0], [1.0], [10.0], [11.0]], dtype=np.float32)
    batches = np.array(["x", "y", "x", "y"])
    # per cell: a = mean distance within its batch, b = to the other batch; score 1 - |s|
    s = np.array([(6 - 10) / 10, (5 - 10) / 10, (5 - 10) / 10, (6 - 10) / 10])
    value = scib_metrics.silhouette_batch(x, np.array(["t"] * 4), batches)
    assert value == pytest.approx(np.mean(1 - np.abs(s)), abs=1e-6)


def test_graph_connectivity_by_hand():
    import scib_metrics
    from scib_metrics.nearest_neighbors import NeighborsResults

    # 1-NN graph: 0-1 linked, 2 -> 3 (other label), 3-4 linked
    graph = NeighborsResults(indices=np.array([[1], [0], [3], [4], [3]]), distances=np.ones((5, 1), dtype=np.float32))
    value = scib_metrics.graph_connectivity(graph, np.array(["a", "a", "a", "b", "b"]))
    assert value == pytest.approx((2 / 3 + 1) / 2)


def test_knn_graph_is_exact_and_excludes_self():
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    g = knn_graph(x, 2)
    assert g.indices.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    np.testing.assert_allclose(g.distances, [[1, 3], [1, 2], [2, 3], [4, 6]])


def test_aggregates_follow_the_paper_definitions():
    s = aggregate_integration({"nmi": 0.6, "ari": 0.3, "asw_label": 0.9, "asw_batch": 0.8, "graph_connectivity": 1.0})
    assert s["avg_bio"] == pytest.approx(0.6)
    assert s["avg_batch"] == pytest.approx(0.9)
    assert s["overall"] == pytest.approx(0.6 * 0.6 + 0.4 * 0.9)


def test_integration_metrics_separate_mixed_from_unmixed_embeddings():
    rng = np.random.default_rng(0)
    labels = np.repeat(["t", "b", "m"], 60)
    batches = np.tile(["x", "y"], 90)
    centers = {"t": 0.0, "b": 8.0, "m": 16.0}
    base = np.array([centers[v] for v in labels])[:, None] + rng.normal(0, 0.5, (180, 4))
    shifted = base + np.where(batches == "y", 4.0, 0.0)[:, None] * np.array([0, 0, 0, 1.0])  # batch axis
    mixed, unmixed = integration_metrics(base, labels, batches), integration_metrics(shifted, labels, batches)
    assert mixed["nmi"] == pytest.approx(1.0) and mixed["ari"] == pytest.approx(1.0)
    assert mixed["avg_batch"] > unmixed["avg_batch"] + 0.1
    assert mixed["graph_connectivity"] > 0.95


def test_per_epoch_decay_schedule():
    from scgpt_train.schedules import per_epoch_decay_factor

    assert [per_epoch_decay_factor(s, 10, 0.9) for s in (0, 9, 10, 25)] == pytest.approx([1, 1, 0.9, 0.81])
    assert per_epoch_decay_factor(0, 10, 0.9, warmup_steps=4) == pytest.approx(0.25)
    assert per_epoch_decay_factor(1000, 10, 0.5, min_lr_ratio=0.1) == pytest.approx(0.1)
