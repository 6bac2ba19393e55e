#!/usr/bin/env python
"""Embedding throughput against the official embedding's way of running, and kNN index rates for reference mapping.

    python scripts/bench_embed.py [--model demo|51m|both] [--repeats 3] [--cells N] [--batch-size 64] [--threads N]
                                  [--device cpu|cuda] [--quick] [--json PATH] [--markdown PATH]
                                  [--n-ref 100000] [--n-query 10000] [--skip-embed] [--skip-index]

Embedding. Real cells: celltypist's raw-count sample (559 cells) over its 1,200 most expressed genes (each a distinct
id of the 60,697-gene whole-human vocabulary), so cell lengths vary as in real data (no cell exceeds the layout's
1,200 genes + ``<cls>``). Models with random weights (the cost does not depend on them): ``demo`` (4 x 128, the
``make train`` architecture) and ``51m`` (12 layers, 8 heads, d 512, FFN 512: the paper's whole-human model), in
eval mode. Every variant runs every cell through :func:`scgpt_train.inference_batches.embed_cells` with the same
tokens (seeded groups of 64 cells):

- ``reference``: the way the official ``get_batch_cell_embeddings`` runs: non-zero genes, ``<cls>`` first, batches
  of ``--batch-size`` (64) cells in the input's order, each padded to its longest cell, fp32;
- ``padded, bf16``: the same batches under bf16 autocast;
- ``sorted-packed, fp32`` / ``sorted-packed, bf16``: cells sorted by length, packed (1, T) streams of at most
  ``BatchOptions().on(device)`` tokens: 4,096 on a CPU, 16,384 on a GPU (the project's batching; ``--precision
  auto`` picks bf16 where the hardware has native bf16: the row marked *default*).

One warm-up pass of each variant over 32 cells, then ``--repeats`` rounds, the variants interleaved within each
round; a variant's time is the median of its rounds. Reported per variant: cells/s, tokens/s (the cells' tokens,
``<cls>`` included, padding not counted), peak memory during a pass (CPU: the growth of the process' peak RSS,
VmHWM, reset through ``/proc/self/clear_refs`` after ``malloc_trim`` before each pass; CUDA:
``max_memory_allocated``), speed-up over the reference and the cosine of each cell's embedding to the reference's
(min and mean). Also the time to make the batches alone (tokenization, sorting, packing; no model): the share a
loader worker could take off the main process. ``--quick``: a 2 x 32 model on 48 cells over 300 genes, one round
(seconds; for tests).

Index: ``--n-ref`` L2-normalized 512-d vectors drawn around 64 random centres of a 16-d latent space lifted to
512 dimensions, plus small isotropic noise (clustered and of low intrinsic dimension, like cell embeddings), and
``--n-query`` queries; k = 10. faiss flat (exact), faiss IVF-PQ with the parameters reference mapping
chooses for that size (``reference_map.choose_index(kind="ivfpq")``: its build = training + adding; recall@10
against the exact neighbours) and scikit-learn's brute-force search (the fallback without faiss).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_modules.atomic import write_text_atomic  # noqa: E402
from data_modules.tokenize.layout import TokenLayout  # noqa: E402

MODELS = {  # name: ScGPT kwargs
    "51m": dict(d_model=512, n_heads=8, d_ff=512, n_layers=12, dropout=0.2),
    "demo": dict(d_model=128, n_heads=4, d_ff=256, n_layers=4, dropout=0.1),
    "quick": dict(d_model=32, n_heads=2, d_ff=64, n_layers=2, dropout=0.0),
}
VOCAB = 60697  # whole-human vocabulary (pad = 60694, cls = 60695)
PAD_ID, CLS_ID = 60694, 60695
LATENT = 16  # intrinsic dimension of the synthetic reference embeddings
N_GENES = 1200  # the sample's most expressed genes kept (the layout's 1,200 genes: no cell is sampled)
WARMUP_CELLS = 32


def real_cells(n_genes: int = N_GENES, n_cells: int | None = None):
    """CellBlock of celltypist's sample (559 real cells, raw counts) over its ``n_genes`` most expressed genes, each
    a distinct vocabulary id; the first ``n_cells`` cells."""
    import celltypist
    import pandas as pd
    import scipy.sparse as sp

    from data_modules.store.reader import CellBlock

    csv = Path(celltypist.__file__).parent / "data" / "samples" / "sample_cell_by_gene.csv"
    x = pd.read_csv(csv, index_col=0).to_numpy(dtype=np.float32)
    top = np.sort(np.argsort(-x.sum(0), kind="stable")[:n_genes])
    x = sp.csr_matrix(x[: n_cells or len(x), top])
    ids = np.random.default_rng(0).choice(PAD_ID, size=x.shape[1], replace=False).astype(np.int32)
    return CellBlock(
        indptr=x.indptr.astype(np.int64),
        gene_ids=ids[x.indices],
        counts=x.data.astype(np.float32),
        cell_index=np.arange(x.shape[0], dtype=np.int64),
    )


def processor() -> dict:
    """The CPU's model name and its native-bf16 flags (what ``--precision auto`` reads)."""
    from scgpt_train.precision import cpu_bf16_flags

    name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": name, "bf16_flags": cpu_bf16_flags(), "threads": torch.get_num_threads()}


