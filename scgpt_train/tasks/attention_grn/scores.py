"""Rank-normalized last-layer attention scores, averaged over heads and accumulated per condition.

The official GRN tutorial's score of one cell: the last layer's raw ``q k^T`` per head (unscaled, no softmax; the
``softmax`` option applies ``softmax(q k^T / sqrt(Dh))`` over keys first), rank-normalized by row (each query's
scores over the keys -> ranks / M), then by column (each key's row-ranks over the queries -> ranks / M), then
averaged over heads; M is the number of tokens. Rows are queries, columns keys: ``A[i, j]`` is how much token i
attends to token j relative to everything else. Column ranks break ties (frequent: the row ranks are integers) by
query position; results are deterministic.

Only one layer's q and k (B, H, M, Dh) are held; the (M, M) maps are formed for a few heads of one cell at a time
(``MAX_BLOCK_BYTES`` of work), ranked, averaged over heads and added to a float64 (M, M) sum per condition: memory
is O(B H M Dh + heads M^2 + conditions M^2), never (B, H, M, M) for all layers.

Every cell is added to its condition's sum. (The official loop creates a condition's sum from zeros at that
condition's first cell and adds only the cells after it, then divides by the full cell count: the first cell of
every condition is lost and the mean is scaled by (n - 1) / n; a condition of one cell is all zeros.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from scgpt_train.tasks.attention_grn.common import MAX_BLOCK_BYTES, GRNError


def ranks_last(x: np.ndarray, kind: str = "quicksort") -> np.ndarray:
    """0-based ranks of ``x`` along its last axis (ascending), int16 (int32 for >= 32,768 columns)."""
    m = x.shape[-1]
    order = np.argsort(x, axis=-1, kind=kind)
    ranks = np.empty(x.shape, dtype=np.int16 if m < 2**15 else np.int32)
    np.put_along_axis(ranks, order, np.arange(m, dtype=ranks.dtype).reshape((1,) * (x.ndim - 1) + (m,)), axis=-1)
    return ranks


def rank_normalize(scores) -> np.ndarray:
    """(..., M, M) scores -> row ranks / M, then the column ranks of those / M (float32 in [0, 1)).

    Row step: ranks of each query's scores over the keys (ties among exactly equal scores: the sort's order,
    deterministic). Column step: ranks of each key's row-ranks over the queries, ties (frequent: integer ranks) by
    query position (a stable sort; a radix sort on the int16 ranks)."""
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    m = s.shape[-1]
    by_row = ranks_last(s)
    by_col = ranks_last(np.ascontiguousarray(np.swapaxes(by_row, -1, -2)), kind="stable")
    return np.swapaxes(by_col, -1, -2).astype(np.float32) / np.float32(m)


def head_scores(q: torch.Tensor, k: torch.Tensor, softmax: bool = False) -> torch.Tensor:
    """(..., M, Dh) q, k -> (..., M, M) raw ``q k^T`` (official), or its scaled softmax over keys."""
    s = q.float() @ k.float().transpose(-1, -2)
    if softmax:
        s = torch.softmax(s * q.shape[-1] ** -0.5, dim=-1)
    return s


def cell_maps(q: torch.Tensor, k: torch.Tensor, softmax: bool = False, rank: bool = True, max_bytes=MAX_BLOCK_BYTES):
    """Yield (cell index, (M, M) float32 head-mean map) for q, k (B, H, M, Dh), a few heads at a time."""
    b, h, m, _ = q.shape
    per_head = m * m * 4 * 6  # scores, sort order (int64), int16 ranks and float copies
    step = int(max(1, min(h, max_bytes // per_head)))
    for c in range(b):
        total = np.zeros((m, m), dtype=np.float32)
        for h0 in range(0, h, step):
            s = head_scores(q[c, h0 : h0 + step], k[c, h0 : h0 + step], softmax)
            block = rank_normalize(s) if rank else s.cpu().numpy()
            total += block.sum(0)
            del s, block
        yield c, total / np.float32(h)


class ConditionMeans:
    """Running float64 sums of per-cell maps per condition; ``mean(c)`` = sum / cells of c (every cell counts)."""

    def __init__(self, m: int):
        self.m = m
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def add(self, condition: str, cell_map: np.ndarray) -> None:
        if condition not in self.sums:
            self.sums[condition] = np.zeros((self.m, self.m), dtype=np.float64)
            self.counts[condition] = 0
        self.sums[condition] += cell_map
        self.counts[condition] += 1

    def mean(self, condition: str) -> np.ndarray:
        if condition not in self.sums:
            raise GRNError(f"no cell of condition {condition!r} was scored")
        return (self.sums[condition] / self.counts[condition]).astype(np.float32)


@torch.no_grad()
def condition_attention(
    model,
    batches: Iterable[tuple[dict, Sequence[str]]],
    m: int,
    *,
    layer: int = -1,
    softmax: bool = False,
    rank: bool = True,
    device: str = "cpu",
    progress=None,
) -> ConditionMeans:
    """Mean rank-normalized head-mean attention map per condition. ``batches`` yields (model inputs of padded
    cells with ``m`` tokens each: gene_ids, values, pad_mask[, condition_ids], the condition of every cell)."""
    was_training = model.training
    model.eval()
    acc = ConditionMeans(m)
    try:
        for inputs, conditions in batches:
            inputs = {key: v.to(device) for key, v in inputs.items()}
            if inputs["gene_ids"].shape[1] != m:
                raise GRNError(f"batches must hold {m} tokens per cell, got {inputs['gene_ids'].shape[1]}")
            q, k = model.attention_qk(**inputs, layer=layer)
            for c, cell_map in cell_maps(q, k, softmax, rank):
                acc.add(str(conditions[c]), cell_map)
            del q, k
            if progress is not None:
                progress(len(conditions))
    finally:
        model.train(was_training)
    return acc
