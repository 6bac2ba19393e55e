#!/usr/bin/env python
"""Training-step throughput of ScGPT vs a naive baseline built the way the official code runs, padded vs packed.

    python scripts/bench_model.py [--json PATH] [--configs demo,small,51m] [--steps N] [--cpu-batch N]
                                  [--device auto|cpu|cuda] [--layouts padded,packed] [--skip-naive]
                                  [--no-official-dropout] [--corpus DIR] [--no-pad-fraction]

Baseline: the same embeddings and heads around ``nn.TransformerEncoder`` (post-norm
``nn.TransformerEncoderLayer``, batch_first, attention dropout = dropout as officially) over the full padded
batch; for the generative case it gets an explicit (B * heads, L, L) boolean mask. Ours:
``scgpt_train.model.ScGPT`` (SDPA with a key mask; generative attention = flash attention over the gathered
known keys + the self term merged through the log-sum-exp, no L x L mask) with its default attn_dropout=0.0,
and the same with the official attention dropout ("ours_official_attn_dropout", skipped with --no-official-
dropout). ``layout``: ``padded`` (B, L) rows, or ``packed``: the same cells as one (1, T) token stream with
``cu_seqlens`` (attention per cell: length buckets on CPU, the varlen flash kernel on CUDA in bf16). Every
variant runs the same step: forward, GEP + GEPC MSE on the unknown (generative) or masked (plain) genes,
backward, Adam. Cell lengths follow the real distribution of non-zero genes per cell in celltypist's sample
(capped at the config's L).

Reports cells/s, non-pad tokens/s, the step time median and activation memory (CPU: bytes saved for backward;
GPU: peak allocated), and on CUDA achieved TFLOP/s and MFU against the GPU's bf16 dense peak
(``scgpt_train.callbacks.PEAK_BF16_FLOPS`` by device name, or ``BENCH_PEAK_TFLOPS``). FLOPs of one training
step (``scgpt_train.callbacks.train_flops``, the same formula as the trainer's logged MFU; backward = 2 x
forward, encoder matmuls only, useful work only: no pad token, attention within each cell over all its tokens):

    3 * n_layers * sum over cells c of [ l_c * (8 d^2 + 4 d d_ff) + 4 l_c^2 d ]

(l_c: tokens of cell c with <cls>; 8 d^2: QKV + output projections, 4 d d_ff: the FFN, 4 l_c^2 d: scores and
weighted sum over all heads). Embeddings, decoders and the optimizer are not counted.

Variants run in interleaved rounds (one warm-up round, then --steps timed rounds); the step time is the
median over the rounds (the best round is kept as ``step_s_min``). ``generative_cost_ratio`` is the ratio of
the medians; ``generative_cost_ratio_paired`` the median over rounds of (generative / plain) of the same round,
which cancels load changes on a shared machine; ``packed_vs_padded`` the same paired median of
(packed / padded) step times per attention. ``pad_fraction`` runs the real corpus stream (the demo corpus: real
pbmc68k_reduced and celltypist cells) at the 51M layout and reports the padding fraction of token slots,
padded (with and without length bucketing) and packed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_modules.atomic import write_text_atomic  # noqa: E402
from data_modules.tokenize.layout import TokenLayout  # noqa: E402
from scgpt_train.callbacks import peak_flops, train_flops  # noqa: E402
from scgpt_train.model import ScGPT, generative_attention_mask  # noqa: E402

CONFIGS = {  # name: (model kwargs, L incl. <cls>, batch on CPU, batch on GPU)
    "demo": (dict(d_model=128, n_heads=4, d_ff=256, n_layers=4, dropout=0.1), 129, 16, 64),
    "small": (dict(d_model=256, n_heads=8, d_ff=512, n_layers=4, dropout=0.2), 513, 8, 64),
    "51m": (dict(d_model=512, n_heads=8, d_ff=512, n_layers=12, dropout=0.2), TokenLayout().max_seq_len, 4, 32),
}
VOCAB = 60697  # whole-human vocabulary (pad = 60694, cls = 60695)
PAD_ID, CLS_ID = 60694, 60695


def real_gene_counts() -> np.ndarray:
    """Non-zero genes per cell of celltypist's sample (559 real cells), sorted."""
    import celltypist
    import pandas as pd

    csv = Path(celltypist.__file__).parent / "data" / "samples" / "sample_cell_by_gene.csv"
    counts = pd.read_csv(csv, index_col=0).to_numpy()
    return np.sort((counts > 0).sum(1))


