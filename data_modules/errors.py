"""The one base class of every refusal of a user's input (a file, a config value, a checkpoint to resume from, an
output location), and the checks of the files a run reads and the places it writes.

It lives in the lowest layer so that ``data_modules``' own errors can derive from it (``data_modules`` never imports
``scgpt_train``); ``scgpt_train.errors`` re-exports it for the API and the entry points. ``train.py`` and every
script print such an error as one message and exit 2; the Python API raises it (catch
``scgpt_train.errors.UserInputError``).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class UserInputError(ValueError):
    """A refusal of something the user gave: the message names the file, cell, gene or key and what to do."""


class LockHeldError(UserInputError):
    """Another job holds (or may hold) the lock of the directory this one would write (``data_modules.store.lock``)."""


class OutputPathError(UserInputError):
    """An output location that cannot be created or written (a read-only or someone else's directory)."""


def check_h5ad_file(path: str | os.PathLike, option: str, error: type[Exception] = UserInputError) -> None:
    """Refuse an input ``path`` given as ``option`` (``--input``, ``data.path``) that is missing, not HDF5, or that
    HDF5 cannot open (a truncated copy: HDF5 compares the file's size with the size its superblock records), with one
    ``error`` naming both, before anything reads it."""
    import h5py

    if not Path(path).is_file():
        raise error(f"{option} {path} does not exist (or is not a file); point it at an .h5ad file")
    if not h5py.is_hdf5(path):
        raise error(f"{option} {path} is not an HDF5 (.h5ad) file; write it with AnnData.write_h5ad")
    try:
        with h5py.File(path, "r"):
            pass
    except OSError as e:
        raise error(
            f"{option} {path} cannot be read as h5ad ({e}); it may be truncated: copy or export it again"
        ) from None


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def ensure_writable_dir(directory: str | os.PathLike, option: str) -> Path:
    """Create ``directory`` (and its parents) when missing and check that this process can write in it; otherwise
    raise :class:`OutputPathError` naming it and ``option`` (``--out``, ``hydra.run.dir``), instead of the bare
    ``PermissionError`` a write would raise later."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno not in _NOT_WRITABLE and not isinstance(e, (FileExistsError, NotADirectoryError)):
            raise
        raise OutputPathError(_message(directory, option, e.strerror or str(e))) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(directory) else "permission denied"
        raise OutputPathError(_message(directory, option, reason))
    return directory


def check_writable(path: str | os.PathLike, option: str) -> None:
    """Without creating anything: raise :class:`OutputPathError` when ``path`` could not be created or written (its
    nearest existing ancestor is not a directory this process can write in)."""
    path = Path(os.path.abspath(path))
    target = path if path.is_dir() else path.parent
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise OutputPathError(_message(target, option, "not a directory"))
    if not os.access(target, os.W_OK | os.X_OK):
        raise OutputPathError(_message(target, option, "read-only file system" if _read_only(target) else
                                       "permission denied"))  # fmt: skip


def refuse_unwritable(error: BaseException, path: str | os.PathLike) -> None:
    """Raise :class:`OutputPathError` naming ``path`` when ``error`` is a permission / read-only refusal of a write
    (``data_modules.atomic`` turns its writers' bare ``PermissionError`` into this); else return."""
    if isinstance(error, OSError) and error.errno in _NOT_WRITABLE:
        where = Path(error.filename) if getattr(error, "filename", None) else Path(path).parent
        raise OutputPathError(
            f"cannot write {path}: {where} is not writable ({error.strerror}); nothing was written: choose an output "
            "location you can write to, or fix its permissions"
        ) from None


def _read_only(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _message(directory: Path, option: str, reason: str) -> str:
    return (
        f"{option}: cannot write in {directory} ({reason}): nothing was written; choose a {option} in a directory "
        "you can write to, or fix its permissions"
    )
