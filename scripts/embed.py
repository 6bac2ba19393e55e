#!/usr/bin/env python
"""Zero-shot (or fine-tuned) cell embeddings of an h5ad with an scGPT checkpoint.

    python scripts/embed.py --checkpoint CKPT --input in.h5ad --output out.h5ad

CKPT: an official scGPT directory (best_model.pt + args.json + vocab.json), a file from
scripts/import_scgpt.py, or a Lightning .ckpt of this project. Genes are matched to the checkpoint's
vocabulary by var_names (or --gene-column) in the key the vocabulary uses: Ensembl ids in front of a symbol
vocabulary (or the reverse) are mapped through a var column of the right kind (gene_symbols, gene_names,
feature_name / gene_ids, feature_id) or, without one, the GENCODE v44 id table shipped with celltypist
(--gene-table for another); the mapping and the lost genes are reported. The output is the input AnnData
(same obs_names) with obsm[--key] (L2-normalized cell embeddings, as the official tutorials use them;
--no-normalize keeps them raw) and, when the checkpoint has a classifier, obs["scgpt_pred"] (class index)
and obs["scgpt_pred_prob"].

Cells are sorted by length into batches of at most --max-tokens tokens and run packed (no cell padded to another's
length), the model in inference mode at --precision: auto runs bf16 autocast where the processor computes bf16
natively (a CUDA GPU that supports it; a CPU with AMX or AVX-512 BF16, read from /proc/cpuinfo) and fp32 elsewhere,
and prints what it chose and why. The output keeps the input's cell order and obs_names.

Cells that express no gene of the checkpoint's vocabulary have nothing for the model to read: they are
reported (count and a few obs names) and get NaN embeddings (prediction -1), or are left out of the output
with --drop-unmapped-cells. An input with no cells, NaN / inf values (the error names the cell and gene),
or options that do not fit the file exit with status 2.
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
        The options (``--checkpoint``, ``--input``, ``--output``, ``--precision``, ...; ``--help``).

    Returns
    -------
    int
        0, or 2 for an input the run refuses (no cells, NaN / inf, options that do not fit the file; the message on
        stderr names the file, cell or gene and the fix).
    """
    from scgpt_train.errors import UserInputError

    try:
        return run(argv)
    except UserInputError as e:  # every refusal of an input (scgpt_train.errors)
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(argv=None) -> int:
    from scgpt_train.inference_batches import CPU_MAX_TOKENS, DEFAULT_MAX_TOKENS
    from scgpt_train.precision import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--key", default="X_scgpt", help="obsm key of the embedding (default X_scgpt)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help=f"tokens per batch (cells sorted by length, packed; default {CPU_MAX_TOKENS:,} on a CPU, "
        f"{DEFAULT_MAX_TOKENS:,} on a GPU)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="at most this many cells per batch (default: no cap)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto (bf16 autocast where the hardware has native bf16, else fp32), fp32, or bf16 (default auto)",
    )
    p.add_argument(
        "--max-seq-len", type=int, default=None, help="genes per cell + <cls> (default: the checkpoint's layout)"
    )
    p.add_argument("--include-zero-genes", action="store_true", help="also feed zero-expressed genes (bin 0)")
    p.add_argument("--gene-column", default=None, help="var column with gene symbols (default var_names)")
    p.add_argument(
        "--gene-table",
        default=None,
        help="CSV/TSV Ensembl id -> symbol (feature_id, feature_name columns, or headerless id,name) used when the "
        "input's gene ids are not the vocabulary's (default: the GENCODE v44 table shipped with celltypist)",
    )
    p.add_argument(
        "--prefer-gene-column",
        action="store_true",
        help="an input with Ensembl ids and a symbol column that disagree (checked against the id table) uses the "
        "column's symbols (default: the ids decide)",
    )
    p.add_argument("--use-raw", action="store_true", help="read .raw instead of X")
    p.add_argument(
        "--species",
        default=None,
        help="the cells' species (human, mouse, rhesus, cynomolgus, pig; default: detected from the gene names); "
        "another species than the checkpoint's maps through one-to-one orthologs (docs/finetuning.md)",
    )
    p.add_argument("--batch-key", default=None, help="obs column with batches (models with DSBN / batch labels)")
    p.add_argument("--cls-value", type=float, default=None, help="value at <cls> (default: the pad value, -2)")
    p.add_argument("--no-normalize", action="store_true", help="write raw (not L2-normalized) embeddings")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tie-breaking in binning and gene sampling")
    p.add_argument(
        "--drop-unmapped-cells",
        action="store_true",
        help="leave cells with no gene in the checkpoint's vocabulary out of the output (default: NaN embeddings)",
    )
    args = p.parse_args(argv)
    for name in ("max_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive number, got {value}")

    from scgpt_train.inference import embed_h5ad

    out = embed_h5ad(
        args.checkpoint,
        args.input,
        args.output,
        key=args.key,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        include_zero_genes=args.include_zero_genes,
        gene_column=args.gene_column,
        gene_table=args.gene_table,
        use_raw=args.use_raw,
        batch_key=args.batch_key,
        cls_value=args.cls_value,
        normalize=not args.no_normalize,
        device=args.device,
        seed=args.seed,
        drop_unmapped_cells=args.drop_unmapped_cells,
        species=args.species,
        precision=args.precision,
        max_tokens="auto" if args.max_tokens is None else args.max_tokens,
        prefer_gene_column=args.prefer_gene_column,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from data_modules.atomic import exit_with

    exit_with(main())  # sys.exit, without HDF5's crash at exit after a full disk
