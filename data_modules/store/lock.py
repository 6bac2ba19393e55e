"""One writer per directory: the project's one lock, an exclusive ``filelock`` lock held for a whole job.

Two users: a corpus build holds its ``--out`` (:func:`exclusive_lock`, the lock ``.<name>.lock`` beside the
directory, so it survives ``--overwrite`` swapping the directory and covers the staging sibling that swap builds
in), and a training job holds its run dir (``scgpt_train.run_lock``, the lock ``<run dir>/.run.lock``). Both go
through :class:`DirLock`:

* The lock is an ``flock``: the kernel releases it when its holder dies, however it dies (crash, ``kill -9``), so a
  rerun after a death is never refused. While it holds the lock, the holder records itself (host, PID, start time,
  scheduler job id, command) in a JSON file beside the lock; both files are removed on release.
* A live holder: :class:`LockHeldError` (a ``UserInputError``: exit 2) naming the holder, the lock and what to do.
* A record left by a dead holder on this host: taken over, with a warning naming it.
* A record from another host whose lock is free here: refused, never broken. Whether that host's ``flock`` reaches
  this one depends on the file system, so this host cannot tell whether that job still runs; the message says how
  to clear it.
* The same scheduler job (same ``SLURM_JOB_ID`` after a requeue, same ``TORCHELASTIC_RUN_ID`` after a torchrun
  restart): its own earlier record is taken over, also from another host; while its earlier instance still holds
  the lock (a network file system may keep a dead node's lock for its lease time) it waits up to ``same_job_wait``
  seconds, then continues with a warning.

The output location is checked first: a parent that cannot be created or written is an
:class:`~data_modules.errors.OutputPathError` naming it, not a bare ``PermissionError``.
"""

from __future__ import annotations

import datetime as _dt
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
from data_modules.errors import LockHeldError, ensure_writable_dir

__all__ = ["DirLock", "LockHeldError", "describe", "exclusive_lock", "held_by", "job_id", "lock_paths"]

_JOB_ID_VARIABLES = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")


def job_id() -> str | None:
    """The scheduler's id of this job (kept across a SLURM requeue or a torchrun restart), or None."""
    for key in _JOB_ID_VARIABLES:
        if os.environ.get(key):
            return f"{key}={os.environ[key]}"
    return None


def describe(holder: dict) -> str:
    """``host H, PID P, started T[, JOB][: command]`` of a holder record."""
    started = holder.get("started")
    if started is None and holder.get("started_unix") is not None:  # a record written before the unification
        started = _dt.datetime.fromtimestamp(float(holder["started_unix"])).astimezone().isoformat(timespec="seconds")
    job = f", {holder['job']}" if holder.get("job") else ""
    command = f": {holder['command']}" if holder.get("command") else ""
    return f"host {holder.get('host')}, PID {holder.get('pid')}, started {started}{job}{command}"


