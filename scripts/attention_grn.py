#!/usr/bin/env python
"""Attention-based gene regulatory network: top-K target genes of source genes (TFs) from a checkpoint's
last-layer attention, checked against a TF-target resource next to expression-matched random, co-expression and
differential-expression baselines.

    # perturbation data (GEARS h5ad: obs "condition" ctrl / GENE+ctrl, var "gene_name"): the three settings
    python scripts/attention_grn.py --checkpoint CKPT --adata adamson.h5ad --condition-key condition \\
        --source BHLHE40 --source DDIT3 --tf-targets .cache/resources/collectri_tf_targets.tsv --out DIR
    # any AnnData: the control setting over all its cells, every resource TF of the panel as a source
    python scripts/attention_grn.py --checkpoint CKPT --adata pbmc.h5ad \\
        --tf-targets .cache/resources/collectri_tf_targets.tsv --out DIR

Scores: the last layer's q.k^T per head (unscaled, no softmax as the official tutorial; --softmax), rank
normalization by row then by column (--no-rank to skip), the mean over heads, the mean over EVERY cell of a
condition (the official loop drops each condition's first cell; docs/grn.md). Settings (--setting, repeatable):
control (A_ctrl[:, s]), perturbed (A_pert[:, s]), difference (A_pert - A_ctrl); s = the source gene's column
(--direction row: its row). The panel: --genes (one per line) or the --max-genes (1,200) highest-mean vocabulary
genes of --adata; every cell reads all of them (zeros too). Inputs: <cls> + binned values for pretrained models,
values as stored + perturbation flags for perturbation models (--input-style auto picks by the checkpoint).

DIR: report.md, summary.json, summary.tsv (source x setting x method: overlap, expected, hypergeometric p,
random mean / empirical p), targets.tsv (the top-K lists), grn_precision.png, grn_network.png,
attention_maps.npz (--save-maps). CollecTRI TF-target edges: python -c "from scgpt_train.resources.pypi import
fetch_tf_targets; fetch_tf_targets()". Input errors exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    """Run the command line ``argv`` (None: ``sys.argv``); returns the exit status.

    Parameters
    ----------
    argv : list of str, optional
        The options (``--checkpoint``, ``--adata``, ``--tf-targets``, ``--out``, ...; ``--help``).

    Returns
    -------
    int
        0, or 2 for an input the run refuses (the message on stderr names the file, gene or key and the fix).
    """
    from scgpt_train.errors import UserInputError

    try:
        return run(argv)
    except UserInputError as e:  # every refusal of an input (scgpt_train.errors)
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(argv=None) -> int:
    from data_modules.atomic import output_or_nothing
    from scgpt_train.tasks import attention_grn as ag
    from scgpt_train.tasks.reference_map import peak_rss_mib

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--adata", required=True, type=Path, help="h5ad of the cells (GEARS files: var gene_name)")
    p.add_argument("--tf-targets", required=True, type=Path, help="TSV with source / target columns")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--source", action="append", default=None, help="source gene (repeatable; default: every TF)")
    p.add_argument("--min-targets", type=int, default=3, help="without --source: TFs with >= this many targets")
    p.add_argument("--condition-key", default=None, help="obs column of conditions (ctrl, GENE+ctrl, ...)")
    p.add_argument("--control", default="ctrl", help="the control condition's value")
    p.add_argument("--perturbed", default=None, help="the perturbed condition (one --source; default GENE+ctrl)")
    p.add_argument("--setting", action="append", choices=ag.SETTINGS, default=None)
    p.add_argument("--genes", type=Path, default=None, help="panel genes, one per line")
    p.add_argument("--max-genes", type=int, default=1200)
    p.add_argument("--gene-column", default=None, help="var column with the vocabulary's gene names")
    p.add_argument("--top-k", type=int, default=ag.DEFAULT_TOP_K)
    p.add_argument("--n-random", type=int, default=ag.DEFAULT_N_RANDOM)
    p.add_argument("--layer", type=int, default=-1, help="encoder layer (default the last)")
    p.add_argument("--softmax", action="store_true", help="softmax(q.k^T / sqrt(d)) over keys before ranking")
    p.add_argument("--no-rank", action="store_true", help="skip the row-then-column rank normalization")
    p.add_argument("--direction", choices=("column", "row"), default="column")
    p.add_argument("--input-style", choices=("auto", "cls", "perturbation"), default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-cells", type=int, default=None, help="cells per condition (seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--save-maps", action="store_true", help="write the mean maps per condition")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    genes = None
    if args.genes is not None:
        if not args.genes.is_file():
            raise ag.GRNError(f"--genes {args.genes} does not exist")
        genes = [g.split("#")[0].strip() for g in args.genes.read_text().splitlines()]
        genes = [g for g in genes if g]
    if args.perturbed and (not args.source or len(args.source) != 1):
        raise ag.GRNError("--perturbed names the perturbed condition of one --source; give exactly one --source")
    params = ag.AttentionGRNParams(
        sources=args.source or "auto",
        condition_key=args.condition_key,
        control=args.control,
        perturbed={args.source[0]: args.perturbed} if args.perturbed else None,
        settings=args.setting,
        genes=genes,
        max_genes=args.max_genes,
        gene_column=args.gene_column,
        top=args.top_k,
        n_random=args.n_random,
        min_targets=args.min_targets if not args.source else 1,
        layer=args.layer,
        softmax=args.softmax,
        rank=not args.no_rank,
        direction=args.direction,
        style=args.input_style,
        batch_size=args.batch_size,
        max_cells=args.max_cells,
        seed=args.seed,
        device=args.device,
        save_maps=args.save_maps,
        progress=not args.no_progress,
    )
    with output_or_nothing(args.out):  # a refused or failed run leaves no half-written --out
        summary = ag.run_attention_grn(args.checkpoint, args.adata, args.tf_targets, args.out, params)
    print(summary["report"].split("\n## Per source gene")[0])
    times = ", ".join(f"{k} {v:.1f} s" for k, v in summary["timings_s"].items())
    print(f"timings: {times}")
    print(f"peak RSS: {peak_rss_mib():.0f} MiB (VmHWM: this process only)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from data_modules.atomic import exit_with

    exit_with(main())  # sys.exit, without HDF5's crash at exit after a full disk
