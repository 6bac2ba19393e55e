"""Preemption and crashes never lose finished work: kill -9 and SIGTERM mid-run, restart the run's command, and
the run continues exactly; a corrupt newest checkpoint falls back; non-finite guards.

The interrupted runs are the shared demo run's command (conftest.DEMO_RUN: 32 steps, periodic checkpoints at
10, 20, 30, validation at 15 and 30) with tests/helpers/stall.py holding them before step 12, so they are
interrupted at the same step on any machine (the earlier version killed them 1 s after a checkpoint appeared, which
a fast machine could outrun); the finished shared run (``demo_run``) is the uninterrupted reference.
"""

from __future__ import annotations

import csv
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO_RUN_STEPS, ROOT, demo_train_args, run_cmd

STALL_STEP = 12  # after the periodic checkpoint of step 10, before the validation (and checkpoints) of step 15


def start_demo(demo_corpus: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    """The demo run's command with test-only overrides (``tests`` on ``PYTHONPATH`` for ``helpers.stall``)."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, *demo_train_args(demo_corpus, run_dir, *extra)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": pythonpath},
    )


def start_stalled(demo_corpus: Path, run_dir: Path, marker: Path) -> subprocess.Popen:
    """The demo run's command, held before step ``STALL_STEP`` until SIGTERM; ``marker`` appears when it waits."""
    stall = [
        "+callbacks.stall._target_=helpers.stall.StallAtStep",
        f"+callbacks.stall.step={STALL_STEP}",
        f"+callbacks.stall.marker={marker}",
    ]
    return start_demo(demo_corpus, run_dir, *stall)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"training exited ({proc.returncode}) before {path.name} appeared: {proc.stderr.read()[-3000:]}"
            )
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.1)


def check_run(run_dir: Path, capsys) -> tuple[int, str]:
    """scripts/check_run.py on ``run_dir`` (in-process): (exit status, what it printed)."""
    main = runpy.run_path(str(ROOT / "scripts" / "check_run.py"))["main"]
    capsys.readouterr()
    status = main([str(run_dir)])
    out = capsys.readouterr()
    return status, out.out + out.err


def best_score(checkpoint: Path) -> float:
    """The validation ModelCheckpoint's best score stored in a checkpoint."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["callbacks"]
    key = next(k for k in state if k.startswith("ModelCheckpoint{'monitor': 'val/loss'"))
    return float(state[key]["best_model_score"])


@pytest.fixture(scope="module")
def uninterrupted(demo_run) -> dict:
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["steps"] == DEMO_RUN_STEPS and len(summary["train_losses"]) == DEMO_RUN_STEPS
    assert summary["finished"] is True
    return summary


def test_kill9_while_a_checkpoint_is_written_keeps_the_finished_work(
    demo_corpus, demo_run, uninterrupted, tmp_path, capsys
):
    """kill -9 in the middle of writing step0000030.ckpt, the checkpoint of the step-30 validation (periodic
    checkpoints at 10, 20, 30). The step-30 periodic checkpoint used to be written before that validation, so the
    resumed run started after it: the validation at 30, its score and the best checkpoint were gone. Now the
    rerun resumes from step 20, validates at 30 again and ends with the uninterrupted run's losses (bit for bit),
    validation history, best checkpoint and best score; the killed write's temp file is removed, and the dead
    holder's run dir lock is taken over."""
    run_dir, marker = tmp_path / "run", tmp_path / "writing"
    writer = f"{{_target_: helpers.stall.StallInCheckpointWrite, name: step0000030.ckpt, marker: '{marker}'}}"
    proc = start_demo(demo_corpus, run_dir, f"+trainer.plugins=[{writer}]")
    wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()
    ckpts = run_dir / "checkpoints"
    assert not (ckpts / "periodic-step0000030.ckpt").exists()  # not written before the validation of its step
    leftover = Path(marker.read_text())
    assert leftover.is_file() and leftover.name.startswith(".step0000030.ckpt.")
    status, report = check_run(run_dir, capsys)
    assert status == 1 and "NOT FINISHED" in report and f"LEFTOVER {leftover}" in report
    rerun = run_cmd(demo_train_args(demo_corpus, run_dir))  # the run's command
    log = rerun.stderr + rerun.stdout
    assert f"auto-resume: continuing from {ckpts / 'periodic-step0000020.ckpt'}" in log
    assert f"removed {leftover}" in log and not leftover.exists()
    assert "taking over the stale lock left by" in log and "no longer running" in log
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["finished"] is True and resumed["steps"] == DEMO_RUN_STEPS
    # the loss of every step equals the uninterrupted run's, bit for bit (CPU)
    assert resumed["train_losses"] == uninterrupted["train_losses"]
    assert resumed["val_losses"] == uninterrupted["val_losses"]
    assert Path(resumed["best_checkpoint"]).name == Path(uninterrupted["best_checkpoint"]).name
    assert Path(resumed["best_checkpoint"]).is_file()
    assert best_score(ckpts / "last.ckpt") == best_score(demo_run / "checkpoints" / "last.ckpt")


