"""Write-then-rename: a file either appears complete or not at all (one mechanism for the project).

The finished file gets the permissions an ordinary ``open(path, "w")`` would give it (the mode of the file it
replaces, else ``0666 & ~umask``), not the 0600 of the temporary file. A full disk (ENOSPC / EDQUOT) while the
temporary file is written, synced or renamed raises :class:`DiskFullError` naming the final path, with the
temporary file removed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space left (or quota exceeded) while writing ``path``; what was being written was removed."""

    def __init__(self, path: str | os.PathLike, cause: BaseException | None = None):
        self.path = Path(path)
        super().__init__(
            errno.ENOSPC,
            f"no space left on device while writing {self.path}: free space or choose another location; "
            "the partly written file was removed",
        )
        self.__cause__ = cause


def is_disk_full(exc: BaseException) -> bool:
    """True for an OSError (or one in its cause chain, as h5py raises them) that says the disk or quota is full."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS):
            return True
        if isinstance(exc, OSError) and "No space left on device" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux; else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode(path: Path) -> int:
    """Permissions an ordinary write of ``path`` gives: those of the file it replaces, else 0666 & ~umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~current_umask()


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success fsync it, give it the mode an ordinary write
    would (see module docstring) and rename it over ``path``; on any error remove it. ``suffix`` keeps writers
    that infer the format from the name happy. A full disk raises :class:`DiskFullError` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or ".tmp")
        os.close(fd)
        tmp = Path(name)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, ordinary_mode(path))
        os.replace(tmp, path)
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(path, e) from e
        raise
    finally:
        if tmp is not None:
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
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the finished directory gets ordinary permissions
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
