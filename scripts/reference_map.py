#!/usr/bin/env python
"""Zero-shot reference mapping: label query cells by a kNN vote over a labelled reference in a checkpoint's
cell-embedding space, with HVG+PCA kNN and L1 logistic regression on the same split beside it.

    python scripts/reference_map.py --checkpoint CKPT --reference REF.h5ad --query Q.h5ad \\
        --label-key cell_type --out OUT.h5ad [--k 10] [--index-out DIR]
    python scripts/reference_map.py --checkpoint CKPT --reference corpora/atlas --query Q.h5ad \\
        --label-key cell_type --out OUT.h5ad            # atlas mode: the reference is a corpus directory

Embeddings are the ones scripts/embed.py writes (same checks, tokenization, seeds; L2-normalized). The
output is the query AnnData (same obs_names, all its genes) with obsm["X_scgpt"], obs["ref_pred"] (the
kNN vote), obs["ref_pred_score"] (share of the k neighbours voting for it), obs["ref_knn_dist_min"] /
["ref_knn_dist_mean"] (Euclidean, between unit vectors), obsm["X_scgpt_knn_indices"] (reference rows, or
corpus cell ids) / ["X_scgpt_knn_distances"], the baselines' predictions obs["ref_pred_<baseline>"] and
uns["reference_map"] (index, parameters, timings, and accuracy / macro-F1 per method when the query has
--label-key).

Atlas mode embeds the corpus streaming in one pass with a progress bar; the embeddings are journalled in
chunks under --index-out (default OUT.reference_index/), so a rerun of the same command resumes, and once
the index is saved there a rerun reloads it. Indexes: faiss flat up to --flat-max reference cells, IVF-PQ
above (scikit-learn exact search when faiss-cpu is not installed). Input errors (a missing label key, a
query with no gene in the checkpoint's vocabulary, NaN values, ...) exit with status 2.
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
        The options (``--checkpoint``, ``--reference``, ``--query``, ``--label-key``, ``--out``, ...; ``--help``).

    Returns
    -------
    int
        0, or 2 for an input the run refuses (the message on stderr names the file or key and the fix).
    """
    from scgpt_train.errors import UserInputError

    try:
        return run(argv)
    except UserInputError as e:  # every refusal of an input (scgpt_train.errors)
        print(f"error: {e}", file=sys.stderr)
        return 2


def params_from_args(args: argparse.Namespace):
    """The run's ReferenceMapParams from the parsed options."""
    from scgpt_train.tasks.reference_map import ReferenceMapParams

    baselines = [] if args.baselines in ("", "none") else [b.strip() for b in args.baselines.split(",") if b.strip()]
    return ReferenceMapParams(
        k=args.k,
        index_kind=args.index,
        knn_backend=args.knn_backend,
        flat_max=args.flat_max,
        batch_size=args.batch_size,
        chunk_cells=args.chunk_cells,
        max_seq_len=args.max_seq_len,
        gene_column=args.gene_column,
        gene_table=args.gene_table,
        use_raw=args.use_raw,
        prefer_gene_column=args.prefer_gene_column,
        cls_value=args.cls_value,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        baselines=tuple(baselines),
        n_hvg=args.n_hvg,
        n_pcs=args.n_pcs,
        l1_c_grid=tuple(float(c) for c in args.l1_c_grid.split(",")) if args.l1_c_grid else None,
        baseline_max_cells=args.baseline_max_cells,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


def parser() -> argparse.ArgumentParser:
    """The command line's options."""
    from scgpt_train.tasks import reference_map as rm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--reference", required=True, type=Path, help="labelled reference: .h5ad or a corpus directory")
    p.add_argument("--query", required=True, type=Path, help="query .h5ad")
    p.add_argument("--label-key", required=True, help="obs column (corpus: stored obs column) with the cell types")
    p.add_argument("--out", required=True, type=Path, help="output .h5ad (the query with predictions)")
    p.add_argument("--k", type=int, default=rm.DEFAULT_K, help="neighbours per vote (default 10)")
    p.add_argument(
        "--index-out", type=Path, default=None, help="directory for the index (atlas mode: also the journal)"
    )
    p.add_argument("--index", default="auto", choices=("auto", "flat", "ivfpq"), help="index kind (default auto)")
    p.add_argument("--knn-backend", default="auto", choices=("auto", "faiss", "sklearn"))
    p.add_argument(
        "--flat-max", type=int, default=rm.FLAT_MAX_CELLS, help="largest reference searched with a flat index"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="at most this many cells per embedding batch (default: no cap)"
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="auto (bf16 autocast where the hardware has native bf16, else fp32; printed), fp32 or bf16",
    )
    p.add_argument("--chunk-cells", type=int, default=rm.DEFAULT_CHUNK_CELLS, help="atlas mode: cells per chunk")
    p.add_argument("--max-seq-len", type=int, default=None, help="genes per cell + <cls> (default: the checkpoint's)")
    p.add_argument("--gene-column", default=None, help="var column with gene names (both h5ad files)")
    p.add_argument("--gene-table", default=None, help="Ensembl id -> symbol table (see scripts/embed.py)")
    p.add_argument("--use-raw", action="store_true", help="read .raw of the h5ad files")
    p.add_argument(
        "--prefer-gene-column",
        action="store_true",
        help="with Ensembl ids in var_names: the --gene-column names win over the ids (see scripts/build_corpus.py)",
    )
    p.add_argument("--cls-value", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of binning ties, gene sampling, index training")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--baselines",
        default=",".join(rm.BASELINES),
        help=f"comma-separated, from {','.join(rm.BASELINES)}; 'none' for none",
    )
    p.add_argument("--n-hvg", type=int, default=2000)
    p.add_argument("--n-pcs", type=int, default=50)
    p.add_argument("--l1-c-grid", default=None, help="comma-separated C values (default the paper's 1e-3..1e4)")
    p.add_argument("--baseline-max-cells", type=int, default=rm.BASELINE_MAX_CELLS)
    p.add_argument("--overwrite", action="store_true", help="replace embeddings in --index-out made otherwise")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(argv=None) -> int:
    from scgpt_train.tasks import reference_map as rm

    args = parser().parse_args(argv)

    summary = rm.run_reference_map(
        args.checkpoint, args.reference, args.query, args.label_key, args.out, params_from_args(args),
        index_out=args.index_out,
    )  # fmt: skip
    idx = summary["index"]
    line = f"index: {idx['backend']} {idx['kind']} over {idx['ntotal']} reference cells"
    if summary.get("index_dir"):
        line += f" ({'reloaded from' if idx.get('reloaded') else 'saved to'} {summary['index_dir']})"
    print(line)
    table = rm.results_table(summary)
    if table:
        print(table, end="")
    times = ", ".join(f"{k} {v:.1f} s" for k, v in summary["timings_s"].items())
    print(f"timings: {times}")
    from scgpt_train.tasks.reference_map.common import peak_rss_mib

    print(f"peak RSS: {peak_rss_mib():.0f} MiB (VmHWM: this process only)")
    print(f"wrote {summary['out']}")
    return 0


if __name__ == "__main__":
    from data_modules.atomic import exit_with

    exit_with(main())  # sys.exit, without HDF5's crash at exit after a full disk
