"""Corpus store benchmark: shard layouts (contiguous / chunked / gzip / lzf) and h5ad conversion.

    python scripts/bench_store.py                      # 1M-cell synthetic h5ad, ~2,000 genes per cell
    python scripts/bench_store.py --cells 200000 --json bench_store.json
    python scripts/bench_store.py --skip-convert       # layouts only

Conversion runs in a child process so its peak RSS is measured alone; it is also run on a
quarter of the cells to show that peak RSS does not grow with the input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_modules.store.synthetic import make_synthetic_h5ad, synthetic_counts  # noqa: E402

LAYOUTS = {
    "contiguous": {},
    "chunked": {"chunks": (1 << 18,)},
    "gzip-4": {"chunks": (1 << 18,), "compression": "gzip", "compression_opts": 4},
    "lzf": {"chunks": (1 << 18,), "compression": "lzf"},
}


def bench_layouts(
    workdir: Path, n_cells: int, nnz_per_cell: int, n_genes: int, block_cells: int, n_reads: int
) -> list[dict]:
    """Write one shard per layout; time random contiguous block reads (as the loader does)."""
    rng = np.random.default_rng(0)
    gene_mean = rng.lognormal(-0.5, 1.0, n_genes)
    parts = [
        synthetic_counts(rng, min(2048, n_cells - lo), n_genes, nnz_per_cell, gene_mean)
        for lo in range(0, n_cells, 2048)
    ]  # in pieces: the dense (cells, genes) mask stays small
    lengths = np.concatenate([np.diff(p[0]) for p in parts])
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate([p[1] for p in parts]).astype(np.uint16)
    counts = np.concatenate([p[2] for p in parts]).astype(np.uint16)
    starts = rng.integers(0, n_cells - block_cells, n_reads)
    rows = []
    for name, kw in LAYOUTS.items():
        path = workdir / f"layout-{name}.h5"
        t0 = time.perf_counter()
        with h5py.File(path, "w") as f:
            f.create_dataset("indptr", data=indptr)
            f.create_dataset("indices", data=ids, **kw)
            f.create_dataset("data", data=counts, **kw)
        write_s = time.perf_counter() - t0
        with h5py.File(path, "r") as f:  # warm the page cache once: we measure decode cost, not the disk
            f["indices"][:]
            f["data"][:]
        t0 = time.perf_counter()
        with h5py.File(path, "r") as f:
            for s in starts:
                ptr = f["indptr"][s : s + block_cells + 1]
                f["indices"][ptr[0] : ptr[-1]]
                f["data"][ptr[0] : ptr[-1]]
        read_s = time.perf_counter() - t0
        rows.append(
            {
                "layout": name,
                "bytes": path.stat().st_size,
                "write_s": write_s,
                "block_cells": block_cells,
                "blocks_per_s": n_reads / read_s,
                "cells_per_s": n_reads * block_cells / read_s,
            }
        )
        path.unlink()
    return rows


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from data_modules.store.convert import Source, convert_sources
t0 = time.perf_counter()
m = convert_sources([Source("synthetic", sys.argv[2])], sys.argv[3], obs_columns=["cell_type", "tissue", "assay"],
                    shard_size=int(sys.argv[4]), chunk_size=int(sys.argv[5]))
dt = time.perf_counter() - t0
# VmHWM is this process's own peak (ru_maxrss would carry the parent's peak across exec)
hwm_kib = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
print(json.dumps({"seconds": dt, "n_cells": m["n_cells"], "nnz": m["nnz"], "peak_rss_mib": hwm_kib / 1024}))
"""


def convert_in_child(h5ad: Path, out: Path, shard_size: int, chunk_size: int) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    res = subprocess.run(
        [sys.executable, "-c", CHILD, root, str(h5ad), str(out), str(shard_size), str(chunk_size)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_conversion(
    workdir: Path, n_cells: int, nnz_per_cell: int, n_genes: int, shard_size: int, chunk_size: int
) -> list[dict]:
    rows = []
    for n in sorted({max(n_cells // 4, 1), n_cells}):
        h5ad = workdir / f"synthetic-{n}.h5ad"
        t0 = time.perf_counter()
        make_synthetic_h5ad(h5ad, n_cells=n, nnz_per_cell=nnz_per_cell, n_genes=n_genes, seed=0)
        gen_s = time.perf_counter() - t0
        out = workdir / f"corpus-{n}"
        r = convert_in_child(h5ad, out, shard_size, chunk_size)
        rows.append(
            {
                "input_cells": n,
                "nnz_per_cell": r["nnz"] / r["n_cells"],
                "generate_s": gen_s,
                "convert_s": r["seconds"],
                "cells_per_s": r["n_cells"] / r["seconds"],
                "peak_rss_mib": r["peak_rss_mib"],
                "h5ad_bytes": h5ad.stat().st_size,
                "corpus_bytes": dir_bytes(out),
                "corpus_over_h5ad": dir_bytes(out) / h5ad.stat().st_size,
            }
        )
        h5ad.unlink()
        subprocess.run(["rm", "-rf", str(out)], check=True)
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for k in rows[0]:
        t.add_column(k)
    for r in rows:
        t.add_row(
            *[f"{v:,.1f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v) for v in r.values()]
        )
    Console().print(t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=1_000_000, help="cells in the synthetic h5ad (default 1M)")
    p.add_argument("--nnz-per-cell", type=int, default=2000)
    p.add_argument("--genes", type=int, default=20000)
    p.add_argument("--shard-size", type=int, default=16384)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--layout-cells", type=int, default=16384, help="cells in the layout test shard")
    p.add_argument("--block-cells", type=int, default=256, help="cells per contiguous block read")
    p.add_argument("--skip-convert", action="store_true")
    p.add_argument("--skip-layouts", action="store_true")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    results: dict = {"config": vars(args) | {"workdir": str(args.workdir), "json": str(args.json)}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        if not args.skip_layouts:
            results["layouts"] = bench_layouts(
                tmp, args.layout_cells, args.nnz_per_cell, args.genes, args.block_cells, 300
            )
            print_table(
                f"shard layouts: {args.layout_cells:,} cells x ~{args.nnz_per_cell} genes, "
                f"random {args.block_cells}-cell block reads (page cache warm)",
                results["layouts"],
            )
        if not args.skip_convert:
            results["conversion"] = bench_conversion(
                tmp, args.cells, args.nnz_per_cell, args.genes, args.shard_size, args.chunk_size
            )
            print_table(
                f"h5ad -> corpus conversion (shard {args.shard_size}, chunk {args.chunk_size})", results["conversion"]
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