def make_batch(n_cells: int, L: int, gene_counts: np.ndarray, seed: int = 0, gen_ratio: float = 0.5):
    """Padded batch whose lengths sit at evenly spaced quantiles of the real distribution."""
    rng = np.random.default_rng(seed)
    q = (np.arange(n_cells) + 0.5) / n_cells
    lengths = np.minimum(np.quantile(gene_counts, q).astype(int) + 1, L)  # + <cls>
    pad_mask = np.arange(L)[None] >= lengths[:, None]
    gene_ids = rng.integers(0, PAD_ID, (n_cells, L))
    gene_ids[:, 0] = CLS_ID
    gene_ids[pad_mask] = PAD_ID
    target = rng.integers(1, 51, (n_cells, L)).astype(np.float32)
    target[:, 0] = -2
    target[pad_mask] = -2
    body = ~pad_mask
    body[:, 0] = False
    gen_mask = body & (rng.random((n_cells, L)) < gen_ratio)
    mlm_mask = body & (rng.random((n_cells, L)) < 0.4)
    t = torch.from_numpy
    return dict(
        gene_ids=t(gene_ids),
        target=t(target),
        pad_mask=t(pad_mask),
        gen_mask=t(gen_mask),
        mlm_mask=t(mlm_mask),
        values=t(np.where(mlm_mask, -1.0, target).astype(np.float32)),
    )


def pack(batch: dict) -> dict:
    """The same cells as one packed (1, T) stream: non-pad tokens row by row, ``cu_seqlens``, ``token_cell``."""
    keep = ~batch["pad_mask"]
    lengths = keep.sum(1)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    out = {k: batch[k][keep][None] for k in ("gene_ids", "target", "gen_mask", "mlm_mask", "values")}
    out["pad_mask"] = torch.zeros_like(out["gen_mask"])
    out["packed"] = dict(
        cu_seqlens=cu_seqlens,
        token_cell=torch.repeat_interleave(torch.arange(len(lengths)), lengths)[None],
        max_seqlen=int(lengths.max()),
    )
    out["lengths"] = lengths
    return out


def to_device(batch: dict, device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        elif isinstance(v, dict):
            out[k] = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in v.items()}
        else:
            out[k] = v
    return out


