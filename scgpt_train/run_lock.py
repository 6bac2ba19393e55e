"""One job per run dir: an exclusive ``filelock`` lock on ``<run dir>/.run.lock`` for the whole job.

Two jobs writing one run dir double every ``metrics.csv`` row, crash inside the CSV logger or write
``...-v1.ckpt`` files; the second job is refused (exit 2) with the holder's host, PID and start time, which the
holder writes to ``<run dir>/.run.lock.json`` once it holds the lock.

- Only the process a user started takes the lock (global rank 0 of a DDP / DeepSpeed / FSDP job: no ``RANK``,
  ``SLURM_PROCID``, ``LOCAL_RANK``, ``NODE_RANK`` or ``GROUP_RANK`` other than 0), so a job's own ranks are never
  refused.
- The lock is an ``flock``: the kernel releases it when its holder dies, however it dies. A rerun after a crash or
  ``kill -9`` therefore gets the lock; it finds the dead holder's ``.run.lock.json`` and says it takes over.
- A SLURM requeue (same ``SLURM_JOB_ID``) or a torchrun restart (same ``TORCHELASTIC_RUN_ID``) of the holder's job is
  the same job: while the lock is still held by it (a network file system may keep a dead node's lock for its
  lease time) the restart waits up to ``same_job_wait`` seconds, then continues with a warning.
- A holder record from another host whose lock is free (that host died, or the file system does not share locks
  between hosts) is never broken silently: the job is refused with the holder named and how to clear it.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from data_modules.atomic import write_json_atomic
from scgpt_train.errors import RunDirInUseError

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
HOLDER_NAME = ".run.lock.json"
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
_JOB_ID_VARIABLES = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")


def is_job_leader() -> bool:
    """True in the process that stands for the whole job: global rank 0, or a process outside any launcher."""
    return all(os.environ.get(k, "0") in ("", "0") for k in _RANK_VARIABLES)


def job_id() -> str | None:
    """The scheduler's id of this job (kept across a SLURM requeue or a torchrun restart), or None."""
    for key in _JOB_ID_VARIABLES:
        if os.environ.get(key):
            return f"{key}={os.environ[key]}"
    return None


def describe(holder: dict) -> str:
    job = f", {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host')}, PID {holder.get('pid')}, started {holder.get('started')}{job}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunDirLock:
    """``with RunDirLock(run_dir): ...`` holds the run dir for this job (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike, same_job_wait: float = 120.0):
        self.run_dir = Path(run_dir)
        self.lock_path = self.run_dir / LOCK_NAME
        self.holder_path = self.run_dir / HOLDER_NAME
        self.same_job_wait = float(same_job_wait)
        self._lock: FileLock | None = None

    def read_holder(self) -> dict | None:
        try:
            return json.loads(self.holder_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            return None

    def acquire(self) -> RunDirLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = self.read_holder() or {}
            if job_id() is None or holder.get("job") != job_id():
                raise RunDirInUseError(self._in_use_message(holder)) from None
            lock = self._wait_for_same_job(lock, holder)
        self._lock = lock
        try:
            self._check_previous_holder()
            write_json_atomic(self.holder_path, self._me())
        except BaseException:
            self._release_lock()
            raise
        return self

    def _wait_for_same_job(self, lock: FileLock, holder: dict) -> FileLock | None:
        """The holder is an earlier instance of this very job (requeue / elastic restart): wait for its lock."""
        log.warning(
            "run dir %s is still locked by an earlier instance of this job (%s): waiting up to %.0f s for it",
            self.run_dir,
            describe(holder),
            self.same_job_wait,
        )
        deadline = time.monotonic() + self.same_job_wait
        while time.monotonic() < deadline:
            time.sleep(1.0)
            try:
                lock.acquire()
                return lock
            except Timeout:
                continue
        log.warning("the earlier instance of this job still holds %s: continuing without the lock", self.lock_path)
        return None

    def _check_previous_holder(self) -> None:
        """A holder record left behind although its lock is free: the holder died without releasing."""
        holder = self.read_holder()
        if holder is None:
            return
        same_job = job_id() is not None and holder.get("job") == job_id()
        if holder.get("host") == socket.gethostname():
            pid = int(holder.get("pid", -1))
            if pid == os.getpid():
                return
            state = "still running but not holding the lock" if _pid_alive(pid) else "no longer running"
            log.warning("run dir %s: taking over the lock left by %s (%s)", self.run_dir, describe(holder), state)
            return
        if same_job:
            log.warning("run dir %s: taking over the lock of this job's earlier %s", self.run_dir, describe(holder))
            return
        raise RunDirInUseError(
            f"run dir {self.run_dir} was locked by a job on another host ({describe(holder)}) and its lock is free "
            f"from here, but this host cannot tell whether that job still runs (a network file system may not share "
            f"locks between hosts). If it has ended, delete {self.holder_path} and rerun; otherwise choose another "
            "hydra.run.dir."
        )

    def _in_use_message(self, holder: dict) -> str:
        who = describe(holder) if holder else "a process that has not yet written its record"
        return (
            f"run dir {self.run_dir} is in use by another job ({who}): two jobs in one run dir would mix their "
            "checkpoints and logs, so nothing was started. Wait for it to end, or choose another hydra.run.dir."
        )

    @staticmethod
    def _me() -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "job": job_id(),
        }

    def release(self) -> None:
        if self._lock is not None or (self.read_holder() or {}).get("pid") == os.getpid():
            self.holder_path.unlink(missing_ok=True)
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def held_by(run_dir: str | os.PathLike) -> dict | None:
    """The record of the job holding ``run_dir`` now, or None when its lock is free (for ``scripts/check_run.py``;
    takes the lock for an instant when it is free)."""
    lock = RunDirLock(run_dir)
    if not lock.lock_path.exists():
        return None
    probe = FileLock(str(lock.lock_path), timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return lock.read_holder() or {}
    probe.release()
    return None


def refuse_if_held(argv: list[str]) -> None:
    """Before Hydra starts: raise ``RunDirInUseError`` when ``hydra.run.dir=DIR`` in ``argv`` names a run dir that
    another job holds (Hydra would otherwise rewrite that job's ``.hydra`` records before the run is refused).
    Only the job's leader checks: the other ranks of the holder's own job rerun the command with its run dir."""
    if not is_job_leader():
        return
    run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), None)
    if not run_dir:
        return
    holder = held_by(run_dir)
    if holder is not None and not (job_id() is not None and holder.get("job") == job_id()):
        raise RunDirInUseError(RunDirLock(run_dir)._in_use_message(holder))
