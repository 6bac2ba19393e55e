#!/usr/bin/env python
"""Download the scGPT paper's benchmark datasets and the whole-human checkpoint.

    python scripts/download_benchmarks.py ms myeloid hpancreas scgpt_human
    python scripts/download_benchmarks.py --list
    python scripts/download_benchmarks.py --verify ms          # re-hash against checksums.json
    python scripts/download_benchmarks.py ms --mirror http://host/scgpt   # <mirror>/<name>/<file>

Files land in ROOT/<name>/ (ROOT: --root, default $SCGPT_CACHE/benchmarks or .cache/benchmarks, where the
finetune_* experiments look). Interrupted downloads resume; sha256 is recorded in ROOT/checksums.json on
first download and verified on every later run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scgpt_train.resources.download import REGISTRY, DownloadError, download  # noqa: E402


def main(argv=None) -> int:
    """Download the datasets the command line ``argv`` (None: ``sys.argv``) names; returns the exit status.

    Parameters
    ----------
    argv : list of str, optional
        The dataset names (``all``; none: the list of known ones) and the options (``--root``, ``--mirror``,
        ``--verify``, ...; ``--help``).

    Returns
    -------
    int
        0, or 1 when a name is unknown or a download or checksum failed (the message on stderr says which).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"datasets: {', '.join(REGISTRY)} (or 'all')")
    default_root = Path(os.environ.get("SCGPT_CACHE", ROOT / ".cache")) / "benchmarks"
    parser.add_argument("--root", type=Path, default=default_root, help=f"download root (default {default_root})")
    parser.add_argument(
        "--mirror",
        default=os.environ.get("SCGPT_DOWNLOAD_MIRROR"),
        help="base URL (or directory) serving <name>/<file> instead of the public locations",
    )
    parser.add_argument("--force", action="store_true", help="download again even if the file exists")
    parser.add_argument("--verify", action="store_true", help="only verify existing files against checksums.json")
    parser.add_argument("--list", action="store_true", help="list the known datasets")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.list or not args.names:
        for e in REGISTRY.values():
            print(f"{e.name:14s} {e.kind:13s} {', '.join(e.files):45s} {e.description}")
        return 0
    names = list(REGISTRY) if args.names == ["all"] else args.names
    try:
        download(
            names, args.root, mirror=args.mirror, force=args.force, verify_only=args.verify, progress=not args.quiet
        )
    except (DownloadError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
