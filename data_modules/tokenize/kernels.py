"""Compiled (numba) per-batch kernels: binning, gene sampling, generative split, padded rows.

One call handles a whole batch; the loop over its cells runs compiled (no per-cell Python
work). Random draws come from a splitmix64 stream seeded once per call from the caller's
``numpy.random.Generator``, so results are a pure function of that generator.

Binning rule (the official scGPT one; ``docs/data_pipeline.md``), per cell over its non-zero values:
``edges = quantile(values, linspace(0, 1, n_bins - 1))`` with numpy's "linear" arithmetic,
reproduced operation by operation (edges are bit-identical to ``np.quantile``);
``left`` = number of edges <= x, ``right`` = number of edges < x (``np.digitize``); the bin
is ``left`` unless ``left - right > 1`` (x equals several edges), then uniform in
``right + 1 .. left``. Zeros get bin 0 and never enter a row. Integer counts below
``max(1024, 4 n)`` use a per-cell histogram and lookup tables (O(n), no sort); other values
(floats, large integers) one per-cell sort and a binary search over the edges. The edges
always use every non-zero value of the cell; when tokenizing, bins (and tie draws) are then
computed only for the genes the row keeps.
"""

from __future__ import annotations

import numba
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)
_LUT_MIN = 1024  # integer cells with all values < max(_LUT_MIN, 4 * n_values) take the histogram path

# flags of a cell's entries while its row is built
_DROPPED, _KNOWN, _UNKNOWN = 0, 1, 2


def kernel_seed(rng: np.random.Generator) -> np.uint64:
    """The 64-bit seed of one kernel call's random stream, drawn from ``rng``."""
    return rng.integers(0, np.iinfo(np.uint64).max, dtype=np.uint64, endpoint=True)


# ------------------------------------------------------------------------------------------
# random stream (splitmix64; state is a (1,) uint64 array)
# ------------------------------------------------------------------------------------------
@numba.njit(cache=True)
def _next_u64(state):
    z = state[0] + _GOLDEN
    state[0] = z
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def _rand32(state):
    """uint64 holding 32 random bits."""
    return _next_u64(state) >> np.uint64(32)


@numba.njit(cache=True)
def _below(state, n):
    """Integer uniform in [0, n) for 0 <= n < 2**32 (multiply-shift; bias below n / 2**32); 0 when n <= 1."""
    return np.int64((_rand32(state) * np.uint64(n)) >> np.uint64(32))


# ------------------------------------------------------------------------------------------
# binning one cell
# ------------------------------------------------------------------------------------------
@numba.njit(cache=True)
def _lerp(a, b, gamma):
    """numpy's ``_lerp``: the difference in the value dtype, the rest in float64."""
    diff = b - a
    if gamma >= 0.5:
        return b - diff * (1.0 - gamma)
    return a + diff * gamma


@numba.njit(cache=True)
def _ranks(n, qj):
    """numpy's "linear" quantile bookkeeping: (previous rank, next rank, gamma)."""
    virtual = (n - 1) * qj
    prev = np.floor(virtual)
    gamma = virtual - prev
    if virtual >= n - 1:
        return n - 1, n - 1, gamma
    return np.int64(prev), np.int64(prev) + 1, gamma


@numba.njit(cache=True)
def _edges_sorted(sorted_vals, n, q, edges):
    """(E,) edges of one cell from its ascending values."""
    for j in range(len(q)):
        lo, hi, gamma = _ranks(n, q[j])
        edges[j] = _lerp(sorted_vals[lo], sorted_vals[hi], gamma)


@numba.njit(cache=True)
def _edges_hist(cum, n, q, edges):
    """(E,) edges of one cell of integers from ``cum[v]`` = number of its values <= v."""
    v = 0
    for j in range(len(q)):
        lo, hi, gamma = _ranks(n, q[j])
        while cum[v] <= lo:  # value of rank lo: the smallest v with more than lo values <= v
            v += 1
        a = v
        while cum[v] <= hi:
            v += 1
        edges[j] = _lerp(np.float64(a), np.float64(v), gamma)  # integer differences are exact in float64
        v = a  # the next edge's ranks are >= these


@numba.njit(cache=True)
def _tie_draw(left, right, state):
    """``left``, or uniform in ``right + 1 .. left`` when the value equals several edges (span > 1).

    Branch-free: a draw below span 1 is always 0, so every entry takes one draw.
    """
    return left - _below(state, left - right)


