"""Figures of tasks and benchmarks: the one matplotlib set-up (:func:`pyplot`, the Agg backend: files only) and
the one way to save a figure (:func:`save_figure`); the confusion-matrix and UMAP plots the tasks share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_modules.atomic import atomic_path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported here, on first use: matplotlib costs
    start-up time that scripts which draw nothing should not pay)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> Path:
    """``fig`` as a PNG at ``path`` (written under a temporary name, renamed into place: data_modules/atomic.py),
    then closed."""
    plt = pyplot()

    try:
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return Path(path)


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path, title: str = "confusion matrix") -> Path:
    """Row-normalized confusion matrix (true x predicted) with counts in the cells."""
    plt = pyplot()

    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i, j in zip(*np.nonzero(cm), strict=True):
        ax.text(
            j, i, str(cm[i, j]), ha="center", va="center", fontsize=6, color="white" if frac[i, j] > 0.5 else "black"
        )
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, Path(path))


def umap_coordinates(embedding: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """(N, 2) UMAP of an embedding (scanpy neighbors + umap)."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(X=np.asarray(embedding, dtype=np.float32))
    sc.pp.neighbors(a, n_neighbors=min(n_neighbors, max(2, a.n_obs - 1)), use_rep="X", random_state=seed)
    sc.tl.umap(a, random_state=seed)
    return a.obsm["X_umap"]


def plot_umap(coords: np.ndarray, colors: dict[str, Sequence], path, title: str = "") -> Path:
    """One panel per entry of ``colors`` (name -> per-cell category), side by side."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(colors), figsize=(5.5 * len(colors), 4.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], colors.items(), strict=True):
        values = np.asarray(values).astype(str)
        cats = sorted(set(values))
        cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
        for k, cat in enumerate(cats):
            sel = values == cat
            ax.scatter(coords[sel, 0], coords[sel, 1], s=4, color=cmap(k % cmap.N), label=cat, linewidths=0)
        ax.set_title(f"{title} {name}".strip())
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    fig.tight_layout()
    return save_figure(fig, Path(path))
