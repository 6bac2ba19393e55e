"""Integrity checks a training run makes when it opens a corpus, before it reads a cell.

``check_shard_files``: every shard the run will read exists and has the size the manifest records
(one ``stat`` per shard) and vocab.json has the manifest's sha256 (one small file): always on. Each shard's data is
also checked block by block on every read (format.CHECKSUM, in ``Corpus.read_spans``). ``verify_checksums``:
the manifest against its own digest and the sha256 of every such shard against the
manifest (``data.verify=true``; default for ``experiment=pretrain_33m``), remembered per shard by
(size, mtime) in ``<corpus>/.verified.json`` so a restarted job does not hash terabytes again; a
shard rewritten since is hashed anew. Both name the shard and point to ``scripts/corpus.py verify``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from data_modules.atomic import write_json_atomic
from data_modules.store.format import (
    MANIFEST_DIGEST,
    MANIFEST_NAME,
    VERIFIED_CACHE,
    CorpusFormatError,
    file_sha256,
    manifest_digest,
)
from data_modules.store.reader import Corpus

log = logging.getLogger(__name__)


def _damaged(corpus: Corpus, shard: int, what: str) -> CorpusFormatError:
    return CorpusFormatError(
        f"shard {shard} of {corpus.root} ({corpus.shard_path(shard)}): {what}. Nothing was trained. Check the whole "
        f"corpus with `python scripts/corpus.py verify {corpus.root}`, then restore the shard or rebuild the corpus."
    )


def metadata_problems(corpus: Corpus, manifest_too: bool) -> list[str]:
    """What is wrong with the files beside the shards: vocab.json against the manifest's sha256, and (with
    ``manifest_too``) the manifest against its own digest, which covers its obs category tables, split and shard
    list. A manifest written before the digest existed is reported by ``corpus.py verify`` as a warning only."""
    problems = []
    m = corpus.manifest
    vocab_path = corpus.root / m.get("vocab", {}).get("path", "vocab.json")
    expected = m.get("vocab", {}).get("sha256")
    if expected and vocab_path.is_file() and file_sha256(vocab_path) != expected:
        problems.append(
            f"{vocab_path}: its sha256 differs from the manifest (the vocabulary file was modified: gene ids would "
            "be read as other genes)"
        )
    if manifest_too and MANIFEST_DIGEST in m and manifest_digest(m) != m[MANIFEST_DIGEST]:
        problems.append(
            f"{corpus.root / MANIFEST_NAME}: its content differs from its {MANIFEST_DIGEST} (the manifest was edited "
            "or damaged: its category tables, split or shard list cannot be trusted)"
        )
    return problems


def check_metadata(corpus: Corpus, manifest_too: bool = False) -> None:
    problems = metadata_problems(corpus, manifest_too)
    if problems:
        raise CorpusFormatError(
            f"{problems[0]}. Nothing was trained. Restore the file or rebuild the corpus; "
            f"`python scripts/corpus.py verify {corpus.root}` checks everything"
        )


def check_shard_files(corpus: Corpus, shards: Iterable[int] | None = None) -> None:
    """vocab.json has the manifest's sha256, and every shard in ``shards`` (all by default) exists with the
    manifest's byte size."""
    check_metadata(corpus)
    for shard in range(corpus.n_shards) if shards is None else shards:
        path, expected = corpus.shard_path(shard), corpus.shards[shard]["bytes"]
        if not path.is_file():
            raise _damaged(corpus, shard, "the file is missing")
        size = path.stat().st_size
        if size != expected:
            raise _damaged(corpus, shard, f"{size:,} bytes, the manifest says {expected:,} (truncated or rewritten)")


def verify_checksums(corpus: Corpus, shards: Iterable[int] | None = None) -> int:
    """The manifest against its own digest, then the sha256 of every shard in ``shards`` against the manifest;
    returns how many shards were hashed (not cached)."""
    check_metadata(corpus, manifest_too=True)
    cache_path = corpus.root / VERIFIED_CACHE
    cache = _read_cache(cache_path)
    hashed = 0
    for shard in range(corpus.n_shards) if shards is None else shards:
        entry, path = corpus.shards[shard], corpus.shard_path(shard)
        stat = path.stat()
        key = entry["path"]
        stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": entry["sha256"]}
        if cache.get(key) == stamp:
            continue
        log.info("verifying sha256 of %s", path)
        if file_sha256(path) != entry["sha256"]:
            cache.pop(key, None)
            _write_cache(cache_path, cache)
            raise _damaged(corpus, shard, "its sha256 differs from the manifest (corrupted bytes)")
        cache[key] = stamp
        hashed += 1
    if hashed:
        _write_cache(cache_path, cache)
    return hashed


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, cache: dict) -> None:
    try:
        write_json_atomic(path, cache)
    except OSError as e:  # a read-only corpus: verified again next time
        log.warning("could not record verified shards in %s (%s); they are hashed again next run", path, e)
