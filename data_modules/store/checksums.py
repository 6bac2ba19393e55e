"""Adding per-block checksums to a corpus written before them (``corpus.py verify --write-checksums``).

Each shard whose manifest entry lacks ``"checksums"`` is first checked against its sha256 in the manifest (a shard
already damaged is never sealed as good), then rewritten with the same arrays and dtypes plus the digest of every
block (``write_shard(checksums=True)``, atomically) and its manifest entry updated; the manifest is rewritten after
every shard, so a killed run leaves a corpus that reads and a rerun continues. Holds the corpus lock (store/lock.py)
throughout, like a build. ``on=False`` does the reverse (the benchmark measures the cost with it; tests make a
corpus in the older layout with it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import h5py

from data_modules.store.format import (
    CHECKSUM,
    DATA,
    INDICES,
    INDPTR,
    MANIFEST_NAME,
    OBS_GROUP,
    SOURCE_ROW,
    CorpusFormatError,
    file_sha256,
)
from data_modules.store.lock import exclusive_lock
from data_modules.store.writer import write_manifest, write_shard


def set_checksums(root: str | os.PathLike, on: bool = True, log: Callable[[str], None] | None = None) -> int:
    """Rewrite every shard of ``root`` whose checksum state differs from ``on``; returns how many were rewritten."""
    root = Path(root)
    log = log or (lambda msg: None)
    with exclusive_lock(root, "corpus", log):
        manifest_path = root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise CorpusFormatError(f"{root} is not a corpus: {MANIFEST_NAME} is missing")
        manifest = json.loads(manifest_path.read_text())
        done = 0
        for i, entry in enumerate(manifest["shards"]):
            if (entry.get("checksums") == CHECKSUM) == on:
                continue
            path = root / entry["path"]
            if file_sha256(path) != entry["sha256"]:
                raise CorpusFormatError(
                    f"shard {i} ({path}): its sha256 differs from the manifest (corrupted bytes), so no checksums "
                    "were written for it; restore the shard or rebuild the corpus"
                )
            with h5py.File(path, "r") as f:
                arrays = [f[INDPTR][:], f[INDICES][:], f[DATA][:], {k: f[OBS_GROUP][k][:] for k in f[OBS_GROUP]}]
                rows = f[SOURCE_ROW][:]
            new = write_shard(path, *arrays, allow_float=True, source_row=rows, exact_dtypes=True, checksums=on)
            entry.update({k: new[k] for k in ("bytes", "sha256")})
            if on:
                entry["checksums"] = CHECKSUM
            else:
                entry.pop("checksums", None)
            write_manifest(root, manifest)
            done += 1
            log(f"shard {i} ({path}): {'checksums written' if on else 'checksums removed'}")
        return done