@numba.njit(cache=True)
def _cell_edges(vals, n, integer, q, edges, hist):
    """(E,) edges of the ``n`` non-zero values ``vals[:n]`` of one cell into ``edges``.

    Returns ``top`` > 0 when the histogram path was taken (``hist[:top]`` then holds the
    cumulative counts of the values 0..top-1), else 0. ``hist``: (>= 4 max(_LUT_MIN, 4 n),) int64.
    """
    vmax = vals[0]
    for i in range(1, n):
        if vals[i] > vmax:
            vmax = vals[i]
    if integer and vmax < max(_LUT_MIN, 4 * n):
        top = np.int64(vmax) + 1
        # four interleaved histograms: repeated values (most counts are 1-3) do not wait on each other
        hist[: 4 * top] = 0
        for i in range(0, n - 3, 4):
            hist[np.int64(vals[i])] += 1
            hist[top + np.int64(vals[i + 1])] += 1
            hist[2 * top + np.int64(vals[i + 2])] += 1
            hist[3 * top + np.int64(vals[i + 3])] += 1
        for i in range(n - n % 4, n):
            hist[np.int64(vals[i])] += 1
        cum = hist[:top]
        running = 0
        for v in range(top):
            running += hist[v] + hist[top + v] + hist[2 * top + v] + hist[3 * top + v]
            cum[v] = running
        _edges_hist(cum, n, q, edges)
        return top
    _edges_sorted(np.sort(vals[:n]), n, q, edges)
    return 0


@numba.njit(cache=True)
def _bin_tables(vals, n, integer, q, edges, hist, lut_left, lut_span):
    """Edges of one cell's ``n`` non-zero values and, on the histogram path, lookup tables for every v < top:
    ``lut_left[v]`` = edges <= v, ``lut_span[v]`` = edges == v (> 1: tied). Returns top (0: sort path)."""
    n_edges = len(q)
    top = _cell_edges(vals, n, integer, q, edges, hist)
    jl, jr = 0, 0
    for v in range(top):
        while jl < n_edges and edges[jl] <= v:
            jl += 1
        while jr < n_edges and edges[jr] < v:
            jr += 1
        lut_left[v] = jl
        lut_span[v] = jl - jr
    return top


@numba.njit(cache=True)
def _bin_entries(vals, idx, m, top, edges, lut_left, lut_span, state, out):
    """``out[i]`` = bin of value ``vals[idx[i]]`` for i < m (tables from ``_bin_tables``).

    Tied values draw uniformly in ``right + 1 .. left``; on the histogram path two entries share
    one 64-bit draw (32-bit multiply-shift each; a span <= 1 always draws 0, so no branch).
    """
    if top > 0:
        for i in range(0, m - 1, 2):
            r = _next_u64(state)
            v0, v1 = np.int64(vals[idx[i]]), np.int64(vals[idx[i + 1]])
            out[i] = lut_left[v0] - np.int64(((r & _LOW32) * np.uint64(lut_span[v0])) >> np.uint64(32))
            out[i + 1] = lut_left[v1] - np.int64(((r >> np.uint64(32)) * np.uint64(lut_span[v1])) >> np.uint64(32))
        if m % 2:
            v = np.int64(vals[idx[m - 1]])
            out[m - 1] = lut_left[v] - _below(state, lut_span[v])
        return
    for i in range(m):
        x = np.float64(vals[idx[i]])
        left = np.searchsorted(edges, x, side="right")  # edges <= x
        right = np.searchsorted(edges, x, side="left")  # edges < x
        out[i] = _tie_draw(np.int64(left), np.int64(right), state)


@numba.njit(cache=True)
def _max_cell_length(starts, stops):
    longest = 0
    for c in range(len(starts)):
        longest = max(longest, stops[c] - starts[c])
    return longest


# ------------------------------------------------------------------------------------------
# batch kernels
# ------------------------------------------------------------------------------------------
@numba.njit(cache=True)
def bin_batch(starts, stops, counts, integer, q, seed, out):
    """``out`` (nnz,) int64: the bin of every entry of cells ``counts[starts[c]:stops[c]]`` (0 for zeros)."""
    state = np.full(1, seed, dtype=np.uint64)
    max_n = _max_cell_length(starts, stops)
    vals_buf = np.empty(max_n, dtype=counts.dtype)
    slots = np.arange(len(counts))  # stands in for gene ids: where each non-zero entry sits
    slots_buf = np.empty(max_n, dtype=slots.dtype)
    every = np.arange(max_n)
    bins = np.empty(max_n, dtype=np.int64)
    edges = np.empty(len(q), dtype=np.float64)
    cap = max(_LUT_MIN, 4 * max_n) + 1
    hist, lut_left, lut_span = np.empty(4 * cap, np.int64), np.empty(cap, np.int64), np.empty(cap, np.int64)
    out[:] = 0
    for c in range(len(starts)):
        vals, where = _cell_entries(starts, stops, counts, slots, c, vals_buf, slots_buf)
        n = len(vals)
        if n > 0:
            top = _bin_tables(vals, n, integer, q, edges, hist, lut_left, lut_span)
            _bin_entries(vals, every, n, top, edges, lut_left, lut_span, state, bins)
            for t in range(n):
                out[where[t]] = bins[t]


