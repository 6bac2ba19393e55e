"""One job per run dir: the project's one directory lock (``data_modules.store.lock.DirLock``) on
``<run dir>/.run.lock`` for the whole job.

Two jobs writing one run dir double every ``metrics.csv`` row, crash inside the CSV logger or write
``...-v1.ckpt`` files; the second job is refused (exit 2) with the holder's host, PID and start time, which the
holder writes to ``<run dir>/.run.lock.json`` once it holds the lock. Stale locks, other hosts, a SLURM requeue or a
torchrun restart of the same job: see ``data_modules.store.lock``. Only the process a user started takes the lock
(global rank 0 of a DDP / DeepSpeed / FSDP job: no ``RANK``, ``SLURM_PROCID``, ``LOCAL_RANK``, ``NODE_RANK`` or
``GROUP_RANK`` other than 0), so a job's own ranks are never refused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from data_modules.errors import check_writable
from data_modules.store import lock as _lock
from data_modules.store.lock import DirLock, describe, job_id
from scgpt_train.errors import RunDirInUseError

__all__ = ["HOLDER_NAME", "LOCK_NAME", "RunDirLock", "check_run_dir", "describe", "held_by", "is_job_leader", "job_id"]

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
HOLDER_NAME = ".run.lock.json"
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def is_job_leader() -> bool:
    """True in the process that stands for the whole job: global rank 0, or a process outside any launcher."""
    return all(os.environ.get(k, "0") in ("", "0") for k in _RANK_VARIABLES)


class RunDirLock(DirLock):
    """``with RunDirLock(run_dir): ...`` holds the run dir for this job (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike, same_job_wait: float = 120.0):
        self.run_dir = Path(run_dir)
        super().__init__(
            self.run_dir / LOCK_NAME,
            self.run_dir / HOLDER_NAME,
            f"run dir {self.run_dir}",
            "hydra.run.dir",
            error=RunDirInUseError,
            log=log.warning,
            same_job_wait=same_job_wait,
        )


def held_by(run_dir: str | os.PathLike) -> dict | None:
    """The record of the job holding ``run_dir`` now, or None when its lock is free (for ``scripts/check_run.py``)."""
    return _lock.held_by(Path(run_dir) / LOCK_NAME, Path(run_dir) / HOLDER_NAME)


def check_run_dir(argv: list[str]) -> None:
    """Before Hydra starts, for ``hydra.run.dir=DIR`` in ``argv``: raise ``OutputPathError`` when DIR cannot be
    created or written (Hydra would fail with a bare ``PermissionError``), ``RunDirInUseError`` when another job
    holds it (Hydra would otherwise rewrite that job's ``.hydra`` records before the run is refused). Only the
    job's leader checks: the other ranks of the holder's own job rerun the command with its run dir."""
    if not is_job_leader():
        return
    run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), None)
    if not run_dir:
        return
    check_writable(run_dir, "hydra.run.dir")
    holder = held_by(run_dir)
    if holder is not None and not (job_id() is not None and holder.get("job") == job_id()):
        lock = RunDirLock(run_dir)
        raise RunDirInUseError(lock.in_use_message(holder))
