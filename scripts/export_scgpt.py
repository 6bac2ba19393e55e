#!/usr/bin/env python
"""Export a scgpt_train checkpoint (our .pt file or a Lightning .ckpt) to the official scGPT layout.

    python scripts/export_scgpt.py CKPT --out DIR [--layout released|impl|torch]

Writes DIR/best_model.pt, DIR/args.json, DIR/vocab.json. "released" (default) uses the
``self_attn.Wqkv.*`` names of the released whole-human checkpoint; "torch" uses nn.MultiheadAttention names.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scgpt_train.checkpoints import ATTENTION_LAYOUTS, export_official, load_checkpoint  # noqa: E402


def main(argv=None) -> int:
    """Export the checkpoint the command line ``argv`` (None: ``sys.argv``) names; returns the exit status.

    Parameters
    ----------
    argv : list of str, optional
        The checkpoint and the options (``--out``, ``--layout``, ``--vocab``; ``--help``).

    Returns
    -------
    int
        0 (a checkpoint without a vocabulary and no ``--vocab``: argparse's usage error, status 2).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="scgpt_train .pt file or Lightning .ckpt")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--layout", choices=ATTENTION_LAYOUTS, default="released")
    parser.add_argument("--vocab", type=Path, default=None, help="vocab.json, if the checkpoint has none")
    args = parser.parse_args(argv)
    model, vocab = load_checkpoint(args.checkpoint)
    if args.vocab is not None:
        vocab = json.loads(args.vocab.read_text())
    if vocab is None:
        parser.error(f"{args.checkpoint} carries no vocabulary: pass --vocab vocab.json")
    export_official(model, vocab, args.out, layout=args.layout)
    print(f"exported {args.checkpoint} -> {args.out} (layout {args.layout})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
