"""Top-K target genes of a source gene and their check against a TF-target resource, with baselines.

Scores of a source gene s under a setting (the tutorial's three): ``control`` = A_ctrl[:, s], ``perturbed`` =
A_pert[:, s] (A_pert: the mean map of the cells where s is perturbed), ``difference`` = A_pert[:, s] -
A_ctrl[:, s]; column s of the mean rank-normalized map holds how much every gene attends to s (the tutorial's
choice; ``direction="row"``: A[s, :], what s attends to). ``<cls>`` and s itself are never candidates. The top
``k`` genes (ties by panel order) are tested against the source's known targets among the candidates:

    p = P(X >= overlap), X ~ Hypergeom(M = candidates, n = known targets among them, N = k)

Baselines through the same test: ``random`` (expression-matched: each of the k genes replaced by a random
candidate of the same mean-expression decile, ``n_random`` draws; mean overlap and the empirical
P(overlap_random >= overlap)), ``coexpression`` (|Pearson r| with s over the setting's cells; difference:
|r_pert - r_ctrl|) and, where there are perturbed cells, ``de`` (|mean_pert - mean_ctrl| of each gene).
"""

from __future__ import annotations

import numpy as np

from scgpt_train.tasks.attention_grn.common import N_EXPRESSION_BINS, SETTINGS, GRNError


def attention_scores(ctrl_map, pert_map, source: int, setting: str, offset: int, direction: str = "column"):
    """(G,) scores of every panel gene for source gene ``source`` (panel position); maps are (M, M) with
    ``offset`` tokens (``<cls>``) before the genes."""
    if setting not in SETTINGS:
        raise GRNError(f"--setting must be one of {SETTINGS}, got {setting!r}")
    if direction not in ("column", "row"):
        raise GRNError(f"--direction must be column or row, got {direction!r}")

    def take(a):
        if a is None:
            raise GRNError(f"setting {setting!r} needs cells of the perturbed condition and of the control")
        s = source + offset
        return (a[offset:, s] if direction == "column" else a[s, offset:]).astype(np.float64)

    if setting == "control":
        return take(ctrl_map)
    if setting == "perturbed":
        return take(pert_map)
    return take(pert_map) - take(ctrl_map)


def top_k(scores: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest ``scores`` among ``candidates`` (bool mask), best first, ties by position."""
    pos = np.flatnonzero(candidates)
    order = np.argsort(-scores[pos], kind="stable")
    return pos[order[: min(k, len(pos))]]


def hypergeom_p(overlap: int, n_background: int, n_targets: int, k: int) -> float:
    """P(X >= overlap), X ~ Hypergeom(M = n_background, n = n_targets, N = k) (one-sided, over-representation)."""
    from scipy.stats import hypergeom

    if overlap <= 0:
        return 1.0
    return float(hypergeom.sf(overlap - 1, n_background, n_targets, k))


def overlap_stats(selected: np.ndarray, known: np.ndarray, candidates: np.ndarray) -> dict:
    """Overlap of ``selected`` positions with the ``known`` targets (bool over the panel) among ``candidates``."""
    n_bg, n_t, k = int(candidates.sum()), int((known & candidates).sum()), len(selected)
    overlap = int(known[selected].sum())
    return {
        "k": k,
        "overlap": overlap,
        "n_background": n_bg,
        "n_known_targets": n_t,
        "expected": k * n_t / n_bg if n_bg else float("nan"),
        "p_hypergeom": hypergeom_p(overlap, n_bg, n_t, k),
    }


def expression_bins(mean_expr: np.ndarray, candidates: np.ndarray, n_bins: int = N_EXPRESSION_BINS) -> np.ndarray:
    """(G,) quantile bin (0..n_bins-1) of every gene's mean expression among the candidates (-1 elsewhere)."""
    bins = np.full(len(mean_expr), -1, dtype=np.int64)
    pos = np.flatnonzero(candidates)
    ranks = np.argsort(np.argsort(mean_expr[pos], kind="stable"), kind="stable")
    bins[pos] = (ranks * n_bins) // max(len(pos), 1)
    return bins


def random_matched_overlaps(
    selected: np.ndarray, known: np.ndarray, candidates: np.ndarray, mean_expr: np.ndarray, n_random: int, seed: int
) -> np.ndarray:
    """(n_random,) overlaps of random gene sets matching ``selected``'s mean-expression deciles."""
    bins = expression_bins(mean_expr, candidates)
    rng = np.random.default_rng(seed)
    need = np.bincount(bins[selected], minlength=N_EXPRESSION_BINS)
    pools = [np.flatnonzero(bins == b) for b in range(N_EXPRESSION_BINS)]
    out = np.zeros(n_random, dtype=np.int64)
    for b, n in enumerate(need):
        if n == 0:
            continue
        hits = known[pools[b]].astype(np.int64)
        # n distinct genes of the bin per draw: the first n of a random permutation of the pool
        keys = rng.random((n_random, len(pools[b])))
        pick = (
            np.argpartition(keys, n - 1, axis=1)[:, :n] if n < len(pools[b]) else np.tile(np.arange(n), (n_random, 1))
        )
        out += hits[pick].sum(1)
    return out


def pearson_with(x: np.ndarray, source: int) -> np.ndarray:
    """(G,) Pearson r of every column of ``x`` (cells x genes) with column ``source`` (0 where no variance)."""
    x = np.asarray(x, dtype=np.float64)
    z = x - x.mean(0)
    sd = np.sqrt((z**2).sum(0))
    r = (z.T @ z[:, source]) / np.where(sd * sd[source] > 0, sd * sd[source], np.inf)
    return r


def coexpression_scores(x_ctrl, x_pert, source: int, setting: str) -> np.ndarray:
    """|r| with the source over the setting's cells; difference: |r_pert - r_ctrl|."""
    if setting == "control":
        return np.abs(pearson_with(x_ctrl, source))
    if setting == "perturbed":
        return np.abs(pearson_with(x_pert, source))
    return np.abs(pearson_with(x_pert, source) - pearson_with(x_ctrl, source))


def de_scores(x_ctrl, x_pert) -> np.ndarray:
    """|mean over perturbed cells - mean over control cells| of every gene."""
    return np.abs(np.asarray(x_pert, np.float64).mean(0) - np.asarray(x_ctrl, np.float64).mean(0))
