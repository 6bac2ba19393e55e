"""Benchmark the pretraining data pipeline against the usual anndata-backed loader.

    python scripts/bench_loader.py [--cells 200000] [--json PATH] [--cache .cache/bench_loader] [--checksums both]

Builds (once; reused from the cache dir) a synthetic corpus of ``--cells`` cells with ~2,000
non-zeros per cell: ``--datasets`` raw-count h5ad files converted by the real converter. Before
every cold measurement the page cache of the files read is dropped (posix_fadvise DONTNEED).
Measures (a) raw block-shuffled reads, (b) tokenized batches (binning + sampling to 1,200 +
generative split + tensors) with 0 and 2 dataloader workers, (c) the baseline: the same h5ad
files opened with anndata backed mode, random rows through a torch DataLoader, and the
shuffle quality of the stream. ``--checksums both`` (default) also measures the cost of the per-block
checksums checked on every read: the same corpus rewritten without them (``corpus_nochecksums``, made once),
tokenized with 2 workers (wall clock) and with 0 workers (cells per CPU-second of the one process, which a busy
machine disturbs less), alternating on / off ``--checksum-repeats`` times in the same run (best of each).
``on`` / ``off`` measure one layout only. Prints a table; ``--json`` writes the numbers.

    python scripts/bench_loader.py --simulate-cells 33000000 [--ranks 16 --workers 8] [--base-cells 2000000]

The loader at the paper's scale, simulated (docs/data_pipeline.md, "At 33M cells"): ``--base-cells`` tiny cells
(4-12 genes each) written in the corpus format by the real writer, and a corpus of ``--simulate-cells`` cells whose
shards are hard links to those, repeated (real files, real reads; the cells' contents repeat). Measures, for rank 0,
the middle rank and the last rank of ``--ranks`` with ``--workers`` workers each and the pretrain_33m stream layout
(batch 32, blocks of 512, 64 blocks a window, lanes = ranks x workers): start-up (corpus, block table and split,
kernels; each worker's plan, schedule and first batch), plan memory (tracemalloc), the resume state a checkpoint
stores and the time to resume at a random position (checked against the uninterrupted batch), the memory of real
forked workers, and ``--stream-cells`` cells streamed end to end (a whole epoch of the base corpus by default,
checked exactly once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.utils.data  # noqa: E402

from data_modules.store.checksums import set_checksums  # noqa: E402
from data_modules.store.convert import Source, convert_sources  # noqa: E402
from data_modules.store.probe import open_every_shard_fresh  # noqa: E402
from data_modules.store.reader import MAX_OPEN_SHARDS, Corpus  # noqa: E402
from data_modules.store.synthetic import make_synthetic_h5ad, simulate_corpus, write_tiny_corpus  # noqa: E402
from data_modules.stream import CellStream, Cursor, LaneReader, StreamLoader  # noqa: E402
from data_modules.stream.scale import measure_forked_workers, measure_rank, stream_end_to_end  # noqa: E402
from data_modules.tokenize import pad_fraction  # noqa: E402


def drop_page_cache(paths: list[Path]) -> None:
    """Evict the files from the OS page cache so the next read is cold."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def build(cache: Path, n_cells: int, n_datasets: int, nnz: int, n_genes: int) -> tuple[Path, list[Path]]:
    """Synthetic h5ad parts and the corpus converted from them (reused when present)."""
    tag = f"c{n_cells}_d{n_datasets}_nnz{nnz}_g{n_genes}_ck"  # _ck: shards with per-block checksums
    root = cache / tag
    root.mkdir(parents=True, exist_ok=True)
    per = [n_cells // n_datasets + (i < n_cells % n_datasets) for i in range(n_datasets)]
    parts = [root / f"part{i}.h5ad" for i in range(n_datasets)]
    for i, (path, n) in enumerate(zip(parts, per, strict=True)):
        if not path.exists():
            print(f"writing {path} ({n:,} cells)", file=sys.stderr, flush=True)
            make_synthetic_h5ad(path, n_cells=n, nnz_per_cell=nnz, n_genes=n_genes, seed=i)
    corpus = root / "corpus"
    if not (corpus / "manifest.json").exists():
        print(f"converting into {corpus}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        convert_sources(
            [Source(f"ds{i}", str(p)) for i, p in enumerate(parts)],
            corpus,
            shard_size=16384,
            split={"strategy": "cell", "seed": 0, "val_fraction": 0.01},
        )
        print(f"converted in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    return corpus, parts


def without_checksums(corpus: Path) -> Path:
    """A copy of ``corpus`` with its shards rewritten without per-block checksums (made once, reused)."""
    off = corpus.with_name("corpus_nochecksums")
    if not (off / "manifest.json").exists():
        print(f"writing {off} (no checksums)", file=sys.stderr, flush=True)
        shutil.rmtree(off, ignore_errors=True)
        shutil.copytree(corpus, off)
        set_checksums(off, on=False)
    return off


def shard_files(corpus: Path) -> list[Path]:
    c = Corpus(corpus)
    return [c.shard_path(i) for i in range(c.n_shards)]


def bench_raw(corpus: Path, n_cells: int, block_size: int, buffer_blocks: int) -> float:
    """Cells/s of block-shuffled reads (read + split filter + window shuffle), one process."""
    drop_page_cache(shard_files(corpus))
    stream = CellStream(str(corpus), "train", 256, block_size=block_size, buffer_blocks=buffer_blocks, lanes=1)
    plan = stream.plan(0)
    reader = LaneReader(stream.corpus, plan, "train", stream.bucket_batches, 1200)
    t, done, m = time.perf_counter(), 0, 0
    while done < n_cells and m < len(plan.windows[0]) - 1:
        done += len(reader.window(0, m)[2])
        m += 1
    return done / (time.perf_counter() - t)


def bench_tokenized(
    corpus: Path, n_cells: int, workers: int, batch_size: int, block_size: int, buffer_blocks: int
) -> dict:
    """Cells/s of tokenized Batches out of a DataLoader (startup included), plus shuffle stats."""
    drop_page_cache(shard_files(corpus))
    stream = CellStream(
        str(corpus),
        "train",
        batch_size,
        tokenizer=None,  # the default TokenLayout: the paper's 1,200 genes + <cls>
        block_size=block_size,
        buffer_blocks=buffer_blocks,
        lanes=8,
    )
    stream.cursor = Cursor(epoch=0)
    loader = StreamLoader(stream, num_workers=workers, prefetch_factor=4 if workers else None)
    corpus_ = Corpus(corpus)
    t, cpu, done, blocks, datasets, pads = time.perf_counter(), time.process_time(), 0, [], [], []
    for batch in loader:
        done += batch.n_cells
        ids = batch.cell_index.numpy()
        shard = np.searchsorted(corpus_.shard_offsets, ids, side="right") - 1
        blocks.append(len(np.unique(shard * 10**9 + (ids - corpus_.shard_offsets[shard]) // block_size)))
        datasets.append(len(np.unique(batch.obs["dataset"].numpy())))
        pads.append(pad_fraction(batch))
        if done >= n_cells:
            break
    dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
    return {
        "cells_per_s": done / dt,
        "cells_per_cpu_s": done / dcpu,  # this process only: the whole pipeline with 0 workers
        "blocks_per_batch": float(np.mean(blocks)),
        "datasets_per_batch": float(np.mean(datasets)),
        "pad_fraction": float(np.mean(pads)),
        "batch_size": batch_size,
    }


class BackedRows(torch.utils.data.Dataset):
    """The usual loader: random rows of backed h5ad files, one row read per item."""

    def __init__(self, parts: list[Path]):
        self.parts = [str(p) for p in parts]
        self._adatas = None
        n = [ad.read_h5ad(p, backed="r").n_obs for p in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(n)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        if self._adatas is None:  # open per worker
            self._adatas = [ad.read_h5ad(p, backed="r") for p in self.parts]
        part = int(np.searchsorted(self.offsets, i, side="right") - 1)
        row = self._adatas[part].X[i - int(self.offsets[part])]  # (1, G) csr
        return torch.from_numpy(row.indices.astype(np.int64)), torch.from_numpy(row.data)


def bench_baseline(parts: list[Path], n_cells: int, workers: int, batch_size: int) -> float:
    drop_page_cache(parts)
    loader = torch.utils.data.DataLoader(
        BackedRows(parts), batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=lambda items: items
    )
    t, done = time.perf_counter(), 0
    for items in loader:
        done += len(items)
        if done >= n_cells:
            break
    return done / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=200_000, help="corpus size (>= 200,000 for the issue's bar)")
    ap.add_argument("--datasets", type=int, default=4)
    ap.add_argument("--nnz", type=int, default=2000)
    ap.add_argument("--genes", type=int, default=20000)
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "bench_loader"))
    ap.add_argument("--measure-cells", type=int, default=60_000, help="cells read per stream measurement")
    ap.add_argument("--baseline-cells", type=int, default=3_000, help="cells read by the slow baseline")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--buffer-blocks", type=int, default=8)
    ap.add_argument(
        "--checksums",
        choices=["both", "on", "off"],
        default="both",
        help="read shards with per-block checksums (on), without (off), or measure both in this run (default)",
    )
    ap.add_argument("--checksum-repeats", type=int, default=2, help="on/off alternations for --checksums both")
    ap.add_argument("--json", default=None)
    sim = ap.add_argument_group("the loader at scale, simulated (--simulate-cells)")
    sim.add_argument("--simulate-cells", type=int, default=None, help="simulated corpus size, e.g. 33000000")
    sim.add_argument("--ranks", type=int, default=16, help="simulated world size")
    sim.add_argument("--workers", type=int, default=8, help="simulated dataloader workers per rank")
    sim.add_argument("--base-cells", type=int, default=2_000_000, help="distinct tiny cells written for real")
    sim.add_argument("--stream-cells", type=int, default=None, help="cells streamed end to end (default: base)")
    sim.add_argument("--stream-workers", type=int, default=2, help="real workers for the end-to-end stream")
    sim.add_argument("--forked-batches", type=int, default=3, help="batches read before measuring forked workers")
    args = ap.parse_args(argv)
    for name in ("simulate_cells", "ranks", "workers", "base_cells", "stream_cells"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} {value}: must be a whole number >= 1")
    if args.simulate_cells is not None:
        return simulate(args)
    corpus, parts = build(Path(args.cache), args.cells, args.datasets, args.nnz, args.genes)
    if args.checksums != "on":
        plain = without_checksums(corpus)
        if args.checksums == "off":
            corpus = plain
    load_before = os.getloadavg()[0]  # the machine may be shared: report how busy it was
    n = min(args.measure_cells, args.cells)
    layout = dict(block_size=args.block_size, buffer_blocks=args.buffer_blocks)
    raw = bench_raw(corpus, n, **layout)
    tok0 = bench_tokenized(corpus, n, 0, args.batch_size, **layout)
    tok2 = bench_tokenized(corpus, n, 2, args.batch_size, **layout)
    base = bench_baseline(parts, args.baseline_cells, 2, args.batch_size)
    cost = None
    if args.checksums == "both":  # alternate on / off; 2 workers (wall clock) and 0 workers (CPU time, robust to load)
        runs = {"on": [], "off": [], "on_cpu": [], "off_cpu": []}
        for _ in range(args.checksum_repeats):
            for key, root in (("on", corpus), ("off", plain)):
                runs[key].append(bench_tokenized(root, n, 2, args.batch_size, **layout)["cells_per_s"])
                runs[f"{key}_cpu"].append(bench_tokenized(root, n, 0, args.batch_size, **layout)["cells_per_cpu_s"])
        best = {k: max(v) for k, v in runs.items()}
        cost = {
            **best,
            "cost_pct": 100 * (1 - best["on"] / best["off"]),
            "cost_cpu_pct": 100 * (1 - best["on_cpu"] / best["off_cpu"]),
            "runs": runs,
        }
    load_after = os.getloadavg()[0]
    result = {
        "n_cells": Corpus(corpus).n_cells,
        "nnz_per_cell": args.nnz,
        "cpu_count": os.cpu_count(),
        "raw_cells_per_s": raw,
        "tokenized_cells_per_s": tok2["cells_per_s"],
        "tokenized_cells_per_s_0_workers": tok0["cells_per_s"],
        "tokenized_cells_per_s_2_workers": tok2["cells_per_s"],
        "baseline_cells_per_s": base,
        "ratio_raw_vs_baseline": raw / base,
        "ratio_tokenized_vs_baseline": tok2["cells_per_s"] / base,
        "blocks_per_batch": tok2["blocks_per_batch"],
        "datasets_per_batch": tok2["datasets_per_batch"],
        "n_datasets": args.datasets,
        "pad_fraction": tok2["pad_fraction"],
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "buffer_blocks": args.buffer_blocks,
        "load_avg_1min_before": load_before,
        "load_avg_1min_after": load_after,
        "checksums": args.checksums,
    }
    if cost is not None:
        result.update(
            tokenized_cells_per_s_checksums_on=cost["on"],
            tokenized_cells_per_s_checksums_off=cost["off"],
            checksum_cost_pct=cost["cost_pct"],
            tokenized_cells_per_cpu_s_0_workers_checksums_on=cost["on_cpu"],
            tokenized_cells_per_cpu_s_0_workers_checksums_off=cost["off_cpu"],
            checksum_cost_cpu_pct=cost["cost_cpu_pct"],
            checksum_runs=cost["runs"],
        )
    rows = [
        ("(a) raw block-shuffled reads, 1 process", f"{raw:,.0f} cells/s"),
        ("(b) tokenized, 0 workers", f"{tok0['cells_per_s']:,.0f} cells/s"),
        ("(b) tokenized, 2 workers", f"{tok2['cells_per_s']:,.0f} cells/s"),
        ("(c) anndata backed, random rows, 2 workers", f"{base:,.0f} cells/s"),
        ("raw / baseline", f"{raw / base:,.1f}x"),
        ("tokenized (2 workers) / baseline", f"{tok2['cells_per_s'] / base:,.1f}x"),
        (f"distinct blocks per batch of {args.batch_size}", f"{tok2['blocks_per_batch']:.1f}"),
        (f"distinct datasets per batch (of {args.datasets})", f"{tok2['datasets_per_batch']:.2f}"),
        ("padding fraction of tokens", f"{tok2['pad_fraction']:.4f}"),
    ]
    if cost is not None:
        rows += [
            ("tokenized, 2 workers, checksums on (best)", f"{cost['on']:,.0f} cells/s"),
            ("tokenized, 2 workers, checksums off (best)", f"{cost['off']:,.0f} cells/s"),
            ("cost of the checksums, 2 workers (wall clock)", f"{cost['cost_pct']:.1f}%"),
            ("tokenized, 0 workers, checksums on (best)", f"{cost['on_cpu']:,.0f} cells per CPU-second"),
            ("tokenized, 0 workers, checksums off (best)", f"{cost['off_cpu']:,.0f} cells per CPU-second"),
            ("cost of the checksums, 0 workers (CPU time)", f"{cost['cost_cpu_pct']:.1f}%"),
        ]
    header = (
        f"corpus: {result['n_cells']:,} cells x ~{args.nnz:,} nnz, {os.cpu_count()} CPU cores, cold page cache, "
        f"1-min load average {load_before:.2f} before / {load_after:.2f} after"
    )
    return report(header, rows, result, args.json)


def report(header: str, rows: list[tuple[str, str]], result: dict, json_path: str | None) -> dict:
    """Print the header line and the (measurement, value) table; write ``result`` to ``json_path`` when given."""
    width = max(len(r[0]) for r in rows)
    print(header)
    print(f"{'measurement':<{width}} | value\n{'-' * width}-|-{'-' * 16}")
    for name, value in rows:
        print(f"{name:<{width}} | {value}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def _wall_cpu(row: dict, key: str) -> str:
    return f"{row[key + '_s']:.2f} s ({row[key + '_cpu_s']:.2f} s CPU)"


def simulate(args: argparse.Namespace) -> dict:
    """--simulate-cells: the stream of ``--ranks`` x ``--workers`` processes over a simulated corpus."""
    cache = Path(args.cache)
    base_cells = min(args.base_cells, args.simulate_cells)
    t = time.perf_counter()
    base = write_tiny_corpus(cache / f"tiny_{base_cells}", base_cells)
    t_base = time.perf_counter() - t
    t = time.perf_counter()
    corpus = simulate_corpus(cache / f"sim_{args.simulate_cells}_from_{base_cells}", base, args.simulate_cells)
    t_sim = time.perf_counter() - t
    c = Corpus(corpus)
    opts = dict(batch_size=32, block_size=512, buffer_blocks=64, lanes=args.ranks * args.workers, seed=0)
    load_before = os.getloadavg()[0]
    ranks = sorted({0, args.ranks // 2, args.ranks - 1})
    per_rank = [measure_rank(str(corpus), r, args.ranks, args.workers, opts) for r in ranks]
    forked = measure_forked_workers(str(corpus), args.ranks, args.workers, opts, args.forked_batches)
    # open shard handles: the cost of one on distinct files (the base's shards), and how many a reader that visits
    # every shard of the simulated corpus keeps, bounded (the default) and unbounded (the code before the bound)
    handles = {
        "distinct_unbounded": open_every_shard_fresh(str(base), 1 << 30),
        "simulated_bounded": open_every_shard_fresh(str(corpus), MAX_OPEN_SHARDS),
        "simulated_unbounded": open_every_shard_fresh(str(corpus), 1 << 30),
    }
    per_shard_mb = handles["distinct_unbounded"]["rss_growth_mb"] / handles["distinct_unbounded"]["shards"]
    e2e = stream_end_to_end(str(base), args.stream_cells or base_cells, args.stream_workers, opts)
    load_after = os.getloadavg()[0]
    worst = {k: max(r[k] for r in per_rank) for k in per_rank[0] if isinstance(per_rank[0][k], float | int)}
    result = {
        "simulated_cells": c.n_cells,
        "shards": c.n_shards,
        "base_cells": base_cells,
        "base_write_s": t_base,
        "simulate_s": t_sim,
        "ranks": args.ranks,
        "workers": args.workers,
        "stream_options": opts,
        "per_rank": per_rank,
        "forked_workers": forked,
        "open_shards": handles,
        "mb_per_open_shard": per_shard_mb,
        "end_to_end": e2e,
        "resume_exact": all(r["resume_exact"] for r in per_rank),
        "load_avg_1min_before": load_before,
        "load_avg_1min_after": load_after,
    }
    rows = [
        ("corpus", f"{c.n_cells:,} cells in {c.n_shards:,} shards (links to {base_cells:,} written cells)"),
        ("rank start-up: corpus, block table + split, kernels (max)", _wall_cpu(worst, "rank_startup")),
        ("  of which the block table + split", _wall_cpu(worst, "block_table")),
        ("worker start-up: plan + schedule + first batch (max)", _wall_cpu(worst, "worker_startup_max")),
        ("  of which the epoch plan + rank schedule", f"{worst['schedule_max_s']:.3f} s"),
        ("plan memory per worker: block table + plan + schedule", f"{worst['plan_mb']:.1f} MB"),
        ("  peak while building the plan + schedule", f"{worst['plan_peak_mb']:.1f} MB"),
        ("resume state in a checkpoint (pickled)", f"{worst['resume_state_bytes']:,} bytes"),
        ("resume at a random position: first batch", _wall_cpu(worst, "resume_first_batch")),
        ("resumed batch equals the uninterrupted one", str(result["resume_exact"])),
        (f"forked worker, private memory (max of {args.workers})", f"{forked['worker_private_max_mb']:.0f} MB"),
        (f"forked worker, RSS incl. shared (max of {args.workers})", f"{forked['worker_rss_max_mb']:.0f} MB"),
        ("memory per open shard file (distinct files)", f"{per_shard_mb:.2f} MB"),
        (
            f"shards open after reading all {c.n_shards:,}: bounded / unbounded",
            f"{handles['simulated_bounded']['open_shards']:,} / {handles['simulated_unbounded']['open_shards']:,}"
            f" (~{handles['simulated_bounded']['open_shards'] * per_shard_mb:.0f} MB / "
            f"~{handles['simulated_unbounded']['open_shards'] * per_shard_mb:.0f} MB)",
        ),
        (
            f"end to end: {e2e['cells']:,} cells, {args.stream_workers} workers",
            f"{e2e['cells_per_s']:,.0f} cells/s"
            + (f", exactly once: {e2e['exactly_once']}" if "exactly_once" in e2e else ""),
        ),
    ]
    header = (
        f"simulated {args.ranks} ranks x {args.workers} workers; ranks measured: {ranks}; {os.cpu_count()} CPU cores, "
        f"1-min load average {load_before:.2f} before / {load_after:.2f} after"
    )
    return report(header, rows, result, args.json)


if __name__ == "__main__":
    main()