class NaiveScGPT(nn.Module):
    """The official way: nn.TransformerEncoder over the padded batch, explicit mask for generative."""

    def __init__(self, ours: ScGPT, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ours = ours  # embeddings and heads are shared code; only the encoder differs
        d = ours.d_model
        layer = nn.TransformerEncoderLayer(d, n_heads, d_ff, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, len(ours.layers), enable_nested_tensor=False)
        self.n_heads = n_heads
        del ours.layers  # not used; keeps parameter counts honest
        ours.layers = nn.ModuleList()

    def forward(self, gene_ids, values, pad_mask, gen_mask=None):
        x, gene_embs = self.ours.embed(gene_ids, values, pad_mask, gen_mask)
        mask = None
        if gen_mask is not None:  # (B * H, L, L), True = not allowed
            mask = ~generative_attention_mask(pad_mask, gen_mask).repeat_interleave(self.n_heads, dim=0)
        h = self.encoder(x, mask=mask, src_key_padding_mask=pad_mask)
        cell_emb = h[:, 0]
        return {
            "mlm_output": self.ours.expr_decoder(h)["pred"],
            "mvc_output": self.ours.mvc_decoder(cell_emb, gene_embs)["pred"],
        }


def loss_fn(out, batch, generative: bool):
    where = (batch["gen_mask"] if generative else batch["mlm_mask"]).float()
    n = where.sum().clamp(min=1)
    return sum(((out[k] - batch["target"]) ** 2 * where).sum() / n for k in ("mlm_output", "mvc_output"))


class SavedBytes:
    """Bytes autograd saves for backward (unique storages): the activation memory of a step."""

    def __init__(self):
        self.seen, self.total = set(), 0

    def pack(self, t):
        try:
            key = t.untyped_storage().data_ptr()
            if key not in self.seen:
                self.seen.add(key)
                self.total += t.untyped_storage().nbytes()
        except RuntimeError:
            pass
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def make_step(model, opt, batch, generative, device, dtype):
    """One training step; ``step(measure=True)`` also returns the bytes saved for backward."""

    def step(measure=False):
        opt.zero_grad(set_to_none=True)
        gm = batch["gen_mask"] if generative else None
        mem = None
        extra = batch.get("packed", {})  # cu_seqlens, token_cell, max_seqlen of a packed batch
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if measure:
                with SavedBytes() as sb:
                    out = model(batch["gene_ids"], batch["values"], batch["pad_mask"], gen_mask=gm, **extra)
                    loss = loss_fn(out, batch, generative)
                mem = sb.total
            else:
                out = model(batch["gene_ids"], batch["values"], batch["pad_mask"], gen_mask=gm, **extra)
                loss = loss_fn(out, batch, generative)
        loss.backward()
        opt.step()
        return mem

    return step


def timed(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def step_flops(cfg: dict, lengths) -> float:
    """FLOPs of one training step on cells of ``lengths`` tokens (<cls> included): ``callbacks.train_flops``."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return train_flops(cfg["d_model"], cfg["d_ff"], cfg["n_layers"], lengths.sum(), (lengths**2).sum())


def bench_config(name, gene_counts, steps, device, dtype, variants, cpu_batch=None):
    """``variants``: (impl, generative, layout) triples; all run on the same cells, interleaved."""
    kwargs, L, b_cpu, b_gpu = CONFIGS[name]
    n_cells = b_gpu if device.type == "cuda" else min(b_cpu, cpu_batch or b_cpu)
    padded = make_batch(n_cells, L, gene_counts)
    batches = {"padded": to_device(padded, device), "packed": to_device(pack(padded), device)}
    lengths = (~padded["pad_mask"]).sum(1).numpy()
    tokens = int(lengths.sum())
    flops = step_flops(kwargs, lengths)
    peak = peak_flops(device) if dtype == torch.bfloat16 else None
    steps_by_variant, mems = [], []
    for impl, generative, layout in variants:  # build + warm up every variant first
        torch.manual_seed(0)
        model_kwargs = dict(kwargs)
        if impl == "ours_official_attn_dropout":
            model_kwargs["attn_dropout"] = None  # = dropout, the official attention dropout
        ours = ScGPT(vocab_size=VOCAB, pad_token_id=PAD_ID, **model_kwargs)
        model = NaiveScGPT(ours, kwargs["n_heads"], kwargs["d_ff"], kwargs["dropout"]) if impl == "naive" else ours
        model = model.to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        step = make_step(model, opt, batches[layout], generative, device, dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        mem = step(measure=device.type != "cuda")
        if device.type == "cuda":
            torch.cuda.synchronize()
            mem = torch.cuda.max_memory_allocated()
        steps_by_variant.append(step)
        mems.append(mem)
    times = [[] for _ in variants]
    for _ in range(steps):  # interleaved rounds: a busy machine slows all variants alike
        for i, step in enumerate(steps_by_variant):
            times[i].append(timed(step, device))
    rows = []
    for (impl, generative, layout), ts, mem in zip(variants, times, mems, strict=True):
        sec = float(np.median(ts))
        row = dict(
            config=name,
            impl=impl,
            attention="generative" if generative else "plain",
            layout=layout,
            L=L,
            batch=n_cells,
            step_s=sec,
            step_s_min=min(ts),
            step_s_rounds=ts,
            cells_per_s=n_cells / sec,
            tokens_per_s=tokens / sec,
            mem_mb=None if mem is None else mem / 2**20,
            train_flops=flops,
            tflops_per_s=flops / sec / 1e12,
        )
        if peak:
            row["mfu"] = flops / sec / peak
        rows.append(row)
        print(
            f"  {name:5s} {impl:20s} {row['attention']:10s} {layout:6s} {sec:8.3f} s/step  "
            f"{row['cells_per_s']:8.2f} cells/s  {row['tokens_per_s']:9.0f} tok/s  {row['tflops_per_s']:7.3f} TFLOP/s"
            + (f"  {row['mem_mb']:8.0f} MB" if mem is not None else "")
            + (f"  MFU {row['mfu']:.1%}" if "mfu" in row else ""),
            flush=True,
        )
    return rows


def corpus_pad_fraction(corpus_dir: Path, max_seq_len: int, batch_size: int = 32) -> dict:
    """Padding fraction of token slots over one epoch of the real corpus stream (train split, generative
    tokenization at ``max_seq_len``): padded with length bucketing (the default), padded without, packed."""
    from data_modules.stream import CellStream, StreamLoader

    tok = {"layout": {"max_seq_len": max_seq_len}}
    result = {"corpus": str(corpus_dir), "max_seq_len": max_seq_len, "batch_size": batch_size}
    for label, kw in (
        ("padded_bucketed", dict(packing=False)),
        ("padded_unbucketed", dict(packing=False, bucket_batches=1)),
        ("packed", dict(packing=True)),
    ):
        stream = CellStream(str(corpus_dir), "train", batch_size, tokenizer=tok, block_size=32, seed=0, **kw)
        tokens = slots = cells = 0
        for batch in StreamLoader(stream, num_workers=0):
            tokens += int((~batch.pad_mask).sum())
            slots += batch.pad_mask.numel()
            cells += batch.n_cells
        result[label] = 1.0 - tokens / max(slots, 1)
        result["tokens_per_cell"] = tokens / max(cells, 1)
    return result


def table(rows) -> str:
    lines = [
        "| config | L | batch | impl | attention | layout | s/step | cells/s | non-pad tok/s | TFLOP/s | mem (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = "-" if r["mem_mb"] is None else f"{r['mem_mb']:.0f}"
        mfu = f" (MFU {r['mfu']:.1%})" if "mfu" in r else ""
        lines.append(
            f"| {r['config']} | {r['L']} | {r['batch']} | {r['impl']} | {r['attention']} | {r['layout']} | "
            f"{r['step_s']:.3f} | {r['cells_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['tflops_per_s']:.3f}{mfu} | "
            f"{mem} |"
        )
    return "\n".join(lines)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    return torch.device(name)


def build_variants(layouts, skip_naive: bool, official_dropout: bool) -> list[tuple[str, bool, str]]:
    variants = []
    for generative in (False, True):
        if not skip_naive:
            variants.append(("naive", generative, "padded"))
        variants += [("ours", generative, layout) for layout in layouts]
        if official_dropout and not generative and not skip_naive:
            variants.append(("ours_official_attn_dropout", generative, "padded"))
    return variants


def paired_ratio(a: dict, b: dict) -> float:
    """Median over rounds of a's step time / b's step time in the same round."""
    return float(np.median([x / y for x, y in zip(a["step_s_rounds"], b["step_s_rounds"], strict=True)]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--configs", default="demo,small,51m")
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (after one warm-up); median kept")
    parser.add_argument("--cpu-batch", type=int, default=None, help="cap the cells per batch on CPU (51M default: 4)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--layouts", default="padded,packed", help="batch layouts of 'ours': padded, packed or both")
    parser.add_argument("--skip-naive", action="store_true", help="only our model (padded vs packed), no baselines")
    parser.add_argument(
        "--no-official-dropout",
        action="store_true",
        help="skip the 'ours_official_attn_dropout' variant (math kernel, slow at L = 1,201)",
    )
    parser.add_argument("--corpus", type=Path, default=None, help="corpus for --pad-fraction (default: demo corpus)")
    parser.add_argument("--no-pad-fraction", action="store_true", help="skip the real-corpus padding fraction")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    layouts = [x for x in args.layouts.split(",") if x]
    if not layouts or any(x not in ("padded", "packed") for x in layouts):
        parser.error(f"--layouts takes padded and/or packed, got {args.layouts!r}")
    configs = [c for c in args.configs.split(",") if c]
    if any(c not in CONFIGS for c in configs):
        parser.error(f"--configs takes {', '.join(CONFIGS)}, got {args.configs!r}")
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gene_counts = real_gene_counts()
    variants = build_variants(layouts, args.skip_naive, not args.no_official_dropout)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"device {device} ({gpu or 'cpu'}), {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    rows = []
    for name in configs:
        rows += bench_config(name, gene_counts, args.steps, device, dtype, variants, args.cpu_batch)
    print()
    print(table(rows))

    def get(config, impl, attention, layout="padded"):
        return next(
            (
                r
                for r in rows
                if r["config"] == config and r["impl"] == impl and r["attention"] == attention and r["layout"] == layout
            ),
            None,
        )

    peak = peak_flops(device) if dtype == torch.bfloat16 else None
    result = {"device": str(device), "gpu": gpu, "dtype": str(dtype), "peak_bf16_flops": peak, "rows": rows}
    main_cfg = "51m" if "51m" in configs else configs[-1]
    result["summary_config"] = main_cfg
    base = layouts[0]
    ours_plain, ours_gen = get(main_cfg, "ours", "plain", base), get(main_cfg, "ours", "generative", base)
    naive_plain, naive_gen = get(main_cfg, "naive", "plain"), get(main_cfg, "naive", "generative")
    official = get(main_cfg, "ours_official_attn_dropout", "plain")
    if naive_plain and get(main_cfg, "ours", "plain"):
        result["speedup_vs_naive"] = get(main_cfg, "ours", "plain")["cells_per_s"] / naive_plain["cells_per_s"]
    if naive_plain and official:
        result["speedup_vs_naive_official_attn_dropout"] = official["cells_per_s"] / naive_plain["cells_per_s"]
    result["generative_cost_ratio"] = ours_gen["step_s"] / ours_plain["step_s"]
    result["generative_cost_ratio_paired"] = paired_ratio(ours_gen, ours_plain)
    if naive_gen and get(main_cfg, "ours", "generative"):
        result["generative_speedup_vs_naive"] = (
            get(main_cfg, "ours", "generative")["cells_per_s"] / naive_gen["cells_per_s"]
        )
    if "padded" in layouts and "packed" in layouts:
        result["packed_vs_padded"] = {
            attention: {
                "step_ratio_paired_median": paired_ratio(
                    get(main_cfg, "ours", attention, "packed"), get(main_cfg, "ours", attention, "padded")
                ),
                "step_ratio_of_medians": get(main_cfg, "ours", attention, "packed")["step_s"]
                / get(main_cfg, "ours", attention, "padded")["step_s"],
            }
            for attention in ("plain", "generative")
        }
    if device.type == "cuda":
        result["mfu_bf16"] = {f"{r['config']}/{r['impl']}/{r['attention']}/{r['layout']}": r.get("mfu") for r in rows}
    if not args.no_pad_fraction:
        corpus = args.corpus
        if corpus is None:
            from data_modules.demo import build_demo_corpus

            corpus = build_demo_corpus(Path(__file__).resolve().parents[1] / ".cache" / "demo_corpus")
        result["pad_fraction"] = corpus_pad_fraction(corpus, CONFIGS["51m"][1])
    print()
    for key in (
        "speedup_vs_naive",
        "speedup_vs_naive_official_attn_dropout",
        "generative_cost_ratio",
        "generative_cost_ratio_paired",
        "generative_speedup_vs_naive",
        "packed_vs_padded",
        "pad_fraction",
    ):
        if key in result:
            print(f"{main_cfg if key != 'pad_fraction' else 'corpus'}: {key} {result[key]}")
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
