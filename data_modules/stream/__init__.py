"""Block-shuffled, exactly-once, resumable stream of tokenized batches over a corpus.

The epoch plan (a pure function of corpus, split, seed, epoch and the stream's options):

1. Blocks: every shard is cut into contiguous blocks of ``block_size`` rows; each block is
   read as one HDF5 slice. The blocks are permuted with a generator seeded by (seed, epoch).
2. Lanes: the split's cells, in permuted-block order, are cut into ``lanes`` contiguous
   lanes of equal size (+-1). Each lane is cut into windows of ~``buffer_blocks * block_size``
   cells (boundaries on multiples of ``batch_size``); a window is read, shuffled (the
   shuffle buffer; with length bucketing), and cut into batches.
3. Global batch order: round robin over the lanes, ``k -> (lane k % lanes, batch k // lanes)``,
   for the ``lanes * nb`` full batches (``nb`` = full batches of the shortest lane). This
   sequence does not depend on world size or workers.
4. Ranks and workers: global batch ``k`` goes to rank ``k % R``; the rank's ``i``-th batch is
   made by dataloader worker ``i % W``, which is the order in which torch's DataLoader
   returns them, so a rank's stream is the same for any number of workers. When
   ``R * W`` divides ``lanes`` every worker reads only its own lanes (no read twice).
5. Tail: the < R remaining round-robin batches plus the leftover cells of every lane
   (< lanes * (batch_size + 1) cells) form the final pool, split over the fewest steps of R
   batches with sizes as even as possible (<= batch_size). Every cell of the split is
   yielded exactly once per epoch; the only exception is a pool with fewer cells than
   ranks, where the empty ranks repeat a pool cell (at most R - 1 repeats per epoch).
   All ranks yield the same number of batches, so DDP never waits on a missing batch.

Layout: ``packing=True`` turns each batch into one packed (1, T) token stream with ``cu_seqlens`` instead of
padded (B, L) rows; it changes no batch's cells, so everything above holds with packing on or off.

State is a global cursor ``(epoch, rr_done, final split)``, so a run resumed at any world
size continues exactly where the job stopped: nothing repeated or skipped.
Memory per worker: for each lane it serves, one window (buffer_blocks * block_size cells of
CSR data, plus the block straddling a window boundary) and the batch being tokenized.

Files: ``plan.py`` (block table, epoch plan, cursor and per-rank schedule), ``blocks.py`` (reading and
gathering cells), ``dataset.py`` (``CellStream``), ``loader.py`` (``StreamLoader``).
"""

from data_modules.stream.blocks import LaneReader, gather_parts
from data_modules.stream.dataset import CellStream, LoaderOptions, cells_for_token_budget
from data_modules.stream.loader import StreamLoader, pin_batch
from data_modules.stream.plan import BlockTable, Cursor, EpochPlan, RankSchedule, build_block_table, final_sizes

__all__ = [
    "BlockTable",
    "CellStream",
    "Cursor",
    "EpochPlan",
    "LaneReader",
    "LoaderOptions",
    "RankSchedule",
    "StreamLoader",
    "build_block_table",
    "cells_for_token_budget",
    "final_sizes",
    "gather_parts",
    "pin_batch",
]