@numba.njit(cache=True)
def edges_batch(starts, stops, counts, integer, q, out):
    """``out`` (n_cells, E) float64: every cell's edges over its non-zero values (NaN for empty cells)."""
    max_n = _max_cell_length(starts, stops)
    vals_buf = np.empty(max_n, dtype=counts.dtype)
    slots = np.arange(len(counts))
    slots_buf = np.empty(max_n, dtype=slots.dtype)
    hist = np.empty(4 * (max(_LUT_MIN, 4 * max_n) + 1), np.int64)
    for c in range(len(starts)):
        vals, _ = _cell_entries(starts, stops, counts, slots, c, vals_buf, slots_buf)
        if len(vals) > 0:
            _cell_edges(vals, len(vals), integer, q, out[c], hist)
        else:
            out[c, :] = np.nan


@numba.njit(cache=True)
def _choose(flags, perm, n, k, n_unknown, state):
    """Flags of a cell's ``n`` entries: a uniform ``k``-subset kept, a uniform ``n_unknown``-subset of it unknown.

    A partial Fisher-Yates shuffle: its first ``k`` picks are a uniformly random ordered
    subset, so the last ``n_unknown`` of them are a uniform subset of the kept ones.
    """
    for i in range(n):
        perm[i] = i
    picks = k if n > k else n_unknown
    for t in range(picks):
        j = t + _below(state, n - t)
        perm[t], perm[j] = perm[j], perm[t]
    if n > k:
        flags[:n] = _DROPPED
        for t in range(k - n_unknown):
            flags[perm[t]] = _KNOWN
    else:
        flags[:n] = _KNOWN
        k = n_unknown  # the first n_unknown picks are the unknown genes
    for t in range(k - n_unknown, k):
        flags[perm[t]] = _UNKNOWN


@numba.njit(cache=True)
def _cell_entries(starts, stops, counts, gene_ids, c, vals_buf, genes_buf):
    """(values, genes) of cell ``c``'s non-zero entries: views of the batch arrays when it has no zeros."""
    start, stop = starts[c], stops[c]
    n = 0
    for i in range(start, stop):  # also brings the cell's entries into the cache for the passes that follow
        n += counts[i] != 0
    if n == stop - start:
        return counts[start:stop], gene_ids[start:stop]
    m = 0
    for i in range(start, stop):
        if counts[i] != 0:
            vals_buf[m] = counts[i]
            genes_buf[m] = gene_ids[i]
            m += 1
    return vals_buf[:n], genes_buf[:n]


@numba.njit(cache=True, nogil=True)
def encode_batch(
    starts,
    stops,
    counts,
    gene_ids,
    integer,
    q,
    max_genes,
    gen_ratio,
    mlm_prob,
    seed,
    offsets,
    out_genes,
    out_bins,
    out_flags,
):
    """The kept tokens of every cell, compact: ``out_*[offsets[c]:offsets[c + 1]]`` for cell c.

    Cell c's entries are ``counts[starts[c]:stops[c]]`` (with ``gene_ids``). Per cell: bin its
    non-zero values, keep a uniform subset of ``max_genes`` of them (store order is kept;
    ``offsets`` (B+1,) is filled with the kept counts' cumulative sum; ``out_*`` need room for
    ``sum(min(stops - starts, max_genes))``), mark ``floor(gen_ratio * kept)`` of the kept
    ones unknown (flag bit 0; ``gen_ratio < 0``: none) and draw MLM masks with ``mlm_prob``
    (flag bit 1; ``mlm_prob < 0``: none).
    """
    state = np.full(1, seed, dtype=np.uint64)
    use_gen, use_mlm = gen_ratio >= 0.0, mlm_prob >= 0.0
    mlm_threshold = np.uint64(min(max(mlm_prob, 0.0), 1.0) * 4294967296.0)  # rand32 < threshold: P = mlm_prob
    max_n = _max_cell_length(starts, stops)
    vals_buf = np.empty(max_n, dtype=counts.dtype)
    genes_buf = np.empty(max_n, dtype=gene_ids.dtype)
    perm = np.empty(max_n, dtype=np.int32)
    flags = np.empty(max_n, dtype=np.uint8)
    kept_at = np.empty(max_n, dtype=np.int64)
    edges = np.empty(len(q), dtype=np.float64)
    cap = max(_LUT_MIN, 4 * max_n) + 1
    hist, lut_left, lut_span = np.empty(4 * cap, np.int64), np.empty(cap, np.int64), np.empty(cap, np.int64)
    offsets[0] = 0
    for c in range(len(starts)):
        vals, genes = _cell_entries(starts, stops, counts, gene_ids, c, vals_buf, genes_buf)
        n = len(vals)
        k = min(n, max_genes)
        row = offsets[c]
        offsets[c + 1] = row + k
        if n == 0:
            continue
        top = _bin_tables(vals, n, integer, q, edges, hist, lut_left, lut_span)  # edges over ALL the cell's values
        n_unknown = np.int64(np.floor(gen_ratio * k)) if use_gen else 0
        _choose(flags, perm, n, k, n_unknown, state)
        m = 0
        for t in range(n):  # positions of the kept entries, in store order (branch-free compaction)
            kept_at[m] = t
            m += flags[t] != _DROPPED
        _bin_entries(vals, kept_at, k, top, edges, lut_left, lut_span, state, out_bins[row : row + k])
        for i in range(k):
            t = kept_at[i]
            hidden = np.uint8(flags[t] == _UNKNOWN)
            if use_mlm:
                hidden |= np.uint8(_rand32(state) < mlm_threshold) << np.uint8(1)
            out_genes[row + i] = genes[t]
            out_flags[row + i] = hidden


