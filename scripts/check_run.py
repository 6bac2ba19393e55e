#!/usr/bin/env python
"""Check a run dir without changing it: its checkpoints (global step, loadable or corrupt), the one a rerun of the
same command would resume from, temp files a killed write left behind, whether a job holds the run dir now, the
vocabulary the checkpoints carry and whether the run finished.

    python scripts/check_run.py outputs/my_demo
    python scripts/check_run.py outputs/my_demo --corpus corpora/mine   # also: does the corpus' vocabulary match?

Exit status 0 when the run finished (summary.json says so) and nothing is wrong; 1 when the run is not finished
(still running, preempted, killed: rerun the same command to resume), or something is wrong (corrupt checkpoints,
a vocabulary that differs from --corpus).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    """Check the run dir the command line ``argv`` (None: ``sys.argv``) names; returns the exit status.

    Parameters
    ----------
    argv : list of str, optional
        The run dir and the options (``--corpus``; ``--help``).

    Returns
    -------
    int
        0 when the run finished and nothing is wrong; 1 when it did not finish or something is wrong (corrupt
        checkpoints, a vocabulary that differs from ``--corpus``).
    """
    from data_modules.store.reader import Corpus
    from scgpt_train.fault_tolerance import leftover_temp_files, scan_checkpoints
    from scgpt_train.pipeline import checkpoint_vocab
    from scgpt_train.run_lock import describe, held_by

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
    for path in leftover_temp_files(args.run_dir):
        size = path.stat().st_size / 1e6
        print(f"LEFTOVER {path}  ({size:.1f} MB, left by a write that was killed; a rerun removes it)")
    if valid:
        print(f"a rerun of the same command resumes from {valid[0][1]} (step {valid[0][0]:,})")
    else:
        print("no loadable checkpoint: a rerun starts from scratch")
    holder = held_by(args.run_dir)
    if holder is not None:
        print(f"IN USE by a running job ({describe(holder) if holder else 'no record yet'})")
    summary_path = args.run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if summary is not None and summary.get("finished", True):  # summaries written before "finished" existed
        print(f"finished: summary.json says {summary.get('steps')} steps")
    else:
        why = summary.get("stop_reason") if summary else "no summary.json: running, or killed before the end"
        print(f"NOT FINISHED: {why}")
        ok = False
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
