"""Write-then-rename: a file either appears complete or not at all (one mechanism for the project)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success fsync it and rename it over ``path``,
    on any error remove it. ``suffix`` keeps writers that infer the format from the name happy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or ".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Directory version of :func:`atomic_path`: yield an empty temporary sibling directory of ``path`` to fill;
    on success rename it to ``path``, on any error remove it. If ``path`` already exists as a non-empty directory
    when the rename comes, ``replace=False`` keeps it and discards ours (a concurrent builder finished first);
    ``replace=True`` moves the old one aside, renames ours in and deletes the old one (put back if the swap fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    aside = path.with_name(f".{path.name}.replaced-{os.getpid()}")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the finished directory gets ordinary permissions
        yield tmp
        if replace and path.exists():
            os.replace(path, aside)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(aside, path)  # the swap failed: the old directory goes back
                raise
            shutil.rmtree(aside, ignore_errors=True)
            return
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path.is_dir() and any(path.iterdir())):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 1) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=float))
