#!/usr/bin/env python
"""Predict perturbed cells from control cells with a fine-tuned scGPT perturbation model.

    python scripts/predict_perturbation.py --checkpoint PATH --controls CTRL.h5ad \
        --conditions A+ctrl A+B ... [--pool-size N|all] [--seed S] --out OUT.h5ad

PATH: an official scGPT perturbation directory (best_model.pt + args.json + vocab.json), a file from
scripts/import_scgpt.py, or a Lightning .ckpt of a finetune_perturbation_* run. CTRL.h5ad: log-normalized
control cells in GEARS layout (var["gene_name"]; when obs["condition"] exists only its 'ctrl' cells are used).
Conditions in GEARS spelling: A+ctrl (or just A) for a single gene, A+B for a pair; every gene must be one
of CTRL's genes.

OUT.h5ad: one row per (condition, pool cell) - obs["condition"] (canonical name), obs["control_cell"] (the
control cell it was predicted from), X the predicted log1p expression over CTRL's genes, and
uns["perturbation_prediction"] with the pool size, seed and settings. The mean over a condition's rows with
--pool-size all is the official tutorial's predict(). Input errors (unknown condition gene, no ctrl cells,
non-log data) exit with status 2 and name the condition / gene / file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pool_size(text: str):
    if text == "all":
        return "all"
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pool-size must be a positive integer or 'all', got {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"--pool-size must be a positive integer or 'all', got {n}")
    return n


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--controls", required=True, type=Path, help="log-normalized control cells (GEARS layout)")
    p.add_argument("--conditions", required=True, nargs="+", help="e.g. KLF1+ctrl KLF1+MAP2K6")
    p.add_argument("--pool-size", type=pool_size, default="all", help="control cells per condition: N or all")
    p.add_argument("--seed", type=int, default=0, help="seed of the pool draw (--pool-size N)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--gene-column", default="gene_name", help="var column with gene names (default gene_name)")
    p.add_argument(
        "--include-zero-genes", choices=("all", "batch-wise"), default="all",
        help="all genes (official default) or only genes non-zero in some control cell of the batch",
    )  # fmt: skip
    p.add_argument(
        "--drop-perturbed-zero-genes", action="store_true",
        help="with batch-wise: drop a perturbed gene that is zero in every control of the batch (official)",
    )  # fmt: skip
    p.add_argument(
        "--unknown-genes", choices=("pad", "mask", "error"), default="pad",
        help="genes outside the checkpoint's vocabulary: <pad> token (official), masked out, or refused",
    )  # fmt: skip
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the command line ``argv`` (None: ``sys.argv``); returns the exit status.

    Parameters
    ----------
    argv : list of str, optional
        The options (``--checkpoint``, ``--controls``, ``--conditions``, ``--out``, ...; ``--help``).

    Returns
    -------
    int
        0, or 2 for an input the run refuses (an unknown condition gene, no control cells, non-log data; the
        message on stderr names the condition, gene or file).
    """
    args = parse(argv)
    from scgpt_train.errors import UserInputError
    from scgpt_train.tasks.perturbation.predict import predict_h5ad

    try:
        pred = predict_h5ad(
            args.checkpoint, args.controls, args.conditions, args.out, args.pool_size, args.seed, args.batch_size,
            args.include_zero_genes, not args.drop_perturbed_zero_genes, args.unknown_genes, args.gene_column,
            args.device,
        )  # fmt: skip
    except (UserInputError, FileNotFoundError) as e:  # every refusal of an input (scgpt_train.errors)
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = pred.uns["perturbation_prediction"]
    print(
        f"wrote {args.out}: {pred.n_obs} predicted cells = {len(info['conditions'])} conditions x "
        f"{info['pool_size']} control cells, {pred.n_vars} genes ({info['n_genes_not_in_vocab']} not in the vocabulary)"
    )
    return 0


if __name__ == "__main__":
    from data_modules.atomic import exit_with

    exit_with(main())  # sys.exit, without HDF5's crash at exit after a full disk
