"""Block-shuffled, exactly-once, resumable stream of tokenized batches over a corpus.

The epoch plan (a pure function of corpus, split, seed, epoch and the layout options):

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

State is a global cursor ``(epoch, rr_done, final split)``, so a run resumed at any world
size continues exactly where the job stopped: nothing repeated or skipped.
Memory per worker: for each lane it serves, one window (buffer_blocks * block_size cells of
CSR data, plus the block straddling a window boundary) and the batch being tokenized.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

import h5py
import numba
import numpy as np
import torch
import torch.utils.data

from data_modules.batch import Batch
from data_modules.store.format import OBS_GROUP
from data_modules.store.reader import CellBlock, Corpus
from data_modules.tokenize import Tokenizer, TokenizerConfig

SPLITS = ("train", "val")
_TAG_WINDOW, _TAG_BATCH, _TAG_FINAL = 1, 2, 3


# ------------------------------------------------------------------------------------------
# blocks of the split
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockTable:
    """Contiguous row ranges of the corpus and how many cells of the split each holds."""

    shard: np.ndarray  # (n_blocks,) int64
    start: np.ndarray  # (n_blocks,) int64 shard-local row
    stop: np.ndarray  # (n_blocks,) int64
    n_selected: np.ndarray  # (n_blocks,) int64 cells of the split in the block (first n_selected of them)

    @property
    def n_cells(self) -> int:
        return int(self.n_selected.sum())


def _dataset_codes(corpus: Corpus, shard: int) -> np.ndarray:
    with h5py.File(corpus.shard_path(shard), "r") as f:
        return f[OBS_GROUP]["dataset"][:]


def build_block_table(corpus: Corpus, split: str, block_size: int, max_cells: int | None = None) -> BlockTable:
    """Blocks of ``block_size`` rows per shard with the number of ``split`` cells in each."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    needs_dataset = corpus.split.get("strategy", "cell") == "dataset"
    shards, starts, stops, counts = [], [], [], []
    for shard in range(corpus.n_shards):
        n = int(corpus.shard_offsets[shard + 1] - corpus.shard_offsets[shard])
        ids = np.arange(n, dtype=np.int64) + corpus.shard_offsets[shard]
        probe = CellBlock(
            indptr=np.zeros(n + 1, dtype=np.int64),
            gene_ids=np.zeros(0, np.int32),
            counts=np.zeros(0, np.uint16),
            cell_index=ids,
            obs={"dataset": _dataset_codes(corpus, shard)} if needs_dataset else {},
        )
        in_val = corpus.in_validation(probe)
        selected = in_val if split == "val" else ~in_val
        block_starts = np.arange(0, n, block_size, dtype=np.int64)
        shards.append(np.full(len(block_starts), shard, dtype=np.int64))
        starts.append(block_starts)
        stops.append(np.minimum(block_starts + block_size, n))
        counts.append(np.add.reduceat(selected.astype(np.int64), block_starts) if n else np.zeros(0, np.int64))
    table = BlockTable(*(np.concatenate(a) if a else np.zeros(0, np.int64) for a in (shards, starts, stops, counts)))
    if max_cells is not None and table.n_cells > max_cells:  # deterministic prefix (validation subsets)
        cum = np.cumsum(table.n_selected)
        last = int(np.searchsorted(cum, max_cells))
        n_sel = table.n_selected[: last + 1].copy()
        n_sel[-1] -= int(cum[last] - max_cells)
        table = BlockTable(table.shard[: last + 1], table.start[: last + 1], table.stop[: last + 1], n_sel)
    return table


# ------------------------------------------------------------------------------------------
# the epoch plan
# ------------------------------------------------------------------------------------------
def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


