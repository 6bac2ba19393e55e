#!/usr/bin/env python
"""Import an official scGPT checkpoint directory into one scgpt_train checkpoint file.

    python scripts/import_scgpt.py DIR --out CKPT

DIR holds best_model.pt, args.json, vocab.json (any attention layout). CKPT is a torch file
{"format", "model_config", "state_dict", "vocab"} that ``scgpt_train.checkpoints.load_checkpoint`` reads
(and the ``model=from_official`` config fine-tunes from).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scgpt_train.checkpoints import detect_attention_layout, load_official, read_official, save_checkpoint  # noqa


def main(argv=None) -> int:
    """Import the official checkpoint directory the command line ``argv`` (None: ``sys.argv``) names.

    Parameters
    ----------
    argv : list of str, optional
        The official directory (best_model.pt, args.json, vocab.json) and ``--out`` (``--help``).

    Returns
    -------
    int
        0 (the exit status).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", type=Path, help="official directory: best_model.pt, args.json, vocab.json")
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint file (e.g. scgpt_human.pt)")
    args = parser.parse_args(argv)
    sd, _, _ = read_official(args.checkpoint_dir)
    model, vocab = load_official(args.checkpoint_dir, return_vocab=True)
    save_checkpoint(model, vocab, args.out)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config()
    print(f"imported {args.checkpoint_dir} (attention layout: {detect_attention_layout(sd)})")
    print(
        f"  {cfg['n_layers']} layers x d_model {cfg['d_model']}, {cfg['n_heads']} heads, vocab {len(vocab)}, "
        f"{n_params / 1e6:.2f}M parameters"
    )
    print(f"  keys: {model.load_report.summary()}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
