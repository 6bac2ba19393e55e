"""The epoch plan and its cursor arithmetic: which cells each (rank, worker) batch holds, as a pure function
of corpus, split, seed, epoch and the stream's options (see ``data_modules.stream`` for the scheme)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from data_modules.store.reader import CellBlock, Corpus

SPLITS = ("train", "val")
TAG_WINDOW, TAG_BATCH, TAG_FINAL = 1, 2, 3  # seeded_rng keys of the three kinds of draws


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
            obs={"dataset": corpus.read_obs_codes(shard, "dataset")} if needs_dataset else {},
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
def seeded_rng(*key: int) -> np.random.Generator:
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
        self.block_order = (
            seeded_rng(self.seed, self.epoch).permutation(n_blocks) if self.shuffle else np.arange(n_blocks)
        )
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
                done = c.split_from + consumed_cells(old, c.split_steps * c.split_world, pool_len - c.split_from)
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


def consumed_cells(sizes: np.ndarray, n_slots: int, n_cells: int) -> int:
    """Pool cells consumed by the first ``n_slots`` slots (a 0-size slot repeats, consuming none)."""
    return min(int(sizes[:n_slots].sum()), n_cells)
