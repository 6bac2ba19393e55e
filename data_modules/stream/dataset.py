"""``CellStream``: the IterableDataset that yields one split's tokenized batches by the epoch plan."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.data

from data_modules.batch import Batch
from data_modules.store.reader import CellBlock, Corpus
from data_modules.stream.blocks import LaneReader, gather_parts
from data_modules.stream.plan import (
    TAG_BATCH,
    TAG_FINAL,
    Cursor,
    EpochPlan,
    RankSchedule,
    build_block_table,
    seeded_rng,
)
from data_modules.tokenize import Tokenizer, TokenizerConfig
from data_modules.tokenize.tokenizer import EncodedCells

BUDGET_SAMPLE_SHARDS = 32  # shards whose cell lengths estimate the mean tokens per cell for ``max_tokens``


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


def cells_for_token_budget(corpus: Corpus, max_tokens: int, max_seq_len: int) -> int:
    """Cells per batch whose expected tokens (``<cls>`` included, capped at ``max_seq_len``) fit ``max_tokens``.

    The mean capped length is taken over every cell of up to ``BUDGET_SAMPLE_SHARDS`` evenly spaced shards
    (their ``indptr`` only), so the result is a pure function of the corpus (a resumed run gets the same).
    """
    if max_tokens < max_seq_len:
        raise ValueError(f"max_tokens ({max_tokens}) must hold at least one whole cell (max_seq_len {max_seq_len})")
    if corpus.n_shards == 0:
        return 1
    shards = np.unique(np.linspace(0, corpus.n_shards - 1, min(corpus.n_shards, BUDGET_SAMPLE_SHARDS)).astype(int))
    lengths = np.concatenate([corpus.cell_lengths(int(s)) for s in shards])  # each sampled shard's indptr only
    mean = float(np.minimum(lengths + 1, max_seq_len).mean()) if len(lengths) else float(max_seq_len)
    return max(1, int(max_tokens // mean))


class CellStream(torch.utils.data.IterableDataset):
    """Yields tokenized ``Batch`` es of one split; see the module docstring for the plan.

    ``packing``: yield the packed layout (one (1, T) token stream with ``cu_seqlens``; ``Tokenizer.pack``)
    instead of padded (B, L) rows. Which cells form each batch, and so exactly-once coverage and resume,
    does not depend on it.
    ``max_tokens``: a token budget per batch instead of a fixed cell count: ``batch_size`` becomes the number
    of cells whose expected tokens fit the budget (``cells_for_token_budget``; the mean capped length of the
    corpus). The epoch plan keeps a fixed cell count per batch (exactly-once over DDP ranks needs the same
    number of steps on every rank), so a single batch may hold more or fewer tokens than the budget.
    """

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
        packing: bool = False,
        max_tokens: int | None = None,
    ):
        super().__init__()
        if batch_size < 1 or lanes < 1 or buffer_blocks < 1:
            raise ValueError(
                f"batch_size, lanes and buffer_blocks must be >= 1 (got {batch_size}, {lanes}, {buffer_blocks})"
            )
        self.corpus_dir = str(corpus_dir)
        self.corpus = Corpus(corpus_dir)
        self.split = split
        self.tokenizer_config = TokenizerConfig.from_any(tokenizer)
        self.packing = bool(packing)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        if self.max_tokens is not None:
            batch_size = cells_for_token_budget(self.corpus, self.max_tokens, self.tokenizer_config.layout.max_seq_len)
        self.batch_size = int(batch_size)
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
        self.to_batch(self.tokenizer.encode(window, np.random.default_rng(0), one))  # in-window path
        self.to_batch(  # gathered path
            self.tokenizer.encode(gather_parts([(window, one), (window, one)]), np.random.default_rng(0))
        )

    def to_batch(self, encoded: EncodedCells) -> Batch:
        """The ``Batch`` of encoded cells in this stream's layout: packed or padded."""
        return self.tokenizer.pack(encoded) if self.packing else self.tokenizer.pad(encoded)

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
        yield from self.worker_batches(worker, n_workers)

    def worker_batches(self, worker: int, n_workers: int):
        """The batches dataloader worker ``worker`` of ``n_workers`` yields from the cursor (what ``__iter__``
        runs in each worker; ``scripts/bench_loader.py --simulate-cells`` calls it for one worker at a time)."""
        sched = self.schedule()
        reader = self.lane_reader(sched)
        for i in range(worker, len(sched), n_workers):
            encoded = self.encode_batch(sched, reader, i)
            yield encoded if self.loader_options.emit_encoded else self.to_batch(encoded)
        reader.release()

    def lane_reader(self, sched: RankSchedule) -> LaneReader:
        return LaneReader(
            self.corpus, sched.plan, self.split, self.bucket_batches, self.tokenizer_config.layout.max_genes
        )

    def encode_batch(self, sched: RankSchedule, reader: LaneReader, i: int) -> EncodedCells:
        """The rank's ``i``-th batch of ``sched``, tokenized (a pure function of the plan and ``i``)."""
        parts, rng = self._batch_cells(sched, reader, i)
        # a batch inside one window (every round-robin batch) is encoded in place, others gathered first
        block, rows = parts[0] if len(parts) == 1 else (gather_parts(parts), None)
        return self.tokenizer.encode(block, rng, rows)

    def _batch_cells(
        self, sched: RankSchedule, reader: LaneReader, i: int
    ) -> tuple[list[tuple[CellBlock, np.ndarray]], np.random.Generator]:
        """The cells of the rank's ``i``-th batch as ``(window, rows)`` parts, and the generator that tokenizes it."""
        plan, c = sched.plan, sched.cursor
        if i < sched.n_rr_steps:
            k = c.rr_done + i * sched.world_size + sched.rank
            lane, positions = plan.rr_positions(k)
            return reader.cells(lane, positions), seeded_rng(plan.seed, plan.epoch, TAG_BATCH, k)
        slot = (sched.split_steps_before + i - sched.n_rr_steps) * sched.world_size + sched.rank
        pool_lane, pool_pos = plan.pool(sched.pool_start)
        remaining = len(pool_lane) - sched.split_from
        size = int(sched.sizes[slot])
        lo = sched.split_from + int(sched.sizes[:slot].sum())
        idx = np.arange(lo, lo + size) if size else np.array([sched.split_from + slot % remaining])
        lanes, pos = pool_lane[idx], pool_pos[idx]
        parts = [part for lane in np.unique(lanes) for part in reader.cells(int(lane), pos[lanes == lane])]
        rng = seeded_rng(plan.seed, plan.epoch, TAG_FINAL, sched.pool_start, sched.split_from, sched.world_size, slot)
        return parts, rng
