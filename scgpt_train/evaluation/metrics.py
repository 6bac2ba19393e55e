"""Benchmark metrics: annotation (accuracy, macro precision / recall / F1) and scIB integration scores.

Annotation metrics are computed here from the confusion matrix (macro averages over the classes present
in the true or predicted labels, the scikit-learn default; a class never predicted has precision 0).
Integration uses scib-metrics (Leiden clustering, not scib's Louvain: numbers can differ slightly from the
paper's): AvgBIO = mean(NMI, ARI, ASW_label), AvgBATCH = mean(ASW_batch, graph connectivity),
overall = 0.6 AvgBIO + 0.4 AvgBATCH.
"""

from __future__ import annotations

import numpy as np

INTEGRATION_BACKEND = "scib-metrics (Leiden NMI/ARI, exact 15-NN graph)"


def confusion_matrix(y_true, y_pred, classes: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """(C, C) counts, rows = true class, columns = predicted class; classes sorted if not given."""
    y_true, y_pred = np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)
    if classes is None:
        classes = sorted(set(y_true) | set(y_pred))
    index = {c: i for i, c in enumerate(classes)}
    t = np.array([index[v] for v in y_true], dtype=np.int64)
    p = np.array([index[v] for v in y_pred], dtype=np.int64)
    cm = np.bincount(t * len(classes) + p, minlength=len(classes) ** 2).reshape(len(classes), len(classes))
    return cm, list(classes)


def classification_metrics(y_true, y_pred) -> dict[str, float]:
    """accuracy, macro precision / recall / F1 over the classes in ``y_true`` or ``y_pred``."""
    cm, _ = confusion_matrix(y_true, y_pred)
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
    }


def knn_graph(x: np.ndarray, n_neighbors: int = 15):
    """scib-metrics ``NeighborsResults`` of the exact ``n_neighbors`` nearest neighbours (self excluded)."""
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    k = min(n_neighbors, len(x) - 1)
    dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    return NeighborsResults(indices=idx[:, 1:], distances=dist[:, 1:])


def aggregate_integration(scores: dict[str, float]) -> dict[str, float]:
    """AvgBIO, AvgBATCH and overall from the individual scores (scIB / paper definitions)."""
    out = dict(scores)
    out["avg_bio"] = float(np.mean([scores["nmi"], scores["ari"], scores["asw_label"]]))
    if "asw_batch" in scores:
        out["avg_batch"] = float(np.mean([scores["asw_batch"], scores["graph_connectivity"]]))
        out["overall"] = 0.6 * out["avg_bio"] + 0.4 * out["avg_batch"]
    return out


def integration_metrics(
    embedding: np.ndarray, labels, batches=None, n_neighbors: int = 15, seed: int = 0
) -> dict[str, float]:
    """NMI / ARI (Leiden, resolution optimized), ASW_label; with batches ASW_batch and graph connectivity."""
    import scib_metrics

    x = np.asarray(embedding, dtype=np.float32)
    labels = np.asarray(labels).astype(str)
    graph = knn_graph(x, n_neighbors)
    clustering = scib_metrics.nmi_ari_cluster_labels_leiden(graph, labels, optimize_resolution=True, seed=seed)
    scores = {
        "nmi": float(clustering["nmi"]),
        "ari": float(clustering["ari"]),
        "asw_label": float(scib_metrics.silhouette_label(x, labels)),
    }
    if batches is not None:
        batches = np.asarray(batches).astype(str)
        scores["asw_batch"] = float(scib_metrics.silhouette_batch(x, labels, batches))
        scores["graph_connectivity"] = float(scib_metrics.graph_connectivity(graph, labels))
    return aggregate_integration(scores)
