"""Figures: program scores over cell types, the cosine network of a gene family."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def plot_program_heatmap(scores: pd.DataFrame, cell_types, path, title: str) -> Path:
    """Mean program score per cell type, z-scored per program across cell types."""
    from scgpt_train.evaluation.figures import pyplot, save_figure

    plt = pyplot()

    means = scores.groupby(np.asarray(cell_types).astype(str)).mean().T  # (programs, types)
    z = means.sub(means.mean(1), axis=0).div(means.std(1).replace(0, 1), axis=0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * z.shape[1], 1.2 + 0.28 * z.shape[0]))
    im = ax.imshow(z.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-2, vmax=2)
    ax.set_xticks(range(z.shape[1]), z.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(z.shape[0]), z.index, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="mean score (z across cell types)")
    return save_figure(fig, Path(path))


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
    import networkx as nx

    from scgpt_train.evaluation.figures import pyplot, save_figure

    plt = pyplot()

    pos = {g: i for i, g in enumerate(genes)}
    idx = np.array([pos[g] for g in family])
    unit = emb[idx] / np.maximum(np.linalg.norm(emb[idx], axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    graph = nx.Graph()
    graph.add_nodes_from(family)
    for a, b in zip(*np.triu_indices(len(family), 1), strict=True):
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
    return save_figure(fig, Path(path))
