"""Per-cell value binning by the official scGPT rule, vectorized over a whole CSR batch.

Rule (see ``shared/reference/scgpt_model.md``): for each cell, over its non-zero values,
``edges = quantile(values, linspace(0, 1, n_bins - 1))`` (numpy's default "linear"
method); a value ``x`` gets ``left = digitize(x, edges)`` when
``left - right <= 1`` with ``right = digitize(x, edges, right=True)``, otherwise a bin
drawn uniformly from ``right + 1 .. left`` (``x`` equals several edges). Zeros get bin 0.

Implementation: one per-cell sort of the values, the edges computed with exactly
numpy's float arithmetic, each edge turned into an exact integer-valued threshold in
the value domain, and ``left`` / ``right`` counted with one global ``searchsorted`` on
``(cell, value)`` keys. No per-cell Python loop.
"""

from __future__ import annotations

import numpy as np

_CELL_SHIFT = 34  # value keys occupy the low 34 bits of an int64 (cell, value) key


def cell_of_entry(indptr: np.ndarray) -> np.ndarray:
    """(nnz,) int64 cell index of every CSR entry."""
    lengths = np.diff(indptr)
    return np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)


def sort_within_cells(indptr: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(nnz,) permutation that sorts each cell's entries by value (ties keep CSR order)."""
    n_cells = len(indptr) - 1
    cells = cell_of_entry(indptr)
    if values.dtype in (np.uint8, np.uint16) and n_cells <= np.iinfo(np.uint16).max:
        # two stable passes of numpy's radix sort for 16-bit keys: O(nnz)
        by_value = np.argsort(values, kind="stable")
        return by_value[np.argsort(cells[by_value].astype(np.uint16), kind="stable")]
    return np.lexsort((values, cells))


def _value_keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving int64 keys in [0, 2**33) for integer or float values."""
    if values.dtype.kind in "ui":
        if values.size and (int(values.min()) < 0 or int(values.max()) >= 1 << 32):
            raise ValueError("integer counts must lie in [0, 2**32) to be binned")
        return values.astype(np.int64)
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.int32).astype(np.int64)
    ordered = np.where(bits >= 0, bits, np.int64(-(1 << 31)) - bits)  # IEEE order for negatives too
    return ordered + (1 << 31)


def _thresholds(edges: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """For float64 ``edges``: the smallest value ``t`` of the data type with ``t >= e`` and with ``t > e``.

    Then ``x >= e  <=>  x >= t_le`` and ``x > e  <=>  x >= t_lt`` for every ``x`` of that type,
    so counting edges becomes an exact integer comparison.
    """
    if np.dtype(dtype).kind in "ui":
        return np.ceil(edges), np.floor(edges) + 1
    if np.dtype(dtype) == np.float64:
        raise TypeError("float64 counts are not supported; store counts as float32 or integers")
    as32 = edges.astype(np.float32)
    up = np.nextafter(as32, np.float32(np.inf))
    t_le = np.where(as32.astype(np.float64) >= edges, as32, up)
    t_lt = np.where(as32.astype(np.float64) > edges, as32, up)
    return t_le, t_lt


def quantile_edges(sorted_values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, n_bins: int) -> np.ndarray:
    """(n_cells, n_bins - 1) float64 edges, bit-identical to ``np.quantile(cell_values, linspace(0, 1, n_bins - 1))``.

    ``sorted_values`` holds every cell's values sorted ascending at ``starts[c]:starts[c]+lengths[c]``;
    every cell must be non-empty.
    """
    q = np.linspace(0, 1, n_bins - 1)  # (E,)
    virtual = (lengths - 1)[:, None].astype(np.float64) * q[None, :]  # (C, E)  numpy: (n - 1) * q
    prev = np.floor(virtual)
    above = virtual >= (lengths - 1)[:, None]
    prev_idx = np.where(above, lengths[:, None] - 1, prev).astype(np.int64)
    next_idx = np.where(above, lengths[:, None] - 1, prev + 1).astype(np.int64)
    gamma = virtual - prev
    a = sorted_values[starts[:, None] + prev_idx]  # (C, E) value dtype
    b = sorted_values[starts[:, None] + next_idx]
    diff = b - a  # in the value dtype, as numpy's _lerp does (b >= a)
    low = a + diff * gamma  # float64
    high = b - diff * (1 - gamma)
    return np.where(gamma >= 0.5, high, low)


def bin_values(indptr: np.ndarray, counts: np.ndarray, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """(nnz,) int64 bin of every CSR entry: 0 for zeros, 1..n_bins-1 for non-zeros, per cell.

    Ties between several equal edges are broken with ``rng`` (uniform over the allowed bins).
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    counts = np.asarray(counts)
    if n_bins < 3:
        raise ValueError(f"n_bins must be >= 3, got {n_bins}")
    bins = np.zeros(len(counts), dtype=np.int64)
    nonzero = counts != 0
    if not nonzero.all():  # explicit zeros: bin the non-zeros of each cell only
        kept = np.flatnonzero(nonzero)
        new_indptr = np.zeros_like(indptr)
        np.cumsum(np.add.reduceat(nonzero, indptr[:-1]) * (np.diff(indptr) > 0), out=new_indptr[1:])
        bins[kept] = bin_values(new_indptr, counts[kept], n_bins, rng)
        return bins
    if counts.size == 0:
        return bins
    lengths = np.diff(indptr)
    order = sort_within_cells(indptr, counts)
    sorted_values = counts[order]
    cells = np.flatnonzero(lengths)  # non-empty cells
    edges = quantile_edges(sorted_values, indptr[cells], lengths[cells], n_bins)  # (C, E)
    t_le, t_lt = _thresholds(edges, counts.dtype)

    # exact (cell, value) keys; thresholds of cell c are compared with cell c's values only
    cell_base = (np.arange(len(cells), dtype=np.int64) << _CELL_SHIFT)[:, None]  # (C, 1)
    entry_cell = np.repeat(np.arange(len(cells), dtype=np.int64), lengths[cells])
    entry_keys = (entry_cell << _CELL_SHIFT) + _value_keys(sorted_values)  # (nnz,) ascending
    n_edges = edges.shape[1]
    earlier = np.repeat(np.arange(len(cells), dtype=np.int64) * n_edges, lengths[cells])  # (nnz,)

    def edges_at_or_below(thresholds: np.ndarray) -> np.ndarray:
        """(nnz,) per sorted entry: number of its cell's thresholds <= its value."""
        if counts.dtype.kind == "f":
            threshold_keys = _value_keys(thresholds)
        else:
            threshold_keys = np.clip(thresholds, 0, (1 << 33) - 1).astype(np.int64)
        keys = (cell_base + threshold_keys).ravel()  # (C * E,) ascending
        first_at_or_above = np.searchsorted(entry_keys, keys, side="left")
        hits = np.bincount(first_at_or_above, minlength=len(entry_keys) + 1)
        return np.cumsum(hits)[:-1] - earlier

    left = edges_at_or_below(t_le)  # digitize(x, edges): edges <= x
    right = edges_at_or_below(t_lt)  # digitize(x, edges, right=True): edges < x
    sorted_bins = left
    tied = np.flatnonzero(left - right > 1)
    if tied.size:
        span = left[tied] - right[tied]
        sorted_bins[tied] = right[tied] + 1 + np.floor(rng.random(tied.size) * span).astype(np.int64)
    bins[order] = sorted_bins
    return bins


def digitize_reference(values: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cell reference with numpy's own functions (one cell): edges, left, right digits. For tests."""
    edges = np.quantile(values, np.linspace(0, 1, n_bins - 1))
    return edges, np.digitize(values, edges), np.digitize(values, edges, right=True)
