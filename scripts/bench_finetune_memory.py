"""Peak memory of an own-data annotation fine-tune on a CPU at the paper's layout (issue #27 item 3).

    python scripts/bench_finetune_memory.py [--cells 1000] [--variants recipe,one_pass_32,recipe_bf16]
                                            [--train-cells 64] [--out DIR] [--checkpoint CKPT] [--json PATH]

Real cells: celltypist's raw-count sample (559 cells, all their genes: ~1,900 expressed genes a cell on average,
up to ~5,900, so most cells fill much of the 3,001-token layout and the longest keep a random 3,000), drawn with
replacement up to ``--cells`` cells (fresh names), labelled by k-means (6 clusters) of their log-normalized PCA
coordinates (the memory depends on the cells' lengths and the model, not on what the labels mean). The pretrained
model is the ``make train`` demo pretraining (4 layers, d 128; trained on first use, ~2.5 min on 2 idle cores) or
``--checkpoint``.

Each variant runs ``python train.py experiment=finetune_annotation`` (the paper's layout, ``max_seq_len`` 3,001)
in its own process for one short epoch: ``--train-cells`` training cells (64: the recipe's 2 optimizer steps of
32 cells, as 16 micro-batches of 4), 4 validation batches, then the task's predictions on a 10% query hold-out
and its report. The figure is the process' peak resident memory (``ru_maxrss`` of that child, from
``os.wait4``; dataloader workers are separate, smaller processes):

- ``recipe``: the recipe as shipped (micro-batches of 4 cells, 8 accumulated: 32 cells a step; validation and
  prediction batches of 16);
- ``one_pass_32``: the layout before issue 27 (32 cells in one pass, validation batches of 64): what the issue
  measured at 5-6 GB;
- ``recipe_bf16``: the recipe with ``trainer=cpu_bf16``;
- ``recipe_glibc_dynamic``: the recipe with glibc's dynamic mmap threshold (``malloc_mmap_threshold=null``), as
  before the framework fixed it at 1 MiB (scgpt_train/heap.py).

Prints a table (peak RSS, wall time, the ratio to the ``recipe`` row); ``--json`` writes the numbers. Wall times
depend on the load; the memory does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name -> (overrides, cells a training micro-batch holds)
    "recipe": ([], 4),
    "one_pass_32": (["data.batch_size=32", "data.val_batch_size=64", "trainer.accumulate_grad_batches=1"], 32),
    "recipe_bf16": (["trainer=cpu_bf16"], 4),
    "recipe_glibc_dynamic": (["malloc_mmap_threshold=null"], 4),
}


def real_cells(n_cells: int, path: Path, seed: int = 0) -> dict:
    """celltypist's sample drawn with replacement to ``n_cells`` cells, k-means labels; written to ``path``."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc
    from sklearn.cluster import KMeans

    from data_modules.demo import celltypist_adata

    base = celltypist_adata()
    norm = base.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.pca(norm, n_comps=20, random_state=seed)
    labels = KMeans(6, n_init=10, random_state=seed).fit_predict(norm.obsm["X_pca"])
    rows = np.random.default_rng(seed).choice(base.n_obs, size=n_cells, replace=n_cells > base.n_obs)
    adata = ad.AnnData(
        X=base.X[rows],
        obs=pd.DataFrame(
            {"cell_type": [f"cluster_{k}" for k in labels[rows]]}, index=[f"cell{i:05d}" for i in range(n_cells)]
        ),
        var=base.var.copy(),
    )
    adata.write_h5ad(path)
    genes = np.diff(adata.X.indptr)
    return {"cells": n_cells, "genes_per_cell_mean": float(genes.mean()), "genes_per_cell_max": int(genes.max())}


def run_variant(name: str, data: Path, checkpoint: str, out: Path, train_cells: int = 64) -> dict:
    """One fine-tune in its own process over ``train_cells`` training cells; its peak RSS (``os.wait4``) and wall
    time."""
    overrides, micro = VARIANTS[name]
    short_epoch = ["trainer.max_epochs=1", f"++trainer.limit_train_batches={max(1, train_cells // micro)}"]
    cmd = [
        sys.executable, str(ROOT / "train.py"), "experiment=finetune_annotation", f"pretrained={checkpoint}",
        f"data.path={data}", "data.query_fraction=0.1", "task.umap=false", f"hydra.run.dir={out / name}",
        *short_epoch, "++trainer.limit_val_batches=4", *overrides,
    ]  # fmt: skip
    log = out / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"variant {name} failed (exit {code}); its log: {log}")
    return {"variant": name, "overrides": overrides, "peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    """Run the variants and print the table.

    Parameters
    ----------
    argv
        Command-line arguments (default: ``sys.argv[1:]``): ``--cells``, ``--variants``, ``--out``,
        ``--train-cells``, ``--checkpoint``, ``--json``.
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=1000, help="cells in the fine-tuning file (train + val + query)")
    ap.add_argument("--variants", default="recipe,one_pass_32,recipe_bf16", help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench_finetune_memory"), help="work directory")
    ap.add_argument("--train-cells", type=int, default=64, help="training cells of the short epoch (2 steps of 32)")
    ap.add_argument("--checkpoint", default=None, help="pretrained checkpoint (default: the demo pretraining)")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or args.cells < 50:
        ap.error(f"unknown variants {unknown} (known: {list(VARIANTS)})" if unknown else "--cells must be >= 50")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is None:
        from scgpt_train.demo_run import demo_checkpoint

        args.checkpoint = str(demo_checkpoint())
    data = out / f"cells_{args.cells}.h5ad"
    cells = real_cells(args.cells, data)
    print(
        f"{cells['cells']:,} real cells (celltypist's sample, drawn with replacement), "
        f"{cells['genes_per_cell_mean']:,.0f} expressed genes a cell on average (max {cells['genes_per_cell_max']:,}); "
        "layout max_seq_len 3,001; "
        f"{os.cpu_count()} CPU cores, 1-min load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows = []
    for name in names:
        rows.append(run_variant(name, data, args.checkpoint, out, args.train_cells))
        print(f"  {name}: peak RSS {rows[-1]['peak_rss_mb']:,.0f} MB, {rows[-1]['wall_s']:.0f} s", flush=True)
    base = next((r["peak_rss_mb"] for r in rows if r["variant"] == "recipe"), rows[0]["peak_rss_mb"])
    print("\n| variant | overrides | peak RSS | vs recipe | wall (one short epoch) |\n|---|---|---|---|---|")
    for r in rows:
        over = " ".join(r["overrides"]) or "(the recipe)"
        print(
            f"| {r['variant']} | {over} | {r['peak_rss_mb']:,.0f} MB | {r['peak_rss_mb'] / base:.2f}x | "
            f"{r['wall_s']:.0f} s |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"cells": cells, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
