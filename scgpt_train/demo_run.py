"""The demo pretraining checkpoint that the zero-shot and GRN demos read: found, or trained on first use.

``make train`` (``python train.py``, the embedded demo) writes ``outputs/demo/runs/<time>/``. A benchmark or
script that needs its checkpoint calls ``demo_checkpoint()``: the newest finished run of at least ``min_steps``
steps is reused; when there is none, the same command runs first (about 2.5 minutes on 2 CPU cores) and says so,
so every documented command works on a fresh clone in any order. A file lock makes concurrent callers train once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

DEMO_MIN_STEPS = 300  # the `make train` run (configs/experiment/demo.yaml: trainer.max_steps)
DEMO_TRAIN_MINUTES = 2.5  # `make train` on 2 CPU cores after set-up (docs/benchmarks.md, "End-to-end demo")


class DemoCheckpointError(RuntimeError):
    """The demo pretraining could not be found or trained; the message says what ran and what to do."""


def project_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get("PROJECT_ROOT") or Path(__file__).resolve().parents[1])


def find_demo_checkpoint(min_steps: int = DEMO_MIN_STEPS, root: str | os.PathLike | None = None) -> Path | None:
    """The last checkpoint of the newest finished demo run (``outputs/demo/runs/*``, >= ``min_steps``), or None."""
    found = []
    for summary in (project_root(root) / "outputs" / "demo" / "runs").glob("*/summary.json"):
        try:
            s = json.loads(summary.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        ckpt = Path(s.get("last_checkpoint") or "")
        if s.get("finished", True) and int(s.get("steps", 0)) >= min_steps and ckpt.is_file():
            found.append((summary.stat().st_mtime, str(ckpt)))
    return Path(max(found)[1]) if found else None


def demo_checkpoint(
    min_steps: int = DEMO_MIN_STEPS,
    root: str | os.PathLike | None = None,
    train_overrides: Sequence[str] = (),
) -> Path:
    """The demo checkpoint: reused when a finished demo run exists, trained with ``python train.py`` otherwise.

    Parameters
    ----------
    min_steps
        Fewest training steps a run must have finished to be reused.
    root
        Project root whose ``outputs/demo/runs`` is searched and written (default: ``$PROJECT_ROOT`` or this
        checkout).
    train_overrides
        Extra ``train.py`` overrides for the run trained when none is found (tests shorten it with these).
    """
    root = project_root(root)
    runs = root / "outputs" / "demo" / "runs"
    found = find_demo_checkpoint(min_steps, root)
    if found is not None:
        return found
    runs.mkdir(parents=True, exist_ok=True)
    with FileLock(str(runs / ".train.lock")):
        found = find_demo_checkpoint(min_steps, root)  # another caller may have trained it while we waited
        if found is not None:
            return found
        run_dir = runs / time.strftime("%Y-%m-%d_%H-%M-%S")
        cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), f"hydra.run.dir={run_dir}"]
        cmd += list(train_overrides)
        log.warning(
            "no finished demo pretraining (>= %d steps) under %s: training it now with `%s` (the `make train` "
            "demo, about %.1f minutes on 2 CPU cores); later runs reuse it",
            min_steps,
            runs,
            " ".join(cmd[1:]),
            DEMO_TRAIN_MINUTES,
        )
        t0 = time.perf_counter()
        env = {**os.environ, "PROJECT_ROOT": str(root)}
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DemoCheckpointError(
                f"training the demo checkpoint failed (exit {proc.returncode}): `{' '.join(cmd)}`; its log is in "
                f"{run_dir}. Last lines:\n{proc.stderr[-3000:]}"
            )
        found = find_demo_checkpoint(min_steps, root)
        if found is None:
            raise DemoCheckpointError(
                f"`{' '.join(cmd)}` finished but wrote no demo checkpoint of >= {min_steps} steps under {runs}; "
                "set checkpoint: in the benchmark config to use another one"
            )
        log.warning("trained the demo checkpoint in %.0f s: %s", time.perf_counter() - t0, found)
        return found
