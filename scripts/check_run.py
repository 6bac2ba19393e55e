#!/usr/bin/env python
"""Check a run dir without changing it: its checkpoints (global step, loadable or corrupt), the one a rerun of the
same command would resume from, the vocabulary the checkpoints carry and whether the run finished.

    python scripts/check_run.py outputs/my_demo
    python scripts/check_run.py outputs/my_demo --corpus corpora/mine   # also: does the corpus' vocabulary match?

Exit status 0 when a rerun would resume cleanly (or start fresh with nothing to lose), 1 when something is wrong
(corrupt checkpoints, a vocabulary that differs from --corpus).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from data_modules.store.reader import Corpus
    from scgpt_train.fault_tolerance import scan_checkpoints
    from scgpt_train.pipeline import checkpoint_vocab

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run dir (hydra.run.dir) holding checkpoints/")
    parser.add_argument("--corpus", type=Path, help="a corpus to check the checkpoints' vocabulary against")
    args = parser.parse_args(argv)
    if not (args.run_dir / "checkpoints").is_dir():
        print(f"error: {args.run_dir} has no checkpoints/ directory: not a run dir of this project", file=sys.stderr)
        return 1
    valid, corrupt = scan_checkpoints(args.run_dir)
    ok = not corrupt
    for step, path in valid:
        print(f"ok       step {step:>9,}  {path}")
    for path in corrupt:
        print(f"CORRUPT                   {path}  (a rerun moves it aside to {path.name}.corrupt)")
    if valid:
        print(f"a rerun of the same command resumes from {valid[0][1]} (step {valid[0][0]:,})")
    else:
        print("no loadable checkpoint: a rerun starts from scratch")
    summary = args.run_dir / "summary.json"
    if summary.is_file():
        print(f"finished: summary.json says {json.loads(summary.read_text()).get('steps')} steps")
    if valid and args.corpus is not None:
        vocab = checkpoint_vocab(valid[0][1])
        diff = None if vocab is None else vocab.difference(Corpus(args.corpus).vocab, ("the checkpoint", "the corpus"))
        if vocab is None:
            print("the checkpoint stores no vocabulary: cannot compare it with the corpus")
        elif diff:
            print(f"VOCABULARY differs from {args.corpus}: {diff}")
            ok = False
        else:
            print(f"vocabulary: the same {len(vocab):,} tokens as {args.corpus}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
