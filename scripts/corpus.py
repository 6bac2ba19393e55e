"""Inspect a corpus: `corpus.py info DIR`, `corpus.py verify DIR` (`--write-checksums` adds per-block checksums
to a corpus written before them), `corpus.py export DIR --cells 0:1000 --out x.h5ad`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_modules.store.cli import corpus_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(corpus_main())
