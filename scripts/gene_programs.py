#!/usr/bin/env python
"""Gene programs from a checkpoint's gene embeddings, enriched against gene sets, with a co-expression baseline.

    python scripts/gene_programs.py --checkpoint CKPT --adata A.h5ad --n-hvg 1200 --gmt h.all.v7.5.1.symbols.gmt \\
        --gmt c2.cp.v7.5.1.symbols.gmt --label-key cell_type --out DIR
    python scripts/gene_programs.py --checkpoint CKPT --genes genes.txt --gmt sets.gmt --out DIR

Genes: --genes (one per line), or the --n-hvg most variable vocabulary genes of --adata, or the whole vocabulary.
Gene embeddings (gene encoder + LayerNorm) -> scanpy kNN graph (k 15, Euclidean; --metric cosine) -> Leiden at
--resolutions (seeded; --resolution, default the tutorial's 40, is the one tabulated and scored) -> programs of
>= 5 genes -> hypergeometric enrichment against every --gmt (background: the tested genes; Bonferroni over
programs x terms). With --adata: per-cell program scores (obs "gp_<program>" of DIR/scores.h5ad), the
co-expression baseline through the same steps, and with --label-key a heatmap of program scores over cell types.

DIR: report.md, summary.json, programs.tsv, enrichment.tsv, networks.tsv (within-program cosine networks),
background_genes.txt, scores.h5ad, program_heatmap.png, family_network.png (--family, default HLA-* and CD3D/E/G).
The MSigDB Hallmark and C2:CP files: python -c "from scgpt_train.resources.pypi import fetch_resources;
fetch_resources()" (into .cache/resources/). Input errors exit with status 2.
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
        The options (``--checkpoint``, ``--adata`` or ``--genes``, ``--gmt``, ``--out``, ...; ``--help``).

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
    from scgpt_train.tasks import gene_programs as gp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--genes", type=Path, default=None, help="genes to test, one per line")
    p.add_argument("--adata", type=Path, default=None, help="h5ad: HVGs (without --genes), scores, co-expression")
    p.add_argument("--n-hvg", type=int, default=1200)
    p.add_argument("--gmt", type=Path, action="append", required=True, help="GMT gene sets (repeatable)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--gene-column", default=None, help="var column of --adata with gene symbols")
    p.add_argument("--use-raw", action="store_true", help="read .raw of --adata")
    p.add_argument("--label-key", default=None, help="obs column of --adata with cell types (heatmap)")
    p.add_argument("--resolutions", default=",".join(f"{r:g}" for r in gp.DEFAULT_RESOLUTIONS))
    p.add_argument("--resolution", type=float, default=gp.OFFICIAL_RESOLUTION, help="the tabulated resolution")
    p.add_argument("--k", type=int, default=15, help="neighbours of the gene graph (scanpy default 15)")
    p.add_argument("--metric", default="euclidean", choices=("euclidean", "cosine"))
    p.add_argument("--min-genes", type=int, default=gp.MIN_PROGRAM_GENES)
    p.add_argument("--min-term-genes", type=int, default=gp.MIN_TERM_GENES)
    p.add_argument("--alpha", type=float, default=gp.ALPHA)
    p.add_argument("--family", default=gp.DEFAULT_FAMILY, help="regex of the gene family drawn as a network")
    p.add_argument("--network-threshold", type=float, default=0.3, help="cosine of the family network's edges")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    params = gp.GeneProgramParams(
        n_hvg=args.n_hvg,
        resolutions=tuple(float(r) for r in args.resolutions.split(",") if r.strip()),
        resolution=args.resolution,
        n_neighbors=args.k,
        metric=args.metric,
        min_genes=args.min_genes,
        min_term_genes=args.min_term_genes,
        alpha=args.alpha,
        family=args.family,
        network_threshold=args.network_threshold,
        seed=args.seed,
    )
    with output_or_nothing(args.out):  # a refused or failed run leaves no half-written --out
        summary = gp.run_gene_programs(
            args.checkpoint,
            args.gmt,
            args.out,
            params,
            genes_file=args.genes,
            adata_path=args.adata,
            gene_column=args.gene_column,
            use_raw=args.use_raw,
            label_key=args.label_key,
        )
    for r in summary["per_resolution"]:
        print(
            f"{r['method']:>12} resolution {r['resolution']:>5g}: {r['n_programs']:3d} programs, "
            f"{r['n_programs_enriched']:3d} enriched, {r['n_terms_enriched']:3d} terms"
        )
    print(
        f"terms enriched: {len(summary['terms_shared'])} shared, {len(summary['terms_only_scgpt'])} only gene "
        f"embeddings, {len(summary['terms_only_coexpression'])} only co-expression"
    )
    print(f"wrote {summary['out_dir']}/report.md")
    return 0


if __name__ == "__main__":
    from data_modules.atomic import exit_with

    exit_with(main())  # sys.exit, without HDF5's crash at exit after a full disk