def test_sigterm_saves_exits_143_unfinished_then_resumes(demo_corpus, uninterrupted, tmp_path, capsys):
    """SIGTERM (preemption) while a second job tries the same run dir: the second is refused (exit 2, naming the
    holder) without touching it; the first saves its checkpoint, writes summary.json with finished false and exits
    143; check_run.py exits 1; the rerun resumes bit for bit and finishes."""
    run_dir, marker = tmp_path / "run", tmp_path / "stalled"
    proc = start_stalled(demo_corpus, run_dir, marker)
    wait_for(marker, proc)
    hydra_records = (run_dir / ".hydra" / "overrides.yaml").read_text()
    second = subprocess.run(
        [sys.executable, *demo_train_args(demo_corpus, run_dir)], cwd=ROOT, capture_output=True, text=True
    )
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by another job (host {socket.gethostname()}, PID {proc.pid}, started " in second.stderr
    assert "Traceback" not in second.stderr
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == hydra_records

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, proc.stderr.read()[-3000:]
    preempted = sorted((run_dir / "checkpoints").glob("preempted-step*.ckpt"))
    assert len(preempted) == 1
    step = torch.load(preempted[0], map_location="cpu", weights_only=False)["global_step"]
    assert STALL_STEP <= step < DEMO_RUN_STEPS
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is False and summary["steps"] == step
    assert "stopped by SIGTERM" in summary["stop_reason"] and preempted[0].name in summary["stop_reason"]
    with open(run_dir / "csv" / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row["train/loss"]]
    assert steps == list(range(step)), steps  # one job wrote each step's row, once
    status, report = check_run(run_dir, capsys)
    assert status == 1 and "NOT FINISHED" in report and "stopped by SIGTERM" in report

    run_cmd(demo_train_args(demo_corpus, run_dir))
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["finished"] is True and resumed["stop_reason"] is None
    assert resumed["steps"] == DEMO_RUN_STEPS and resumed["train_losses"] == uninterrupted["train_losses"]
    assert check_run(run_dir, capsys)[0] == 0


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    from scgpt_train.fault_tolerance import find_resume_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    good = ckpts / "periodic-step0000008.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 8}, good)
    time.sleep(0.05)
    newest = ckpts / "periodic-step0000016.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 16}, newest)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated, as by a crash during a non-atomic copy
    assert find_resume_checkpoint(tmp_path) == good
    assert "corrupt" in caplog.text and newest.name in caplog.text
    assert find_resume_checkpoint(tmp_path / "nothing_here") is None


def _guarded_trainer(demo_corpus, tmp_path, action: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from scgpt_train.pipeline import build

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.cache_dir={demo_corpus.parent}",
                "~callbacks.lr_monitor",
                "trainer.max_steps=4",
                "trainer.val_check_interval=4",
                f"callbacks.gradient_guard.action={action}",
            ],
        )
    OmegaConf.set_struct(cfg, False)
    cfg.paths.output_dir = str(tmp_path)
    return build(cfg)


class PoisonStep3(__import__("pytorch_lightning").Callback):
    """Puts a NaN into the targets of the batch at step 2: the GEP term becomes NaN."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            batch.target_values[0, 1] = float("nan")


def test_nonfinite_loss_is_skipped(demo_corpus, tmp_path):
    datamodule, module, trainer = _guarded_trainer(demo_corpus, tmp_path, "skip")
    trainer.callbacks.append(PoisonStep3())
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 4
    guard = next(c for c in trainer.callbacks if type(c).__name__ == "GradientGuard")
    assert guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_nonfinite_loss_stops_with_the_step_and_term(demo_corpus, tmp_path):
    datamodule, module, trainer = _guarded_trainer(demo_corpus, tmp_path, "stop")
    trainer.callbacks.append(PoisonStep3())
    with pytest.raises(FloatingPointError, match=r"step 2: .*train/generative/gep"):
        trainer.fit(module, datamodule=datamodule)


HOLD_LOCK = (
    "import sys, time\n"
    "from scgpt_train.run_lock import RunDirLock\n"
    "lock = RunDirLock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def hold_lock(run_dir: Path, **env: str) -> subprocess.Popen:
    """Another process that takes ``run_dir``'s lock and keeps it until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_run_dir_lock_refuses_a_live_holder_takes_over_a_dead_one_and_reports_another_hosts(
    tmp_path, caplog, monkeypatch
):
    from scgpt_train.errors import RunDirInUseError
    from scgpt_train.run_lock import RunDirLock, is_job_leader

    for key in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    with pytest.raises(RunDirInUseError, match=f"in use by another job \\(host .*, PID {holder.pid}, started "):
        RunDirLock(run_dir).acquire()
    holder.kill()  # kill -9: the kernel frees the lock; the holder's record stays
    holder.wait()
    with caplog.at_level("WARNING", logger="scgpt_train.run_lock"):
        lock = RunDirLock(run_dir).acquire()
    assert f"PID {holder.pid}" in caplog.text and "no longer running" in caplog.text
    lock.release()
    assert not (run_dir / ".run.lock.json").exists()

    # a record from another host whose lock is free here: reported, never broken
    record = {"host": "other-node", "pid": 4242, "started": "2026-01-01T00:00:00+00:00", "job": "SLURM_JOB_ID=77"}
    (run_dir / ".run.lock.json").write_text(json.dumps(record))
    with pytest.raises(RunDirInUseError, match=r"another host \(host other-node, PID 4242.*delete .*\.run\.lock\.json"):
        RunDirLock(run_dir).acquire()
    assert json.loads((run_dir / ".run.lock.json").read_text()) == record
    # ... unless it is this very job, requeued by SLURM onto another node
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    RunDirLock(run_dir).acquire().release()
    # an earlier instance of this same job that still holds the lock: wait for it, then continue
    holder = hold_lock(run_dir, SLURM_JOB_ID="77")
    caplog.clear()
    with caplog.at_level("WARNING", logger="scgpt_train.run_lock"):
        RunDirLock(run_dir, same_job_wait=1).acquire().release()
    assert "earlier instance of this job" in caplog.text and "continuing without the lock" in caplog.text
    holder.kill()
    holder.wait()
    # the other ranks of a job never take it
    assert is_job_leader()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_job_leader()
