"""The stream at the paper's scale, simulated (``scripts/bench_loader.py --simulate-cells``).

For ``ranks x workers`` loader processes over one corpus: what a rank pays before its first batch (corpus,
block table and split, kernels), what each worker pays (epoch plan, rank schedule, its lane reader, the first
window read and tokenized), the memory the plan holds, the size of the resume state a checkpoint stores, the
time to resume at a random position, and the private memory of real forked workers. Every process is measured
in turn in this one (a rank's work does not depend on the others'), so the machine needs no R x W cores.
"""

from __future__ import annotations

import gc
import os
import pickle
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_modules.store.probe import rss_mb
from data_modules.store.reader import Corpus
from data_modules.store.split import split_membership
from data_modules.stream.dataset import CellStream, LoaderOptions
from data_modules.stream.loader import StreamLoader
from data_modules.stream.plan import Cursor, build_block_table

MB = 1 << 20


def timed(fn: Callable):
    """(fn(), wall seconds); the CPU seconds of this process during the call go to ``timed.cpu``."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    timed.cpu = time.process_time() - c
    return out, time.perf_counter() - t


def traced(fn: Callable) -> tuple[object, int, int]:
    """(fn(), peak bytes, bytes still held) of what fn allocates (numpy's arrays included), under tracemalloc."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    try:
        out = fn()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak - base, current - base


def stream_for(corpus_dir: str, rank: int, ranks: int, opts: dict) -> CellStream:
    stream = CellStream(corpus_dir, "train", rank=rank, world_size=ranks, **opts)
    stream.loader_options = LoaderOptions(rank_world=(rank, ranks), emit_encoded=True)
    return stream


def measure_rank(corpus_dir: str, rank: int, ranks: int, workers: int, opts: dict, seed: int = 0) -> dict:
    """Start-up of one rank and of each of its ``workers``, plan memory, resume state and resume time."""
    corpus = Corpus(corpus_dir)
    (_, t_table) = timed(lambda: build_block_table(corpus, "train", opts["block_size"]))
    cpu_table = timed.cpu
    stream, t_stream = timed(lambda: stream_for(corpus_dir, rank, ranks, opts))
    cpu_stream = timed.cpu
    table_bytes = sum(a.nbytes for a in (stream.table.shard, stream.table.start, stream.table.stop))
    table_bytes += stream.table.n_selected.nbytes
    workers_out = []
    for w in range(workers):
        stream.cursor = Cursor(epoch=0)
        sched, t_sched = timed(stream.schedule)
        cpu_sched = timed.cpu
        first, t_first = timed(lambda w=w: next(stream.worker_batches(w, workers)))
        cells = len(first.cell_index)
        workers_out.append(
            {
                "schedule_s": t_sched,
                "first_batch_s": t_first,
                "startup_cpu_s": cpu_sched + timed.cpu,
                "first_batch_cells": cells,
            }
        )
    stream.cursor = Cursor(epoch=0)
    sched, plan_peak, plan_held = traced(stream.schedule)
    n_steps = len(sched)
    # resume at a random position of the epoch (round-robin part), in a fresh stream, as a restarted job does
    rng = np.random.default_rng(seed + rank)
    consumed = int(rng.integers(1, max(sched.n_rr_steps, 2)))
    state = stream.state_dict(sched.cursor_after(consumed))
    state_bytes = len(pickle.dumps(state))
    fresh = stream_for(corpus_dir, rank, ranks, opts)
    fresh.load_state_dict(pickle.loads(pickle.dumps(state)))
    first, t_resume = timed(lambda: next(fresh.worker_batches(0, workers)))
    cpu_resume = timed.cpu
    stream.cursor = Cursor(epoch=0)
    whole = stream.schedule()  # the uninterrupted epoch: its batch `consumed` is the resumed run's first
    expected = stream.encode_batch(whole, stream.lane_reader(whole), consumed)
    fields = ("cell_index", "genes", "bins", "flags")
    exact = all(np.array_equal(getattr(first, f), getattr(expected, f)) for f in fields)
    return {
        "rank": rank,
        "block_table_s": t_table,
        "block_table_cpu_s": cpu_table,
        "rank_startup_s": t_stream,
        "rank_startup_cpu_s": cpu_stream,
        "worker_startup_max_cpu_s": max(w["startup_cpu_s"] for w in workers_out),
        "workers": workers_out,
        "worker_startup_max_s": max(w["schedule_s"] + w["first_batch_s"] for w in workers_out),
        "schedule_max_s": max(w["schedule_s"] for w in workers_out),
        "block_table_mb": table_bytes / MB,
        "plan_peak_mb": plan_peak / MB,
        "plan_held_mb": plan_held / MB,
        "plan_mb": (table_bytes + plan_held) / MB,
        "steps_per_epoch": n_steps,
        "resume_state_bytes": state_bytes,
        "resume_position": consumed,
        "resume_first_batch_s": t_resume,
        "resume_first_batch_cpu_s": cpu_resume,
        "resume_exact": exact,
    }


def measure_forked_workers(corpus_dir: str, ranks: int, workers: int, opts: dict, batches: int) -> dict:
    """Rank 0 of ``ranks`` with a real StreamLoader of ``workers`` forked workers: after ``batches`` batches, the
    memory of the main process and each worker (private = what the worker does not share with its parent)."""
    stream = CellStream(corpus_dir, "train", rank=0, world_size=ranks, **opts)
    loader = StreamLoader(stream, num_workers=workers)
    it = iter(loader)
    for _ in range(batches):
        next(it)
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    worker_mem = [rss_mb(pid) for pid in children]
    main = rss_mb()
    del it
    return {
        "main": main,
        "workers": worker_mem,
        "worker_private_max_mb": max((w["private"] for w in worker_mem), default=0.0),
        "worker_rss_max_mb": max((w["rss"] for w in worker_mem), default=0.0),
    }


def stream_end_to_end(corpus_dir: str, cells: int, workers: int, opts: dict) -> dict:
    """A whole epoch (or ``cells`` cells) of one rank through a StreamLoader: cells/s and, for a whole epoch,
    whether every training cell came exactly once."""
    stream = CellStream(corpus_dir, "train", rank=0, world_size=1, **opts)
    loader = StreamLoader(stream, num_workers=workers, prefetch_factor=4 if workers else None)
    seen = np.zeros(stream.corpus.n_cells, dtype=np.uint8)
    t, done, n_batches = time.perf_counter(), 0, 0
    for batch in loader:
        ids = batch.cell_index.numpy()
        np.add.at(seen, ids, 1)
        done += len(ids)
        n_batches += 1
        if done >= cells:
            break
    dt = time.perf_counter() - t
    out = {"cells": done, "batches": n_batches, "seconds": dt, "cells_per_s": done / dt}
    if done >= stream.n_cells:  # a whole epoch: every training cell exactly once, no validation cell
        corpus = stream.corpus
        in_val = split_membership(corpus.split, np.arange(corpus.n_cells), None)
        out["exactly_once"] = bool(np.all(seen[~in_val] == 1) and not seen[in_val].any())
    return out
