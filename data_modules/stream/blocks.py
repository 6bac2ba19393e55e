"""Reading the plan's cells: windows of lanes read through ``Corpus.read_spans``, shuffled and bucketed
by length, and rows gathered from several windows into one ``CellBlock``."""

from __future__ import annotations

import math

import numba
import numpy as np

from data_modules.store.reader import CellBlock, Corpus
from data_modules.stream.plan import TAG_WINDOW, EpochPlan, seeded_rng


@numba.njit(cache=True)
def _copy_rows(src_indptr, src_genes, src_counts, rows, dst_indptr, dst_genes, dst_counts, first):
    """Copy CSR rows ``rows`` of a source block into rows ``first, first + 1, ...`` of the destination
    (whose ``dst_indptr`` is already filled)."""
    for r in range(len(rows)):
        start, stop = src_indptr[rows[r]], src_indptr[rows[r] + 1]
        to = dst_indptr[first + r]
        dst_genes[to : to + stop - start] = src_genes[start:stop]
        dst_counts[to : to + stop - start] = src_counts[start:stop]


def gather_parts(parts: list[tuple[CellBlock, np.ndarray]]) -> CellBlock:
    """The cells ``rows`` of each ``(block, rows)`` part, in order, as one CellBlock (batches spanning windows).

    One allocation per array and one compiled copy per part; parts whose dtypes differ are
    merged with numpy's type promotion instead.
    """
    lengths = np.concatenate([np.diff(b.indptr)[rows] for b, rows in parts])
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    first = parts[0][0]
    same = all(b.gene_ids.dtype == first.gene_ids.dtype and b.counts.dtype == first.counts.dtype for b, _ in parts)
    if not same:
        return CellBlock.concat([b.take(rows) for b, rows in parts])
    gene_ids = np.empty(int(indptr[-1]), dtype=first.gene_ids.dtype)
    counts = np.empty(int(indptr[-1]), dtype=first.counts.dtype)
    row0 = 0
    for block, rows in parts:
        _copy_rows(block.indptr, block.gene_ids, block.counts, rows, indptr, gene_ids, counts, row0)
        row0 += len(rows)
    return CellBlock(
        indptr=indptr,
        gene_ids=gene_ids,
        counts=counts,
        cell_index=np.concatenate([b.cell_index[rows] for b, rows in parts]),
        obs={k: np.concatenate([b.obs[k][rows] for b, rows in parts]) for k in first.obs},
    )


# ------------------------------------------------------------------------------------------
# reading lanes
# ------------------------------------------------------------------------------------------
class LaneReader:
    """Loads the windows of lanes on demand (one worker's view), keeps the current one per lane."""

    def __init__(self, corpus: Corpus, plan: EpochPlan, split: str, bucket_batches: int, max_len: int):
        self.corpus, self.plan, self.split = corpus, plan, split
        self.bucket_batches, self.max_len = bucket_batches, max_len
        self._windows: dict[tuple[int, int], tuple[CellBlock, np.ndarray, np.ndarray]] = {}

    def _read_range(self, lo: int, hi: int) -> tuple[CellBlock, np.ndarray, np.ndarray]:
        """The blocks holding epoch positions [lo, hi) as one CellBlock (one HDF5 slice per block, read in
        place) and the split's cells there: (block ordinal, row in that CellBlock), in plan order."""
        plan, table = self.plan, self.plan.table
        first = int(np.searchsorted(plan.cum, lo, side="right")) - 1
        last = int(np.searchsorted(plan.cum, hi, side="left"))
        ids = [int(plan.block_order[i]) for i in range(first, last)]
        window, first_row = self.corpus.read_spans(
            [(int(table.shard[b]), int(table.start[b]), int(table.stop[b])) for b in ids]
        )
        in_val = self.corpus.in_validation(window)
        in_split = in_val if self.split == "val" else ~in_val
        block_of, rows = [], []
        for j, (i, b) in enumerate(zip(range(first, last), ids, strict=True)):
            r0 = int(first_row[j])
            selected = np.flatnonzero(in_split[r0 : r0 + int(table.stop[b] - table.start[b])])[: table.n_selected[b]]
            a, z = max(lo - int(plan.cum[i]), 0), min(hi, int(plan.cum[i + 1])) - int(plan.cum[i])
            rows.append(r0 + selected[a:z])
            block_of.append(np.full(z - a, j, dtype=np.int64))
        return window, np.concatenate(block_of), np.concatenate(rows)

    def _window_order(self, lengths: np.ndarray, lane: int, m: int) -> np.ndarray:
        """Shuffle-buffer order of one window's cells (their ``lengths``); with bucketing, each chunk of
        ``bucket_batches`` batches is sorted by length and its batches shuffled."""
        n = len(lengths)
        if not self.plan.shuffle:
            return np.arange(n)
        rng = seeded_rng(self.plan.seed, self.plan.epoch, TAG_WINDOW, lane, m)
        order = rng.permutation(n)
        bs = self.plan.batch_size
        if self.bucket_batches <= 1 or n <= bs:
            return order
        chunk = self.bucket_batches * bs
        capped = np.minimum(lengths[order], self.max_len)
        order = order[np.lexsort((capped, np.arange(n) // chunk))]  # sort by length inside each chunk
        # shuffle the batches of each chunk, so that long and short batches alternate at random
        n_batches = math.ceil(n / bs)
        batch_perm = np.lexsort((rng.random(n_batches), np.arange(n_batches) * bs // chunk))
        if n_batches * bs != n:  # keep the last (short) batch last
            batch_perm = np.concatenate([batch_perm[batch_perm != n_batches - 1], [n_batches - 1]])
        cell_pos = (batch_perm[:, None] * bs + np.arange(bs)[None, :]).ravel()
        return order[cell_pos[cell_pos < n]]

    def window(self, lane: int, m: int) -> tuple[CellBlock, np.ndarray, np.ndarray]:
        """(the window's cells as one CellBlock, block ordinal and row of each split cell in shuffle-buffer order)."""
        key = (lane, m)
        if key not in self._windows:
            for old in [k for k in self._windows if k[0] == lane and k[1] < m]:
                del self._windows[old]  # lanes advance monotonically: drop passed windows
            bounds = self.plan.windows[lane]
            base = int(self.plan.lane_start[lane])
            window, block_of, rows = self._read_range(base + int(bounds[m]), base + int(bounds[m + 1]))
            order = self._window_order(np.diff(window.indptr)[rows], lane, m)
            self._windows[key] = (window, block_of[order], rows[order])
        return self._windows[key]

    def cells(self, lane: int, positions: np.ndarray) -> list[tuple[CellBlock, np.ndarray]]:
        """Cells at lane-local ``positions`` (ascending) as ``(window, rows)`` parts (one per window touched);
        inside a part, grouped by block, then in shuffle-buffer order."""
        bounds = self.plan.windows[lane]
        win = np.searchsorted(bounds, positions, side="right") - 1
        parts = []
        for m in np.unique(win):
            window, block_of, rows = self.window(lane, int(m))
            local = positions[win == m] - bounds[m]
            parts.append((window, rows[local[np.argsort(block_of[local], kind="stable")]]))
        return parts

    def release(self) -> None:
        self._windows.clear()
