"""Build a sharded corpus: `build_corpus.py h5ad INPUT... --out DIR` or `build_corpus.py census --out DIR`.

See docs/corpus_format.md; all logic lives in data_modules.store.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_modules.store.cli import build_main  # noqa: E402

if __name__ == "__main__":
    from data_modules.atomic import exit_with

    exit_with(build_main())  # sys.exit, without HDF5's crash at exit after a full disk
