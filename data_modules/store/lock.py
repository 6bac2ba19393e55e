"""One writer per output directory: an exclusive ``filelock`` lock held for a whole build.

The lock of ``DIR`` is ``.<DIR name>.lock`` beside it (in its parent, so it survives ``--overwrite`` swapping the
directory, and covers the staging sibling that swap builds in); ``.<DIR name>.lock.json`` beside that records the
holder (host, PID, start time, command) while it holds the lock and is removed on release. The lock itself is an
``flock`` (``filelock.FileLock``): the kernel releases it when its process dies, so a lock left by a dead process
is never in the way. Both files are removed on release. What the holder file then says decides what happens:

* no holder file, or one written by this process: take the lock;
* a holder on this host whose PID no longer runs: a stale lock, taken over with a log line saying so;
* a holder on another host: refused, never broken. Whether that host's ``flock`` reaches this one depends on the
  filesystem, so this host cannot tell whether that run still goes on; the message says how to clear it.

A second writer while the lock is held gets :class:`LockHeldError` naming the holder and how to clear a lock
whose process is gone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from data_modules.atomic import write_json_atomic


class LockHeldError(RuntimeError):
    """Another process holds (or may hold) the lock of the directory this one would write."""


def lock_paths(target: str | os.PathLike) -> tuple[Path, Path]:
    """(lock file, holder file) of ``target`` (a directory that may not exist yet)."""
    target = Path(os.path.abspath(target))
    return target.with_name(f".{target.name}.lock"), target.with_name(f".{target.name}.lock.json")


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, under another user
        return True
    return True


def _read_holder(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a process that has not recorded itself yet"
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(holder.get("started_unix", 0))))
    return f"PID {holder.get('pid')} on host {holder.get('host')} (started {started}: {holder.get('command', '?')})"


@contextmanager
def exclusive_lock(
    target: str | os.PathLike, what: str = "--out", log: Callable[[str], None] | None = None
) -> Iterator[Path]:
    """Hold the exclusive lock of directory ``target`` for the ``with`` block (see module docstring)."""
    log = log or (lambda msg: None)
    lock_path, holder_path = lock_paths(target)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), timeout=0)
    host, pid = socket.gethostname(), os.getpid()
    try:
        lock.acquire()
    except Timeout:
        holder = _read_holder(holder_path)
        gone = bool(holder) and holder.get("host") == host and not _pid_runs(int(holder.get("pid", -1)))
        raise LockHeldError(
            f"{what} {target} is being written by another process: {_describe(holder)}; lock {lock_path}. "
            + (
                "That PID no longer runs but the lock is still held (by a process it started?): end that process"
                if gone
                else "Wait for it to finish (or end it), then rerun"
            )
            + f"; if no such process runs any more, delete {lock_path} and {holder_path}"
        ) from None
    try:
        previous = _read_holder(holder_path)
        if previous and (previous.get("host") != host or previous.get("pid") != pid):
            if previous.get("host") != host:
                raise LockHeldError(
                    f"{what} {target} was locked by {_describe(previous)} and never released (holder file "
                    f"{holder_path}). This host ({host}) cannot tell whether that run still goes on, so the lock is "
                    f"not broken: if that run has ended, delete {holder_path} and rerun"
                )
            log(
                f"{what} {target}: taking over the stale lock left by {_describe(previous)}, which no longer "
                "holds it (killed?)"
            )
        write_json_atomic(
            holder_path,
            {"host": host, "pid": pid, "started_unix": time.time(), "command": " ".join(sys.argv)[:300]},
        )
        try:
            yield lock_path
        finally:
            holder_path.unlink(missing_ok=True)
            # removed while still held: filelock's acquire re-checks that the locked inode is still linked, so a
            # process that opened it before the unlink retries on a fresh file instead of sharing a dead lock
            lock_path.unlink(missing_ok=True)
    finally:
        lock.release()
