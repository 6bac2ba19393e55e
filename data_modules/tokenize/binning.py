"""Per-cell value binning by the official scGPT rule over a whole CSR batch (compiled kernels).

Rule (the official scGPT rule; ``docs/data_pipeline.md``): for each cell, over its non-zero values,
``edges = quantile(values, linspace(0, 1, n_bins - 1))`` (numpy's default "linear"
method); a value ``x`` gets ``left = digitize(x, edges)`` when
``left - right <= 1`` with ``right = digitize(x, edges, right=True)``, otherwise a bin
drawn uniformly from ``right + 1 .. left`` (``x`` equals several edges). Zeros get bin 0.
The work happens in ``data_modules.tokenize.kernels`` (numba, one call per batch).
"""

from __future__ import annotations

import numpy as np

from data_modules.tokenize import kernels

_KERNEL_DTYPES = (np.uint16, np.uint32, np.float32, np.float64)  # one compiled kernel each


def cell_of_entry(indptr: np.ndarray) -> np.ndarray:
    """(nnz,) int32 cell index of every CSR entry."""
    lengths = np.diff(indptr)
    return np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)


def quantile_levels(n_bins: int) -> np.ndarray:
    """(n_bins - 1,) float64 quantile levels of the edges, exactly numpy's ``linspace``."""
    if n_bins < 3:
        raise ValueError(f"n_bins must be >= 3, got {n_bins}")
    return np.linspace(0, 1, n_bins - 1)


def kernel_counts(counts: np.ndarray) -> tuple[np.ndarray, bool]:
    """(counts in a dtype the kernels are compiled for, whether they are integers).

    uint16/uint32/float32/float64 pass through without a copy; other integers must lie in
    [0, 2**32) and become uint32; other floats become float32.
    """
    counts = np.asarray(counts)
    if counts.dtype in _KERNEL_DTYPES:
        return counts, counts.dtype.kind == "u"
    if counts.dtype.kind in "uib":
        if counts.size and (int(counts.min()) < 0 or int(counts.max()) >= 1 << 32):
            raise ValueError(
                f"integer counts must lie in [0, 2**32) to be binned, got {counts.dtype} values "
                f"in [{counts.min()}, {counts.max()}]"
            )
        return counts.astype(np.uint32), True
    if counts.dtype.kind == "f":
        return counts.astype(np.float32), False
    raise TypeError(f"cannot bin counts of dtype {counts.dtype}; store integers or float32")


def bin_values(
    indptr: np.ndarray, counts: np.ndarray, n_bins: int, rng: np.random.Generator, cells: np.ndarray | None = None
) -> np.ndarray:
    """(nnz,) int64 bin of every CSR entry: 0 for zeros, 1..n_bins-1 for non-zeros, per cell.

    Ties between several equal edges are broken with a stream seeded from ``rng`` (uniform
    over the allowed bins). ``cells`` (``cell_of_entry(indptr)``) is accepted for
    compatibility and not needed.
    """
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    values, integer = kernel_counts(counts)
    q = quantile_levels(n_bins)
    out = np.empty(len(values), dtype=np.int64)
    kernels.bin_batch(indptr[:-1], indptr[1:], values, integer, q, kernels.kernel_seed(rng), out)
    return out


def bin_edges(indptr: np.ndarray, counts: np.ndarray, n_bins: int) -> np.ndarray:
    """(n_cells, n_bins - 1) float64 edges of every cell over its non-zero values, as the kernels use them.

    Bit-identical to ``np.quantile(cell_values, linspace(0, 1, n_bins - 1))``; NaN rows for empty cells.
    """
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    values, integer = kernel_counts(counts)
    q = quantile_levels(n_bins)
    out = np.empty((len(indptr) - 1, len(q)), dtype=np.float64)
    kernels.edges_batch(indptr[:-1], indptr[1:], values, integer, q, out)
    return out
