"""glibc's heap on CPU runs with long cells: a fixed mmap threshold, so freed activations go back to the system.

glibc serves an allocation below its mmap threshold from the heap and a larger one with its own mapping. The
threshold is dynamic by default: each time a mapped block is freed, the threshold rises to that block's size (up to
32 MiB). A CPU fine-tune at the paper's 3,001-token layout allocates activations of many sizes (cells of different
lengths, training micro-batches, validation and prediction batches); after the first few, they all come from the
heap, and the heap's free pieces are too scattered to be returned, so the process' resident memory keeps the high
mark of every batch shape it met. Measured (``scripts/bench_finetune_memory.py --cells 1000``, docs/benchmarks.md,
idle): a peak RSS of 1,683 MB with glibc's default, 1,247 MB with a fixed threshold of 1 MiB, at ~11% more wall time
(286 s vs 258 s: freed blocks are unmapped, new ones page-faulted in).

``set_mmap_threshold`` fixes the threshold (``mallopt(M_MMAP_THRESHOLD, n)``, which also turns the dynamic
adjustment off) for the allocations that follow; processes forked from this one (dataloader workers) inherit it.
A ``MALLOC_MMAP_THRESHOLD_`` in the environment is the user's own choice and is left as glibc read it. On a C
library other than glibc nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MAX_THRESHOLD = 32 << 20  # glibc refuses a fixed threshold above HEAP_MAX / 2 on 64-bit: 32 MiB


def set_mmap_threshold(threshold: int | None) -> str:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process and the ones it forks.

    Parameters
    ----------
    threshold
        Bytes (0 to 32 MiB): allocations of this size and larger get their own mapping, returned to the system on
        free. ``None`` keeps glibc's dynamic threshold.

    Returns
    -------
    str
        What was done, for the run's log: ``"fixed at <n> bytes"``, ``"left to glibc (...)"`` or
        ``"not glibc: unchanged"``.
    """
    if threshold is None:
        return "left to glibc's dynamic threshold (malloc_mmap_threshold=null)"
    if not 0 <= int(threshold) <= MAX_THRESHOLD:
        raise ValueError(f"malloc_mmap_threshold={threshold} must be between 0 and {MAX_THRESHOLD} bytes or null")
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return f"left to glibc (MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']} in the environment)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc: unchanged"
    if ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, int(threshold)) != 1:
        return f"glibc refused mallopt(M_MMAP_THRESHOLD, {threshold}): unchanged"
    return f"fixed at {int(threshold)} bytes"