@dataclass
class EpochPlan:
    """Where every cell of one epoch goes: lanes, windows, round-robin batches, final pool."""

    table: BlockTable
    epoch: int
    seed: int
    shuffle: bool
    lanes: int
    batch_size: int
    window_cells: int
    block_order: np.ndarray = field(init=False)  # (n_blocks,) permuted block ids
    cum: np.ndarray = field(init=False)  # (n_blocks+1,) split cells before each permuted block
    lane_start: np.ndarray = field(init=False)  # (lanes+1,) epoch position where each lane starts
    windows: list = field(init=False)  # per lane: (n_windows+1,) lane-local window boundaries
    nb: int = field(init=False)  # full round-robin batches per lane

    def __post_init__(self):
        n_blocks = len(self.table.shard)
        self.block_order = _rng(self.seed, self.epoch).permutation(n_blocks) if self.shuffle else np.arange(n_blocks)
        self.cum = np.zeros(n_blocks + 1, dtype=np.int64)
        np.cumsum(self.table.n_selected[self.block_order], out=self.cum[1:])
        n = int(self.cum[-1])
        self.lane_start = np.arange(self.lanes + 1, dtype=np.int64) * n // self.lanes
        bs = self.batch_size
        self.windows = []
        for lane_len in np.diff(self.lane_start):
            n_win = max(1, math.ceil(lane_len / self.window_cells))
            bounds = (lane_len * np.arange(n_win, dtype=np.int64) // n_win) // bs * bs
            self.windows.append(np.unique(np.append(bounds, lane_len)))
        self.nb = int(np.diff(self.lane_start).min()) // bs if self.lanes else 0

    @property
    def n_cells(self) -> int:
        return int(self.cum[-1])

    @property
    def n_rr(self) -> int:
        """Round-robin (full) batches in the epoch."""
        return self.lanes * self.nb

    def rr_positions(self, k: int) -> tuple[int, np.ndarray]:
        """(lane, lane-local positions) of round-robin batch ``k``."""
        lane, j = k % self.lanes, k // self.lanes
        return lane, np.arange(j * self.batch_size, (j + 1) * self.batch_size, dtype=np.int64)

    def pool(self, pool_start: int) -> tuple[np.ndarray, np.ndarray]:
        """(lane, lane-local position) of every final-pool cell: rr batches from ``pool_start``, then leftovers."""
        lanes, positions = [], []
        for k in range(pool_start, self.n_rr):
            lane, pos = self.rr_positions(k)
            lanes.append(np.full(len(pos), lane, dtype=np.int64))
            positions.append(pos)
        for lane, lane_len in enumerate(np.diff(self.lane_start)):
            pos = np.arange(self.nb * self.batch_size, lane_len, dtype=np.int64)
            lanes.append(np.full(len(pos), lane, dtype=np.int64))
            positions.append(pos)
        if not lanes:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(lanes), np.concatenate(positions)


def final_sizes(n_cells: int, world_size: int, batch_size: int) -> np.ndarray:
    """(steps * world_size,) cells per final slot: fewest steps, sizes as even as possible.

    A size of 0 (fewer cells than ranks) is served with one repeated pool cell.
    """
    if n_cells <= 0:
        return np.zeros(0, dtype=np.int64)
    steps = math.ceil(n_cells / (world_size * batch_size))
    slots = steps * world_size
    return n_cells // slots + (np.arange(slots) < n_cells % slots).astype(np.int64)


# ------------------------------------------------------------------------------------------
# cursor: where the job is inside an epoch (global, independent of world size)
# ------------------------------------------------------------------------------------------
@dataclass
class Cursor:
    epoch: int = 0
    rr_done: int = 0  # round-robin batches consumed by the whole job
    pool_start: int | None = None  # set once the final pool is being consumed
    split_from: int = 0  # pool cells consumed before the current final split started
    split_world: int = 0  # world size of the current final split
    split_steps: int = 0  # steps of the current final split consumed

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RankSchedule:
    """The batches one rank yields from a cursor: round-robin ones, then final slots."""

    plan: EpochPlan
    cursor: Cursor
    rank: int
    world_size: int
    n_rr_steps: int = field(init=False)
    pool_start: int = field(init=False)
    split_from: int = field(init=False)
    split_steps_before: int = field(init=False)
    sizes: np.ndarray = field(init=False)  # sizes of the final split's slots (whole split)

    def __post_init__(self):
        c, plan, R = self.cursor, self.plan, self.world_size
        if c.pool_start is None:
            self.n_rr_steps = (plan.n_rr - c.rr_done) // R
            self.pool_start = c.rr_done + self.n_rr_steps * R
            pool_len = len(plan.pool(self.pool_start)[0])
            self.split_from, self.split_steps_before = 0, 0
            self.sizes = final_sizes(pool_len, R, plan.batch_size)
        else:
            self.n_rr_steps = 0
            self.pool_start = c.pool_start
            pool_len = len(plan.pool(self.pool_start)[0])
            if c.split_world == R:  # same world size: continue the same split exactly
                self.split_from, self.split_steps_before = c.split_from, c.split_steps
                self.sizes = final_sizes(pool_len - c.split_from, R, plan.batch_size)
            else:  # re-split what is left over the new world size
                old = final_sizes(pool_len - c.split_from, c.split_world, plan.batch_size)
                done = c.split_from + _consumed(old, c.split_steps * c.split_world, pool_len - c.split_from)
                self.split_from, self.split_steps_before = done, 0
                self.sizes = final_sizes(pool_len - done, R, plan.batch_size)

    @property
    def n_final_steps(self) -> int:
        return len(self.sizes) // self.world_size - self.split_steps_before

    def __len__(self) -> int:
        return self.n_rr_steps + self.n_final_steps

    def cursor_after(self, consumed: int) -> Cursor:
        """The global cursor once every rank has consumed ``consumed`` of its batches."""
        c, R = self.cursor, self.world_size
        if consumed >= len(self):
            return Cursor(epoch=c.epoch + 1)
        if consumed <= self.n_rr_steps and c.pool_start is None:
            return Cursor(epoch=c.epoch, rr_done=c.rr_done + consumed * R)
        return Cursor(
            epoch=c.epoch,
            rr_done=self.pool_start,
            pool_start=self.pool_start,
            split_from=self.split_from,
            split_world=R,
            split_steps=self.split_steps_before + consumed - self.n_rr_steps,
        )


def _consumed(sizes: np.ndarray, n_slots: int, n_cells: int) -> int:
    """Pool cells consumed by the first ``n_slots`` slots (a 0-size slot repeats, consuming none)."""
    return min(int(sizes[:n_slots].sum()), n_cells)


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
        for j, (i, b) in enumerate(zip(range(first, last), ids)):
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
        rng = _rng(self.plan.seed, self.plan.epoch, _TAG_WINDOW, lane, m)
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


# ------------------------------------------------------------------------------------------
# the dataset
# ------------------------------------------------------------------------------------------
def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass(frozen=True)
class LoaderOptions:
    """What a StreamLoader tells its stream (and the workers' copies of it) for one iteration."""

    rank_world: tuple[int, int] | None = None  # (rank, world) resolved in the main process; None = resolve here
    emit_encoded: bool = False  # yield EncodedCells (padded by the loader in the main process), not Batches


class CellStream(torch.utils.data.IterableDataset):
    """Yields tokenized ``Batch`` es of one split; see the module docstring for the plan."""

    def __init__(
        self,
        corpus_dir: str,
        split: str = "train",
        batch_size: int = 32,
        tokenizer: TokenizerConfig | dict | None = None,
        block_size: int = 256,
        buffer_blocks: int = 16,
        seed: int = 0,
        shuffle: bool | None = None,
        lanes: int = 8,
        bucket_batches: int = 8,
        rank: int | None = None,
        world_size: int | None = None,
        max_cells: int | None = None,
    ):
        super().__init__()
        if batch_size < 1 or lanes < 1 or buffer_blocks < 1:
            raise ValueError(
                f"batch_size, lanes and buffer_blocks must be >= 1 (got {batch_size}, {lanes}, {buffer_blocks})"
            )
        self.corpus_dir = str(corpus_dir)
        self.corpus = Corpus(corpus_dir)
        self.split = split
        self.batch_size = int(batch_size)
        self.tokenizer_config = TokenizerConfig.from_any(tokenizer)
        self.tokenizer = Tokenizer(self.tokenizer_config, self.corpus.vocab.pad_id, self.corpus.vocab.cls_id)
        self.block_size, self.buffer_blocks, self.seed = int(block_size), int(buffer_blocks), int(seed)
        self.shuffle = (split == "train") if shuffle is None else bool(shuffle)
        self.lanes, self.bucket_batches = int(lanes), int(bucket_batches)
        self.rank, self.world_size = rank, world_size
        self.table = build_block_table(self.corpus, split, self.block_size, max_cells)
        self.cursor = Cursor()  # where the next iteration starts
        self.loader_options = LoaderOptions()  # set by StreamLoader before each iteration
        self._warm_up()

    def _warm_up(self) -> None:
        """Load the compiled kernels (gather, tokenizer) for the store's dtypes now (from numba's cache;
        compiled on first use), so forked dataloader workers inherit them instead of each loading them."""
        if self.corpus.n_cells == 0:
            return
        with Corpus(self.corpus_dir) as corpus:  # a private handle: none stays open across a fork
            first_shard = int(np.searchsorted(corpus.shard_offsets, 0, side="right")) - 1  # holds cell 0
            window, _ = corpus.read_spans([(first_shard, 0, 1)])
        one = np.zeros(1, dtype=np.int64)
        self.tokenizer.pad(self.tokenizer.encode(window, np.random.default_rng(0), one))  # in-window path
        self.tokenizer(gather_parts([(window, one), (window, one)]), np.random.default_rng(0))  # gathered path

    # plan -----------------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        return self.table.n_cells

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(
            self.table,
            epoch if self.shuffle else 0,
            self.seed,
            self.shuffle,
            self.lanes,
            self.batch_size,
            self.buffer_blocks * self.block_size,
        )

    def rank_world(self) -> tuple[int, int]:
        if self.loader_options.rank_world is not None:  # pinned by StreamLoader in the main process
            return self.loader_options.rank_world
        rank, world = _dist_rank_world()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world_size {world}")
        return rank, world

    def schedule(self, cursor: Cursor | None = None) -> RankSchedule:
        cursor = self.cursor if cursor is None else cursor
        rank, world = self.rank_world()
        return RankSchedule(self.plan(cursor.epoch), cursor, rank, world)

    def __len__(self) -> int:
        """Batches this rank yields in a whole epoch (Lightning counts resumed batches from the epoch start)."""
        return len(self.schedule(Cursor(epoch=self.cursor.epoch)))

    # state ----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch``."""
        self.cursor = Cursor(epoch=int(epoch))

    def _signature(self) -> dict:
        return {
            "n_cells": self.n_cells,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "buffer_blocks": self.buffer_blocks,
            "lanes": self.lanes,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "split": self.split,
            "bucket_batches": self.bucket_batches,
        }

    def state_dict(self, cursor: Cursor | None = None) -> dict:
        return {"cursor": (self.cursor if cursor is None else cursor).to_dict(), "plan": self._signature()}

    def load_state_dict(self, state: dict) -> None:
        cursor = Cursor(**state["cursor"])
        mine = self._signature()
        changed = {k: (v, mine.get(k)) for k, v in state.get("plan", {}).items() if mine.get(k) != v}
        mid_epoch = cursor.rr_done > 0 or cursor.pool_start is not None
        if changed and mid_epoch:
            raise ValueError(
                f"cannot resume mid-epoch {cursor.epoch}: the stream layout changed {changed} (saved, now). "
                "Keep batch_size/block_size/buffer_blocks/lanes/seed as saved, "
                "or resume from an end-of-epoch checkpoint."
            )
        self.cursor = cursor

    # iteration ------------------------------------------------------------------------
    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        sched = self.schedule()
        reader = LaneReader(
            self.corpus, sched.plan, self.split, self.bucket_batches, self.tokenizer_config.max_seq_len - 1
        )
        for i in range(worker, len(sched), n_workers):
            parts, rng = self._batch_cells(sched, reader, i)
            # a batch inside one window (every round-robin batch) is encoded in place, others gathered first
            block, rows = parts[0] if len(parts) == 1 else (gather_parts(parts), None)
            encoded = self.tokenizer.encode(block, rng, rows)
            yield encoded if self.loader_options.emit_encoded else self.tokenizer.pad(encoded)
        reader.release()

    def _batch_cells(
        self, sched: RankSchedule, reader: LaneReader, i: int
    ) -> tuple[list[tuple[CellBlock, np.ndarray]], np.random.Generator]:
        """The cells of the rank's ``i``-th batch as ``(window, rows)`` parts, and the generator that tokenizes it."""
        plan, c = sched.plan, sched.cursor
        if i < sched.n_rr_steps:
            k = c.rr_done + i * sched.world_size + sched.rank
            lane, positions = plan.rr_positions(k)
            return reader.cells(lane, positions), _rng(plan.seed, plan.epoch, _TAG_BATCH, k)
        slot = (sched.split_steps_before + i - sched.n_rr_steps) * sched.world_size + sched.rank
        pool_lane, pool_pos = plan.pool(sched.pool_start)
        remaining = len(pool_lane) - sched.split_from
        size = int(sched.sizes[slot])
        lo = sched.split_from + int(sched.sizes[:slot].sum())
        idx = np.arange(lo, lo + size) if size else np.array([sched.split_from + slot % remaining])
        lanes, pos = pool_lane[idx], pool_pos[idx]
        parts = [part for lane in np.unique(lanes) for part in reader.cells(int(lane), pos[lanes == lane])]
        rng = _rng(plan.seed, plan.epoch, _TAG_FINAL, sched.pool_start, sched.split_from, sched.world_size, slot)
        return parts, rng


# ------------------------------------------------------------------------------------------
# the loader: a DataLoader whose state is the stream's cursor (Lightning saves it)
# ------------------------------------------------------------------------------------------
def pin_batch(batch: Batch) -> Batch:
    """The batch with every tensor in page-locked memory (fast, asynchronous copies to the GPU)."""
    pinned = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            v = v.pin_memory()
        elif isinstance(v, dict):
            v = {k: t.pin_memory() for k, t in v.items()}
        pinned[f.name] = v
    return Batch(**pinned)


class StreamLoader(torch.utils.data.DataLoader):
    """DataLoader over a ``CellStream`` with ``state_dict``/``load_state_dict``.

    Lightning's fit loop saves ``state_dict()`` of stateful train dataloaders in checkpoints
    and calls ``load_state_dict`` before the first ``iter()`` on resume. ``consumer_lookahead``
    is the number of batches the consumer fetches ahead of the step it trains on; the state
    counts consumed batches, not fetched ones. Lightning 2.6 does not prefetch from loaders
    with a length (ours has one), so it is 0 there. A new ``iter()`` continues where the
    previous iteration stopped: the next epoch once an epoch has been consumed.
    """

    def __init__(
        self,
        stream: CellStream,
        num_workers: int = 0,
        consumer_lookahead: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ):
        kwargs = {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor else {}
        # workers send compact EncodedCells (pickled, ~6 bytes a token) and this process pads them:
        # a third of the bytes of a padded batch and no shared-memory segment or fd per tensor
        super().__init__(
            stream, batch_size=None, num_workers=num_workers, pin_memory=False, persistent_workers=False, **kwargs
        )
        self.pin_batches = bool(pin_memory) and torch.cuda.is_available()
        self.consumer_lookahead = int(consumer_lookahead)
        self._sched: RankSchedule | None = None
        self._yielded = 0
        self._exhausted = False

    def __iter__(self):
        stream: CellStream = self.dataset
        if self._sched is not None:  # continue where the previous iteration stopped (next epoch if it ended)
            stream.cursor = self._sched.cursor_after(self.consumed())
        stream.loader_options = LoaderOptions()  # resolve rank/world afresh below
        # workers may not see torch.distributed: pin rank/world now; workers send compact EncodedCells
        stream.loader_options = LoaderOptions(rank_world=stream.rank_world(), emit_encoded=True)
        self._sched = stream.schedule()
        self._yielded, self._exhausted = 0, False
        try:
            for encoded in super().__iter__():
                batch = stream.tokenizer.pad(encoded)
                self._yielded += 1
                yield pin_batch(batch) if self.pin_batches else batch
        finally:
            stream.loader_options = LoaderOptions(rank_world=stream.loader_options.rank_world)
        self._exhausted = True

    def consumed(self) -> int:
        if self._sched is None:
            return 0
        return self._yielded if self._exhausted else max(self._yielded - self.consumer_lookahead, 0)

    def state_dict(self) -> dict:
        stream: CellStream = self.dataset
        if self._sched is None:
            return stream.state_dict()
        return stream.state_dict(self._sched.cursor_after(self.consumed()))

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self._sched = None
