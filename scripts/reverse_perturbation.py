#!/usr/bin/env python
"""Reverse perturbation: rank candidate perturbations for the held-out conditions' real cells (scGPT paper).

    python scripts/reverse_perturbation.py --checkpoint CKPT --data perturb_processed.h5ad \
        --split RUN_DIR/split.json --out DIR [--n-genes 20] [--pool-size 40] [--neighbors 10] \
        [--direction up|down|abs] [--queries test|val|test+val] [--seed 0]

CKPT: a fine-tuned perturbation model (Lightning .ckpt of a finetune_perturbation_* run, an imported .pt or an
official directory). --split: the split the model was trained with (split.json in its run dir), so the query
conditions were not trained on. Candidates: every single and pair of the --n-genes genes occurring most in the
train + test conditions (210 for 20); each candidate is predicted from --pool-size seeded control cells; each query
cell votes for the candidates of its --neighbors nearest predicted cells. --direction: how the oracle baseline
reads the targets' own expression (up for CRISPRa such as Norman, down for CRISPRi / knock-down, abs).

DIR gets report.md (correct@K / relevant@K for the model, its retrieval with the candidate genes masked, the
top-DE, oracle and random baselines, and the analytic chance levels), reverse_results.csv, per_query.csv,
rankings.json and reverse_topk.png. Input errors exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, help="GEARS-format perturb_processed.h5ad")
    p.add_argument("--split", required=True, type=Path, help="the split JSON the model was trained with")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n-genes", type=int, default=20)
    p.add_argument("--pool-size", type=int, default=40)
    p.add_argument("--neighbors", type=int, default=10)
    p.add_argument("--direction", choices=("up", "down", "abs"), default="abs")
    p.add_argument("--queries", choices=("test", "val", "test+val"), default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the command line ``argv`` (None: ``sys.argv``); returns the exit status.

    Parameters
    ----------
    argv : list of str, optional
        The options (``--checkpoint``, ``--data``, ``--split``, ``--out``, ...; ``--help``).

    Returns
    -------
    int
        0, or 2 for an input the run refuses (the message on stderr names the file, condition or gene).
    """
    args = parse(argv)
    import torch

    from data_modules.perturbation import PerturbationDataError, PerturbationSplit, read_gears
    from data_modules.perturbation.inputs import PerturbationInputError
    from scgpt_train.tasks.perturbation.predict import PredictionInputError, load_predictor
    from scgpt_train.tasks.perturbation.reverse_run import reverse_perturbation, write_outputs

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, vocab = load_predictor(args.checkpoint)
        data = read_gears(args.data)
        split = PerturbationSplit.load(args.split)
        result = reverse_perturbation(
            model.to(device), vocab, data, split, args.queries, args.n_genes, args.pool_size, args.neighbors,
            args.direction, args.seed, args.batch_size, device=device,
        )  # fmt: skip
    except (PredictionInputError, PerturbationInputError, PerturbationDataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = write_outputs(result, args.out, "Reverse perturbation", [f"Model: {args.checkpoint}; data: {args.data}."])
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
