#!/usr/bin/env python
"""Embedding throughput of the 51M architecture and kNN index build / query rates for reference mapping.

    python scripts/bench_embed.py [--json PATH] [--batches N] [--batch-size 32] [--n-ref 100000] [--n-query 10000]
                                  [--model 51m|demo] [--threads N] [--skip-embed] [--skip-index]

Embedding: the paper's whole-human architecture (12 layers, 8 heads, d 512, FFN 512, vocabulary 60,697,
randomly initialized: the cost does not depend on the weights) in eval mode, cells of the real celltypist sample
(559 cells, their real non-zero genes and counts; genes as distinct vocabulary ids) tokenized by the project's
Tokenizer with L = 1,201 (1,200 genes + <cls>, the checkpoint layout), ``--batch-size`` cells a batch, through
``scgpt_train.inference.predict_cells`` (the embed.py / reference-mapping path: tokenization, forward,
gathering). One warm-up batch, then ``--batches`` timed batches; cells/s is the median over them.

Index: ``--n-ref`` L2-normalized 512-d vectors drawn around 64 random centres of a 16-d latent space lifted to
512 dimensions, plus small isotropic noise (clustered and of low intrinsic dimension, like cell embeddings), and
``--n-query`` queries; k = 10. faiss flat (exact), faiss IVF-PQ with the parameters reference mapping
chooses for that size (``reference_map.choose_index(kind="ivfpq")``: its build = training + adding; recall@10
against the exact neighbours) and scikit-learn's brute-force search (the fallback without faiss).
"""

from __future__ import annotations

import argparse
import json
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
}
VOCAB = 60697  # whole-human vocabulary (pad = 60694, cls = 60695)
PAD_ID, CLS_ID = 60694, 60695
LATENT = 16  # intrinsic dimension of the synthetic reference embeddings


def real_cells():
    """CellBlock of celltypist's sample (559 real cells): each gene a distinct vocabulary id, real counts."""
    import celltypist
    import pandas as pd
    import scipy.sparse as sp

    from data_modules.store.reader import CellBlock

    csv = Path(celltypist.__file__).parent / "data" / "samples" / "sample_cell_by_gene.csv"
    x = sp.csr_matrix(pd.read_csv(csv, index_col=0).to_numpy(dtype=np.float32))
    ids = np.random.default_rng(0).choice(PAD_ID, size=x.shape[1], replace=False).astype(np.int32)
    return CellBlock(
        indptr=x.indptr.astype(np.int64),
        gene_ids=ids[x.indices],
        counts=x.data.astype(np.float32),
        cell_index=np.arange(x.shape[0], dtype=np.int64),
    )


def bench_embedding(model_name: str, batch_size: int, n_batches: int, device: torch.device) -> dict:
    from data_modules.tokenize import Tokenizer, TokenizerConfig
    from scgpt_train.inference import predict_cells
    from scgpt_train.model import ScGPT

    layout = TokenLayout()  # L = 1,201
    torch.manual_seed(0)
    model = ScGPT(vocab_size=VOCAB, pad_token_id=PAD_ID, layout=layout, **MODELS[model_name]).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    block = real_cells()
    tokenizer = Tokenizer(TokenizerConfig(layout=layout, gen_ratios=None, mlm_prob=None), PAD_ID, CLS_ID)
    n_cells = len(block)
    rng = np.random.default_rng(0)

    def batches(k: int):  # k batches of batch_size cells, cycling through the sample
        for b in range(k):
            rows = (np.arange(batch_size) + b * batch_size) % n_cells
            batch = tokenizer.pad(tokenizer.encode(block, rng, rows=rows))
            batch.cell_index = torch.arange(batch_size)
            yield batch

    times, tokens, lengths = [], [], []
    for i, batch in enumerate(batches(n_batches + 1)):
        t0 = time.perf_counter()
        out = predict_cells(model, [batch], batch_size, device=device, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        assert np.isfinite(out["cell_emb"]).all()
        if i == 0:
            continue  # warm-up
        times.append(dt)
        tokens.append(int((~batch.pad_mask).sum()))
        lengths.append(int(batch.gene_ids.shape[1]))
        print(f"  batch {i}: {dt:.2f} s, {batch_size / dt:.1f} cells/s, padded L {lengths[-1]}", flush=True)
    step = float(np.median(times))
    return {
        "model": model_name,
        "params_millions": round(n_params / 1e6, 1),
        "max_seq_len": layout.max_seq_len,
        "batch_size": batch_size,
        "batches_timed": n_batches,
        "padded_L": lengths,
        "batch_s": times,
        "batch_s_median": step,
        "cells_per_s": batch_size / step,
        "tokens_per_s": float(np.median(tokens)) / step,
    }


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
    p.add_argument("--model", default="51m", choices=sorted(MODELS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=3, help="timed batches after one warm-up")
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
    result = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        import faiss

        result["faiss"] = faiss.__version__
    except ImportError:
        result["faiss"] = None
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, faiss {result['faiss']}")
    if not args.skip_embed:
        print(f"embedding: {args.model}, L = {TokenLayout().max_seq_len}, batch {args.batch_size}")
        emb = bench_embedding(args.model, args.batch_size, args.batches, device)
        result["embedding"] = emb
        print(
            f"embedding throughput: {emb['cells_per_s']:.2f} cells/s ({emb['tokens_per_s']:.0f} tokens/s), "
            f"median of {args.batches} batches of {args.batch_size}"
        )
    if not args.skip_index:
        print(f"index: {args.n_ref} reference vectors, {args.n_query} queries, d 512, k 10")
        result["index"] = bench_index(args.n_ref, args.n_query)
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
