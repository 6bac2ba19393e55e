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


COLLAPSE_CAUSES = (
    "too few training steps or too high a learning rate (model.lr), a small model trained from scratch, one class "
    "dominating the training cells, labels that do not follow the expression (data.label_key), or most genes lost "
    "in the vocabulary mapping (data_report.json: genes)"
)


def collapse_flags(y_true, y_pred, train_labels) -> dict[str, float]:
    """Whether a classifier's predictions carry information: ``collapsed`` (1.0 when every cell gets one class
    while the truth has several), ``no_better_than_majority`` (1.0 when the accuracy is at most that of always
    predicting the training cells' most frequent class, ``majority_accuracy``)."""
    y_true, y_pred = np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)
    classes, counts = np.unique(np.asarray(train_labels).astype(str), return_counts=True)
    majority = classes[np.argmax(counts)] if len(classes) else ""
    majority_acc = float(np.mean(y_true == majority)) if len(y_true) else 0.0
    acc = float(np.mean(y_true == y_pred)) if len(y_true) else 0.0
    collapsed = len(set(y_pred)) == 1 and len(set(y_true)) > 1
    return {
        "collapsed": float(collapsed),
        "no_better_than_majority": float(len(set(y_true)) > 1 and acc <= majority_acc),
        "majority_accuracy": majority_acc,
    }


def collapse_warning(flags: dict[str, float], what: str, y_pred) -> str | None:
    """The log line for :func:`collapse_flags` (None when neither flag is set)."""
    if flags["collapsed"]:
        head = f"{what}: every cell is predicted as {str(np.asarray(y_pred)[0])!r} (predictions collapsed to one class)"
    elif flags["no_better_than_majority"]:
        head = (
            f"{what}: no better than always predicting the training cells' most frequent class (its accuracy "
            f"{flags['majority_accuracy']:.3f})"
        )
    else:
        return None
    return f"{head}; the metrics carry no cell-type information. Likely causes: {COLLAPSE_CAUSES}"


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