class PeakMemory:
    """Peak memory of one pass: CUDA's max_memory_allocated, or on CPU the growth of VmHWM (reset before)."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status(key: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1]) / 1024  # MiB
        except OSError:
            return None
        return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            import ctypes
            import gc

            gc.collect()
            try:  # give freed heap memory back first, so the previous pass' leftovers do not hide this one's peak
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
            self.base = self._status("VmRSS:")
        self.peak_mib = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        else:
            peak = self._status("VmHWM:")
            self.peak_mib = None if peak is None or self.base is None else max(0.0, peak - self.base)


def variants(batch_size: int, device: torch.device) -> dict:
    """name -> (BatchOptions, precision); the first is the official-style reference."""
    from scgpt_train.inference_batches import BatchOptions

    fixed = BatchOptions(max_tokens=None, max_cells=batch_size, layout="padded", sort=False)
    packed = BatchOptions().on(device)  # the project's batching: 4,096 tokens a batch on a CPU, 16,384 on a GPU
    return {
        "reference (official way: padded, fixed order, fp32)": (fixed, "fp32"),
        "padded, fixed order, bf16": (fixed, "bf16"),
        "sorted-packed, fp32": (packed, "fp32"),
        "sorted-packed, bf16": (packed, "bf16"),
    }


def bench_embedding(model_name: str, repeats: int, batch_size: int, device: torch.device, n_cells=None) -> dict:
    from data_modules.tokenize import Tokenizer, TokenizerConfig
    from scgpt_train.inference_batches import BatchOptions, CellTokens, batches_of, embed_cells
    from scgpt_train.model import ScGPT
    from scgpt_train.precision import resolve_precision

    quick = model_name == "quick"
    block = real_cells(300 if quick else N_GENES, 48 if quick else n_cells)
    layout = TokenLayout()  # L = 1,201
    torch.manual_seed(0)
    model = ScGPT(vocab_size=VOCAB, pad_token_id=PAD_ID, layout=layout, **MODELS[model_name]).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    tokenizer = Tokenizer(TokenizerConfig(layout=layout, gen_ratios=None, mlm_prob=None), PAD_ID, CLS_ID)

    def cells(n: int) -> CellTokens:
        return CellTokens(lambda lo, hi: block.take(np.arange(lo, hi)), n, tokenizer, seed=0)

    n = len(block)
    lengths = np.minimum(np.diff(block.indptr), layout.max_genes) + 1
    tokens = int(lengths.sum())
    auto = resolve_precision("auto", device)
    runs = variants(batch_size, device)
    print(
        f"{model_name}: {n_params / 1e6:.1f}M parameters, {n} cells, {tokens / n:.0f} tokens per cell on average "
        f"(min {lengths.min()}, max {lengths.max()}); auto precision here: {auto.reason}",
        flush=True,
    )
    for options, precision in runs.values():  # warm-up (kernels, allocator, numba)
        embed_cells(model, cells(min(WARMUP_CELLS, n)), options=options, precision=precision, device=device,
                    progress=False)  # fmt: skip
    times = {name: [] for name in runs}
    memory = {name: [] for name in runs}
    embeddings = {}
    for r in range(repeats):
        for name, (options, precision) in runs.items():
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                out = embed_cells(model, cells(n), options=options, precision=precision, device=device,
                                  progress=False)  # fmt: skip
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
            times[name].append(dt)
            memory[name].append(mem.peak_mib)
            embeddings[name] = out["cell_emb"]
            print(f"  round {r + 1}: {name}: {dt:.2f} s ({n / dt:.1f} cells/s)", flush=True)
    t0 = time.perf_counter()
    n_batches = sum(1 for _ in batches_of(cells(n), BatchOptions().on(device)))
    batching_s = time.perf_counter() - t0
    ref_name = next(iter(runs))
    ref = embeddings[ref_name] / np.linalg.norm(embeddings[ref_name], axis=1, keepdims=True)
    ref_s = float(np.median(times[ref_name]))
    rows = []
    for name, (options, precision) in runs.items():
        emb = embeddings[name] / np.linalg.norm(embeddings[name], axis=1, keepdims=True)
        cosine = np.sum(emb * ref, axis=1)
        step = float(np.median(times[name]))
        peaks = [m for m in memory[name] if m is not None]
        rows.append(
            {
                "variant": name,
                "default": options.layout == "packed" and precision == auto.name,
                "seconds": times[name],
                "median_s": step,
                "cells_per_s": n / step,
                "tokens_per_s": tokens / step,
                "peak_mib": max(peaks) if peaks else None,
                "speedup": ref_s / step,
                "cosine_min": float(cosine.min()),
                "cosine_mean": float(cosine.mean()),
            }
        )
    return {
        "model": model_name,
        "params_millions": round(n_params / 1e6, 1),
        "n_cells": n,
        "tokens_per_cell_mean": tokens / n,
        "reference_batch_size": batch_size,
        "repeats": repeats,
        "auto_precision": auto.reason,
        "batching_only_s": batching_s,
        "batches": n_batches,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    """The embedding tables of ``result`` as markdown."""
    out = []
    for emb in result.get("embedding", []):
        out.append(
            f"\n{emb['model']} ({emb['params_millions']}M parameters), {emb['n_cells']} cells, "
            f"{emb['tokens_per_cell_mean']:.0f} tokens per cell on average; median of {emb['repeats']} interleaved "
            f"rounds; {result['device']}, {result['processor']['cpu']}, {result['processor']['threads']} threads, "
            f"bf16 flags {result['processor']['bf16_flags'] or 'none'}; auto: {emb['auto_precision']}\n"
        )
        out.append("| variant | s / pass | cells/s | tokens/s | peak memory | vs reference | cosine to reference |")
        out.append("|---|---|---|---|---|---|---|")
        for r in emb["rows"]:
            mem = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
            name = r["variant"] + (" (default)" if r["default"] else "")
            out.append(
                f"| {name} | {r['median_s']:.2f} | {r['cells_per_s']:.1f} | {r['tokens_per_s']:,.0f} | {mem} | "
                f"{r['speedup']:.2f}x | min {r['cosine_min']:.6f}, mean {r['cosine_mean']:.6f} |"
            )
        out.append(
            f"\nMaking the batches alone (tokenization, sorting, packing; no model): {emb['batching_only_s']:.2f} s "
            f"for {emb['batches']} packed batches."
        )
    return "\n".join(out) + "\n"


def bench_index(n_ref: int, n_query: int, d: int = 512, k: int = 10, seed: int = 0) -> list[dict]:
    from scgpt_train.tasks.reference_map import IndexSpec, KnnIndex, choose_index, faiss_available, l2_normalize

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, LATENT)).astype(np.float32)
    lift = rng.normal(size=(LATENT, d)).astype(np.float32) / np.sqrt(LATENT)

    def draw(n):  # cells around 64 centres in a 16-d latent space, lifted to d dims, + small isotropic noise
        z = centres[rng.integers(0, 64, n)] + 0.5 * rng.normal(size=(n, LATENT)).astype(np.float32)
        return l2_normalize(z @ lift + 0.05 * rng.normal(size=(n, d)).astype(np.float32))

    ref, qry = draw(n_ref), draw(n_query)
    labels = np.zeros(n_ref, dtype=np.int32)
    rows = np.arange(n_ref)
    specs = []
    if faiss_available():
        specs += [IndexSpec("faiss", "flat", d), choose_index(n_ref, d, kind="ivfpq", seed=seed)]
    specs.append(IndexSpec("sklearn", "flat", d))
    results, exact = [], None
    for spec in specs:
        t0 = time.perf_counter()
        index = KnnIndex(spec)
        if index.needs_training:
            sample = rng.choice(n_ref, size=min(n_ref, 200_000), replace=False)
            index.train(ref[sample])
        t_train = time.perf_counter() - t0
        index.add(ref, labels, rows)
        index.finalize()
        t_build = time.perf_counter() - t0
        t1 = time.perf_counter()
        _, nb = index.search(qry, k)
        t_query = time.perf_counter() - t1
        if exact is None:
            exact = nb
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(nb, exact, strict=True)]))
        row = {
            "index": f"{spec.backend} {spec.kind}",
            "params": spec.as_dict(),
            "n_ref": n_ref,
            "n_query": n_query,
            "train_s": t_train,
            "build_s": t_build,
            "build_vectors_per_s": n_ref / t_build,
            "query_s": t_query,
            "queries_per_s": n_query / t_query,
            "recall_at_10_vs_exact": recall,
        }
        results.append(row)
        print(
            f"  {row['index']}: build {t_build:.2f} s ({row['build_vectors_per_s']:.0f} vectors/s, training "
            f"{t_train:.2f} s), {n_query} queries {t_query:.2f} s ({row['queries_per_s']:.0f} queries/s), "
            f"recall@10 {recall:.3f}",
            flush=True,
        )
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None, help="also write the embedding tables here")
    p.add_argument("--model", default="both", choices=["demo", "51m", "both"])
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every variant (median)")
    p.add_argument("--cells", type=int, default=None, help="embed only the sample's first N cells (default all 559)")
    p.add_argument("--batch-size", type=int, default=64, help="the reference's cells per batch (official default 64)")
    p.add_argument("--quick", action="store_true", help="a 2 x 32 model on 48 cells, one round (for tests)")
    p.add_argument("--n-ref", type=int, default=100_000)
    p.add_argument("--n-query", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=None, help="torch (and faiss) CPU threads")
    p.add_argument("--device", default="cpu", help="cpu (the figure asked for) or cuda")
    p.add_argument("--skip-embed", action="store_true")
    p.add_argument("--skip-index", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    device = torch.device(args.device)
    result = {"device": str(device), "torch": torch.__version__, "processor": processor()}
    try:
        import faiss

        result["faiss"] = faiss.__version__
    except ImportError:
        result["faiss"] = None
    print(f"device {device}, torch {torch.__version__}, {result['processor']}, faiss {result['faiss']}")
    if not args.skip_embed:
        models = ["quick"] if args.quick else (["demo", "51m"] if args.model == "both" else [args.model])
        repeats = 1 if args.quick else args.repeats
        result["embedding"] = [bench_embedding(m, repeats, args.batch_size, device, args.cells) for m in models]
        table = markdown(result)
        print(table)
        if args.markdown:
            write_text_atomic(args.markdown, table)
    if not args.skip_index:
        print(f"index: {args.n_ref} reference vectors, {args.n_query} queries, d 512, k 10")
        result["index"] = bench_index(args.n_ref, args.n_query)
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
