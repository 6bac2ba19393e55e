"""Per-cell value binning by the official scGPT rule, vectorized over a whole CSR batch.

Rule (see ``shared/reference/scgpt_model.md``): for each cell, over its non-zero values,
``edges = quantile(values, linspace(0, 1, n_bins - 1))`` (numpy's default "linear"
method); a value ``x`` gets ``left = digitize(x, edges)`` when
``left - right <= 1`` with ``right = digitize(x, edges, right=True)``, otherwise a bin
drawn uniformly from ``right + 1 .. left`` (``x`` equals several edges). Zeros get bin 0.

Implementation: the edges are computed with exactly numpy's float arithmetic and each
edge is turned into an exact threshold in the value domain (for integers: ``x >= e`` iff
``x >= ceil(e)``). Integer counts (the pretraining case) use per-cell histograms and
lookup tables, O(nnz) with no sort; other values use one per-cell sort and a global
``searchsorted`` on ``(cell, value)`` keys. No per-cell Python loop either way.
"""

from __future__ import annotations

import numpy as np

_CELL_SHIFT = 34  # value keys occupy the low 34 bits of an int64 (cell, value) key


def has_zeros(counts: np.ndarray) -> bool:
    if counts.size == 0:
        return False
    return bool(counts.min() == 0) if counts.dtype.kind == "u" else bool((counts == 0).any())


def cell_of_entry(indptr: np.ndarray) -> np.ndarray:
    """(nnz,) int32 cell index of every CSR entry."""
    lengths = np.diff(indptr)
    return np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)


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


def quantile_positions(lengths: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy's "linear" quantile bookkeeping per cell: (prev, next) order-statistic ranks and gamma, (C, E) each."""
    q = np.linspace(0, 1, n_bins - 1)  # (E,)
    virtual = (lengths - 1)[:, None].astype(np.float64) * q[None, :]  # (C, E)  numpy: (n - 1) * q
    prev = np.floor(virtual)
    above = virtual >= (lengths - 1)[:, None]
    prev_idx = np.where(above, lengths[:, None] - 1, prev).astype(np.int64)
    next_idx = np.where(above, lengths[:, None] - 1, prev + 1).astype(np.int64)
    return prev_idx, next_idx, virtual - prev


def lerp_edges(a: np.ndarray, b: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """numpy's ``_lerp``: float64 edges from order statistics ``a <= b`` (difference in their dtype)."""
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)


def quantile_edges(sorted_values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, n_bins: int) -> np.ndarray:
    """(n_cells, n_bins - 1) float64 edges, bit-identical to ``np.quantile(cell_values, linspace(0, 1, n_bins - 1))``.

    ``sorted_values`` holds every cell's values sorted ascending at ``starts[c]:starts[c]+lengths[c]``;
    every cell must be non-empty.
    """
    prev_idx, next_idx, gamma = quantile_positions(lengths, n_bins)
    a = sorted_values[starts[:, None] + prev_idx]  # (C, E) value dtype
    b = sorted_values[starts[:, None] + next_idx]
    return lerp_edges(a, b, gamma)


def _bin_small_integers(indptr: np.ndarray, counts: np.ndarray, cells: np.ndarray, n_bins: int,
                        n_values: int) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) digits for integer counts < ``n_values`` with per-cell histograms: no sort.

    Order statistics come from a cumulative (cell, value) histogram; ``left``/``right`` from
    per-cell lookup tables of how many thresholds lie at or below each value.
    """
    lengths = np.diff(indptr)
    n_cells = len(lengths)
    key = cells * n_values + counts.astype(cells.dtype)  # (nnz,) (cell, value) histogram slot
    cum = np.cumsum(np.bincount(key, minlength=n_cells * n_values))  # entries at or below each slot
    live = np.flatnonzero(lengths)
    prev_idx, next_idx, gamma = quantile_positions(lengths[live], n_bins)
    base = (live * n_values)[:, None]
    a = np.searchsorted(cum, indptr[live][:, None] + prev_idx, side="right") - base  # (C, E) order statistics
    b = np.searchsorted(cum, indptr[live][:, None] + next_idx, side="right") - base
    edges = lerp_edges(a, b, gamma)

    def table(thresholds: np.ndarray) -> np.ndarray:
        """(n_cells * n_values,) number of the cell's thresholds <= each value."""
        slots = live[:, None] * (n_values + 1) + np.clip(thresholds, 0, n_values).astype(np.int64)
        per_value = np.bincount(slots.ravel(), minlength=n_cells * (n_values + 1)).reshape(n_cells, n_values + 1)
        return np.cumsum(per_value, axis=1, dtype=np.int32)[:, :n_values].ravel()

    return table(np.ceil(edges))[key], table(np.floor(edges) + 1)[key]  # x >= e <=> x >= ceil(e)


def _bin_sorted(indptr: np.ndarray, counts: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) digits for any counts: one per-cell sort and a global searchsorted."""
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

    left, right = np.empty(len(counts), np.int64), np.empty(len(counts), np.int64)
    left[order] = edges_at_or_below(t_le)  # digitize(x, edges): edges <= x
    right[order] = edges_at_or_below(t_lt)  # digitize(x, edges, right=True): edges < x
    return left, right


def bin_values(indptr: np.ndarray, counts: np.ndarray, n_bins: int, rng: np.random.Generator,
               cells: np.ndarray | None = None) -> np.ndarray:
    """(nnz,) integer bin of every CSR entry: 0 for zeros, 1..n_bins-1 for non-zeros, per cell.

    Ties between several equal edges are broken with ``rng`` (uniform over the allowed bins).
    ``cells``: optional precomputed ``cell_of_entry(indptr)``.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    counts = np.asarray(counts)
    if n_bins < 3:
        raise ValueError(f"n_bins must be >= 3, got {n_bins}")
    if has_zeros(counts):  # explicit zeros: bin the non-zeros of each cell only
        bins = np.zeros(len(counts), dtype=np.int64)
        kept = np.flatnonzero(counts != 0)
        new_indptr = np.zeros_like(indptr)
        np.cumsum(np.bincount(cell_of_entry(indptr)[kept], minlength=len(indptr) - 1), out=new_indptr[1:])
        bins[kept] = bin_values(new_indptr, counts[kept], n_bins, rng)
        return bins
    if counts.size == 0:
        return np.zeros(0, dtype=np.int64)
    n_values = int(counts.max()) + 1 if counts.dtype.kind in "ui" else 0
    n_cells = len(indptr) - 1
    if 0 < n_values and n_cells * (n_values + 1) <= max(8 * len(counts), 1 << 20):
        cells = cell_of_entry(indptr) if cells is None else cells
        left, right = _bin_small_integers(indptr, counts, cells, n_bins, n_values)
    else:
        left, right = _bin_sorted(indptr, counts, n_bins)
    span = left - right  # > 1: the value equals several edges
    span[span < 2] = 0
    # uniform in right+1 .. left where tied (drawn for every entry: cheaper than gathering the tied ones)
    left -= (rng.random(len(left)) * span).astype(left.dtype)  # float64: u * span < span exactly
    return left


def digitize_reference(values: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cell reference with numpy's own functions (one cell): edges, left, right digits. For tests."""
    edges = np.quantile(values, np.linspace(0, 1, n_bins - 1))
    return edges, np.digitize(values, edges), np.digitize(values, edges, right=True)