@numba.njit(cache=True, nogil=True)
def pad_batch(
    offsets,
    genes,
    bins,
    flags,
    use_gen,
    use_mlm,
    pad_id,
    cls_id,
    pad_value,
    mask_value,
    cls_value,
    token_ids,
    values,
    target_values,
    pad_mask,
    gen_mask,
    mlm_mask,
):
    """Fill the padded (B, L) rows from compact tokens: ``<cls>``, the cell's genes, ``<pad>`` up to L.

    ``flags`` bit 0 = unknown (generative), bit 1 = MLM-masked; hidden genes get
    ``mask_value`` as input value, ``target_values`` every true bin. ``gen_mask`` /
    ``mlm_mask`` are untouched unless ``use_gen`` / ``use_mlm``.
    """
    n_rows, L = token_ids.shape
    pad_v, mask_v, cls_v = np.float32(pad_value), np.float32(mask_value), np.float32(cls_value)
    for c in range(n_rows):
        row, k = offsets[c], offsets[c + 1] - offsets[c]
        tok_row, val_row, tgt_row, pad_row = token_ids[c], values[c], target_values[c], pad_mask[c]
        tok_row[0], val_row[0], tgt_row[0], pad_row[0] = cls_id, cls_v, cls_v, False
        for p in range(1, k + 1):
            b = np.float32(bins[row + p - 1])
            tok_row[p] = genes[row + p - 1]
            tgt_row[p] = b
            val_row[p] = mask_v if flags[row + p - 1] != 0 else b
            pad_row[p] = False
        for p in range(k + 1, L):
            tok_row[p], val_row[p], tgt_row[p], pad_row[p] = pad_id, pad_v, pad_v, True
        if use_gen:
            gen_row = gen_mask[c]
            gen_row[0] = False
            for p in range(1, k + 1):
                gen_row[p] = (flags[row + p - 1] & 1) != 0
            gen_row[k + 1 :] = False
        if use_mlm:
            mlm_row = mlm_mask[c]
            mlm_row[0] = False
            for p in range(1, k + 1):
                mlm_row[p] = (flags[row + p - 1] & 2) != 0
            mlm_row[k + 1 :] = False


@numba.njit(cache=True, nogil=True)
def pack_batch(
    offsets,
    genes,
    bins,
    flags,
    use_gen,
    use_mlm,
    cls_id,
    mask_value,
    cls_value,
    token_ids,
    values,
    target_values,
    token_cell,
    gen_mask,
    mlm_mask,
):
    """Fill the packed (T,) stream from compact tokens: per cell ``<cls>``, then its genes; no padding.

    Cell c occupies ``[offsets[c] + c, offsets[c + 1] + c + 1)`` (its ``<cls>`` first); the row contents
    equal ``pad_batch``'s non-pad part. ``token_cell`` gets c. ``gen_mask`` / ``mlm_mask`` are untouched
    unless ``use_gen`` / ``use_mlm``.
    """
    mask_v, cls_v = np.float32(mask_value), np.float32(cls_value)
    for c in range(len(offsets) - 1):
        row, k = offsets[c], offsets[c + 1] - offsets[c]
        at = row + c  # where the cell's <cls> lands in the stream
        token_ids[at], values[at], target_values[at], token_cell[at] = cls_id, cls_v, cls_v, c
        if use_gen:
            gen_mask[at] = False
        if use_mlm:
            mlm_mask[at] = False
        for p in range(k):
            f = flags[row + p]
            b = np.float32(bins[row + p])
            t = at + 1 + p
            token_ids[t] = genes[row + p]
            target_values[t] = b
            values[t] = mask_v if f != 0 else b
            token_cell[t] = c
            if use_gen:
                gen_mask[t] = (f & 1) != 0
            if use_mlm:
                mlm_mask[t] = (f & 2) != 0