def _pid_alive(pid) -> bool:
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:  # os.kill(0 or -1, 0) would ask about a whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class DirLock:
    """``with DirLock(lock_path, holder_path, what, option): ...`` holds ``lock_path`` for the block.

    ``what`` names the locked thing in messages (``--out /data/corpus``, ``run dir outputs/x``); ``option`` is what
    a user changes to write elsewhere (``--out``, ``hydra.run.dir``); ``error`` the ``LockHeldError`` subclass
    raised; ``log`` receives the warnings (a takeover, a wait)."""

    def __init__(
        self,
        lock_path: str | os.PathLike,
        holder_path: str | os.PathLike,
        what: str,
        option: str,
        *,
        error: type[LockHeldError] = LockHeldError,
        log: Callable[[str], None] | None = None,
        same_job_wait: float = 120.0,
    ):
        self.lock_path, self.holder_path = Path(lock_path), Path(holder_path)
        self.what, self.option, self.error = what, option, error
        self.log = log or (lambda msg: None)
        self.same_job_wait = float(same_job_wait)
        self._lock: FileLock | None = None

    def read_holder(self) -> dict | None:
        return _read(self.holder_path)

    def acquire(self) -> DirLock:
        ensure_writable_dir(self.lock_path.parent, self.option)
        lock = FileLock(str(self.lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = self.read_holder() or {}
            if job_id() is None or holder.get("job") != job_id():
                raise self.error(self.in_use_message(holder)) from None
            lock = self._wait_for_same_job(lock, holder)
        self._lock = lock
        try:
            self._check_previous_holder()
            write_json_atomic(self.holder_path, self._me())
        except BaseException:
            self._release_lock()
            raise
        return self

    def in_use_message(self, holder: dict) -> str:
        who = describe(holder) if holder else "a process that has not yet written its record"
        gone = bool(holder) and holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid", -1))
        return (
            f"{self.what} is in use by another job ({who}; lock {self.lock_path}): two writers in one place would "
            f"mix their files, so nothing was started. "
            + (
                "That PID no longer runs but the lock is still held (by a process it started?): end that process"
                if gone
                else f"Wait for it to end (or end it), or choose another {self.option}"
            )
            + f"; if no such process runs any more, delete {self.lock_path} and {self.holder_path}"
        )

    def _wait_for_same_job(self, lock: FileLock, holder: dict) -> FileLock | None:
        """The holder is an earlier instance of this very job (requeue / elastic restart): wait for its lock."""
        self.log(
            f"{self.what} is still locked by an earlier instance of this job ({describe(holder)}): waiting up to "
            f"{self.same_job_wait:.0f} s for it"
        )
        deadline = time.monotonic() + self.same_job_wait
        while time.monotonic() < deadline:
            time.sleep(1.0)
            try:
                lock.acquire()
                return lock
            except Timeout:
                continue
        self.log(f"the earlier instance of this job still holds {self.lock_path}: continuing without the lock")
        return None

    def _check_previous_holder(self) -> None:
        """A holder record left behind although its lock is free: the holder died without releasing."""
        holder = self.read_holder()
        if holder is None:
            return
        if holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            if pid == os.getpid():
                return
            state = "still running but not holding the lock" if _pid_alive(pid) else "no longer running"
            self.log(f"{self.what}: taking over the stale lock left by {describe(holder)} ({state})")
            return
        if job_id() is not None and holder.get("job") == job_id():
            self.log(f"{self.what}: taking over the lock of this job's earlier instance ({describe(holder)})")
            return
        raise self.error(
            f"{self.what} was locked by a job on another host ({describe(holder)}) and its lock is free from here, "
            "but this host cannot tell whether that job still runs (a network file system may not share locks "
            f"between hosts), so the lock is not broken. If it has ended, delete {self.holder_path} and rerun; "
            f"otherwise choose another {self.option}."
        )

    @staticmethod
    def _me() -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "job": job_id(),
            "command": " ".join(sys.argv)[:300],
        }

    def release(self) -> None:
        if self._lock is not None or (self.read_holder() or {}).get("pid") == os.getpid():
            self.holder_path.unlink(missing_ok=True)
        if self._lock is not None:
            # removed while still held: filelock's acquire re-checks that the locked inode is still linked, so a
            # process that opened it before the unlink retries on a fresh file instead of sharing a dead lock
            self.lock_path.unlink(missing_ok=True)
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def held_by(lock_path: str | os.PathLike, holder_path: str | os.PathLike) -> dict | None:
    """The record of the job holding ``lock_path`` now (``{}`` when it has not written one yet), or None when the
    lock is free (takes it for an instant when it is free; changes nothing)."""
    if not Path(lock_path).exists():
        return None
    probe = FileLock(str(lock_path), timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return _read(Path(holder_path)) or {}
    probe.release()
    return None


def lock_paths(target: str | os.PathLike) -> tuple[Path, Path]:
    """(lock file, holder file) of a corpus directory ``target`` (which may not exist yet): beside it."""
    target = Path(os.path.abspath(target))
    return target.with_name(f".{target.name}.lock"), target.with_name(f".{target.name}.lock.json")


@contextmanager
def exclusive_lock(
    target: str | os.PathLike, what: str = "--out", log: Callable[[str], None] | None = None
) -> Iterator[Path]:
    """Hold the lock of directory ``target`` (a corpus being built or changed) for the ``with`` block."""
    lock_path, holder_path = lock_paths(target)
    with DirLock(lock_path, holder_path, f"{what} {target}", "--out", log=log):
        yield lock_path
