"""Write-then-rename: a file either appears complete or not at all (one mechanism for the project).

The finished file gets the permissions an ordinary ``open(path, "w")`` would give it (the mode of the file it
replaces, else ``0666 & ~umask``), not the 0600 of the temporary file. A full disk (ENOSPC / EDQUOT) while the
temporary file is written, synced or renamed raises :class:`DiskFullError` naming the final path, with the
temporary file removed; a directory that cannot be created or written (permissions, a read-only file system) raises
:class:`~data_modules.errors.OutputPathError` naming it. Both are ``UserInputError``s: every entry point refuses them
with its one message and exit 2.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data_modules.errors import UserInputError, refuse_unwritable

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_HDF5_FAILED_WRITE = False  # set when an HDF5 file's write hit a full disk (see exit_with)
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class DiskFullError(OSError, UserInputError):
    """No space left (or quota exceeded) while writing ``path``; what was being written was removed."""

    def __init__(self, path: str | os.PathLike, cause: BaseException | None = None):
        self.path = Path(path)
        super().__init__(
            errno.ENOSPC,
            f"no space left on device while writing {self.path}: free space or choose another location; "
            "the partly written file was removed",
        )
        self.__cause__ = cause

    def __str__(self) -> str:  # the message alone, as every entry point prints it after "error: "
        return self.strerror


def is_disk_full(exc: BaseException) -> bool:
    """True for an OSError (or one in its cause chain, as h5py raises them) that says the disk or quota is full."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS):
            return True
        if "No space left on device" in str(exc) or "errno = 28" in str(exc):  # h5py: RuntimeError on close
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _disk_full_noise(exc: BaseException | None) -> bool:
    text = str(exc)
    return is_disk_full(exc) or "No space left on device" in text or "errno = 28" in text


class _QuietDiskFull:
    """While a write runs: the tracebacks h5py prints when it drops objects of a file it can no longer write
    (Cython reports an error in ``ObjectID.__dealloc__`` through ``sys.excepthook``: "RuntimeError: Can't decrement
    id ref count (file write failed ... No space left on device)", several per failed write) are swallowed; the one
    message a full disk gets is :class:`DiskFullError`'s. Anything else is reported as before."""

    def __enter__(self):
        self.excepthook, self.unraisablehook = sys.excepthook, sys.unraisablehook
        sys.excepthook = lambda t, v, tb: None if _disk_full_noise(v) else self.excepthook(t, v, tb)
        sys.unraisablehook = lambda u: None if _disk_full_noise(u.exc_value) else self.unraisablehook(u)

    def __exit__(self, *exc) -> None:
        sys.excepthook, sys.unraisablehook = self.excepthook, self.unraisablehook


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
    with _QuietDiskFull():
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
                global _HDF5_FAILED_WRITE
                _HDF5_FAILED_WRITE = _HDF5_FAILED_WRITE or (tmp is not None and _is_hdf5(tmp))
                raise DiskFullError(path, e) from e
            refuse_unwritable(e, path)
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        refuse_unwritable(e, path)
        raise
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


@contextmanager
def output_or_nothing(path: str | os.PathLike) -> Iterator[Path]:
    """For an entry point that writes several files into the directory ``path``: when the block fails, ``path`` is
    removed if it did not exist before (a refused or failed run leaves nothing half-written), and a full disk met
    by a writer outside :func:`atomic_path` (``DataFrame.to_csv``, ``np.savez``) becomes :class:`DiskFullError`, a
    directory that cannot be created or written :class:`~data_modules.errors.OutputPathError`."""
    path = Path(path)
    existed = path.exists()
    try:
        yield path
    except BaseException as e:
        if not existed:
            shutil.rmtree(path, ignore_errors=True)
        if not isinstance(e, DiskFullError) and is_disk_full(e):
            raise DiskFullError(getattr(e, "filename", None) or path, e) from e
        refuse_unwritable(e, path)
        raise


def _is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == _HDF5_SIGNATURE
    except OSError:
        return False


def exit_with(status: int) -> None:
    """``sys.exit(status)`` for a script's ``__main__``, except after an HDF5 file's write hit a full disk in this
    process: HDF5 keeps objects of the file it could not write and crashes when it tears down at interpreter exit
    (a segmentation fault, exit status 139, after the refusal was printed). Then the streams are flushed and the
    process ends at once with ``status``: nothing is left to save, the partial file was removed."""
    if _HDF5_FAILED_WRITE:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(status or 0))
    sys.exit(status)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 1) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=float))
