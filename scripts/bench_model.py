#!/usr/bin/env python
"""Training-step throughput of ScGPT vs a naive baseline built the way the official code runs.

    python scripts/bench_model.py [--json PATH] [--configs demo,small,51m] [--steps N] [--cpu-batch N]
                                  [--no-official-dropout]

Baseline: the same embeddings and heads around ``nn.TransformerEncoder`` (post-norm
``nn.TransformerEncoderLayer``, batch_first, attention dropout = dropout as officially) over the full padded
batch; for the generative case it gets an explicit (B * heads, L, L) boolean mask. Ours:
``scgpt_train.model.ScGPT`` (SDPA with a key mask; generative attention = flash attention over the gathered
known keys + the self term merged through the log-sum-exp, no L x L mask) with its default attn_dropout=0.0,
and the same with the official attention dropout ("ours_official_attn_dropout", skipped with --no-official-
dropout). Both run the same step: forward, GEP + GEPC MSE on the unknown (generative) or masked (plain) genes,
backward, Adam. Cell lengths follow the real
distribution of non-zero genes per cell in celltypist's sample (capped at the config's L).
Reports cells/s, non-pad tokens/s and activation memory (CPU: bytes saved for backward; GPU: peak
allocated). On a GPU it also reports bf16 MFU for the 51M config.
Variants run in interleaved rounds (one warm-up round, then --steps timed rounds); the step time is the
median over the rounds (the best round is kept as ``step_s_min``). ``generative_cost_ratio`` is the ratio of
the medians; ``generative_cost_ratio_paired`` the median over rounds of (generative / plain) of the same round,
which cancels load changes on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_modules.atomic import write_text_atomic  # noqa: E402
from data_modules.tokenize.layout import TokenLayout  # noqa: E402
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
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if measure:
                with SavedBytes() as sb:
                    out = model(batch["gene_ids"], batch["values"], batch["pad_mask"], gen_mask=gm)
                    loss = loss_fn(out, batch, generative)
                mem = sb.total
            else:
                out = model(batch["gene_ids"], batch["values"], batch["pad_mask"], gen_mask=gm)
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


def train_flops(cfg, batch) -> float:
    """Matmul FLOPs of one training step (3 x forward) over non-pad tokens, attention on the padded L."""
    d, f, n_layers = cfg["d_model"], cfg["d_ff"], cfg["n_layers"]
    tokens = int((~batch["pad_mask"]).sum())
    B, L = batch["pad_mask"].shape
    per_layer = tokens * 2 * (4 * d * d + 2 * d * f) + B * 2 * 2 * L * L * d
    return 3.0 * n_layers * per_layer


def bench_config(name, gene_counts, steps, device, dtype, variants, cpu_batch=None):
    kwargs, L, b_cpu, b_gpu = CONFIGS[name]
    n_cells = b_gpu if device.type == "cuda" else min(b_cpu, cpu_batch or b_cpu)
    batch = {k: v.to(device) for k, v in make_batch(n_cells, L, gene_counts).items()}
    tokens = int((~batch["pad_mask"]).sum())
    steps_by_variant, mems = [], []
    for impl, generative in variants:  # build + warm up every variant first
        torch.manual_seed(0)
        model_kwargs = dict(kwargs)
        if impl == "ours_official_attn_dropout":
            model_kwargs["attn_dropout"] = None  # = dropout, the official attention dropout
        ours = ScGPT(vocab_size=VOCAB, pad_token_id=PAD_ID, **model_kwargs)
        model = NaiveScGPT(ours, kwargs["n_heads"], kwargs["d_ff"], kwargs["dropout"]) if impl == "naive" else ours
        model = model.to(device).train()
        step = make_step(model, torch.optim.Adam(model.parameters(), lr=1e-4), batch, generative, device, dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        mem = step(measure=device.type != "cuda")
        if device.type == "cuda":
            mem = torch.cuda.max_memory_allocated()
        steps_by_variant.append(step)
        mems.append(mem)
    times = [[] for _ in variants]
    for _ in range(steps):  # interleaved rounds: a busy machine slows all variants alike
        for i, step in enumerate(steps_by_variant):
            times[i].append(timed(step, device))
    rows = []
    for (impl, generative), ts, mem in zip(variants, times, mems):
        sec = float(np.median(ts))
        row = dict(
            config=name,
            impl=impl,
            attention="generative" if generative else "plain",
            L=L,
            batch=n_cells,
            step_s=sec,
            step_s_min=min(ts),
            step_s_rounds=ts,
            cells_per_s=n_cells / sec,
            tokens_per_s=tokens / sec,
            mem_mb=None if mem is None else mem / 2**20,
        )
        if device.type == "cuda" and dtype == torch.bfloat16:
            peak = float(os.environ.get("BENCH_PEAK_TFLOPS", "989"))  # H100 SXM dense bf16
            row["mfu"] = train_flops(kwargs, batch) / sec / (peak * 1e12)
        rows.append(row)
        print(
            f"  {name:5s} {row['impl']:20s} {row['attention']:10s} {sec:8.3f} s/step  "
            f"{row['cells_per_s']:8.2f} cells/s  {row['tokens_per_s']:9.0f} tok/s"
            + (f"  {row['mem_mb']:8.0f} MB" if mem is not None else "")
            + (f"  MFU {row['mfu']:.1%}" if "mfu" in row else ""),
            flush=True,
        )
    return rows


def table(rows) -> str:
    lines = [
        "| config | L | batch | impl | attention | s/step | cells/s | non-pad tok/s | act. mem (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = "-" if r["mem_mb"] is None else f"{r['mem_mb']:.0f}"
        lines.append(
            f"| {r['config']} | {r['L']} | {r['batch']} | {r['impl']} | {r['attention']} | "
            f"{r['step_s']:.3f} | {r['cells_per_s']:.2f} | {r['tokens_per_s']:.0f} | {mem} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--configs", default="demo,small,51m")
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (after one warm-up); median kept")
    parser.add_argument("--cpu-batch", type=int, default=None, help="cap the cells per batch on CPU (51M default: 4)")
    parser.add_argument(
        "--no-official-dropout",
        action="store_true",
        help="skip the 'ours_official_attn_dropout' variant (math kernel, slow at L = 1,201)",
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gene_counts = real_gene_counts()
    variants = [
        ("naive", False),
        ("ours", False),
        ("ours_official_attn_dropout", False),
        ("naive", True),
        ("ours", True),
    ]
    if args.no_official_dropout:
        variants = [v for v in variants if v[0] != "ours_official_attn_dropout"]
    print(f"device {device}, {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    rows = []
    for name in args.configs.split(","):
        rows += bench_config(name, gene_counts, args.steps, device, dtype, variants, args.cpu_batch)
    print()
    print(table(rows))

    def get(config, impl, attention):
        return next(r for r in rows if r["config"] == config and r["impl"] == impl and r["attention"] == attention)

    result = {"device": str(device), "dtype": str(dtype), "rows": rows}
    main_cfg = "51m" if "51m" in args.configs.split(",") else args.configs.split(",")[-1]
    result["speedup_vs_naive"] = (
        get(main_cfg, "ours", "plain")["cells_per_s"] / get(main_cfg, "naive", "plain")["cells_per_s"]
    )
    if not args.no_official_dropout:
        result["speedup_vs_naive_official_attn_dropout"] = (
            get(main_cfg, "ours_official_attn_dropout", "plain")["cells_per_s"]
            / get(main_cfg, "naive", "plain")["cells_per_s"]
        )
    ours_gen, ours_plain = get(main_cfg, "ours", "generative"), get(main_cfg, "ours", "plain")
    result["generative_cost_ratio"] = ours_gen["step_s"] / ours_plain["step_s"]
    result["generative_cost_ratio_paired"] = float(
        np.median([g / p for g, p in zip(ours_gen["step_s_rounds"], ours_plain["step_s_rounds"])])
    )
    result["generative_speedup_vs_naive"] = (
        get(main_cfg, "ours", "generative")["cells_per_s"] / get(main_cfg, "naive", "generative")["cells_per_s"]
    )
    result["summary_config"] = main_cfg
    if device.type == "cuda":
        result["mfu_bf16"] = get(main_cfg, "ours", "plain").get("mfu")
    official = result.get("speedup_vs_naive_official_attn_dropout")
    print(
        f"\n{main_cfg}: speedup_vs_naive {result['speedup_vs_naive']:.2f}x "
        + ("" if official is None else f"(with the official attention dropout: {official:.2f}x), ")
        + f"generative_cost_ratio {result['generative_cost_ratio']:.2f} "
        f"(paired {result['generative_cost_ratio_paired']:.2f}), "
        f"generative vs naive {result['generative_speedup_vs_naive']:.2f}x"
    )
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
