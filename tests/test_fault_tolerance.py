"""Preemption and crashes never lose finished work: kill -9 and SIGTERM mid-run, restart the run's command, and
the run continues exactly; a corrupt newest checkpoint falls back; non-finite guards.

The interrupted runs are the shared demo run's command (conftest.DEMO_RUN: 32 steps, periodic checkpoints at
10, 20, 30, validation at 15 and 30) with tests/helpers/stall.py holding them before step 12, so they are
interrupted at the same step on any machine (the earlier version killed them 1 s after a checkpoint appeared, which
a fast machine could outrun); the finished shared run (``demo_run``) is the uninterrupted reference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO_RUN_STEPS, ROOT, demo_train_args, run_cmd

STALL_STEP = 12  # after the periodic checkpoint of step 10, before the validation (and checkpoints) of step 15


def start_stalled(demo_corpus: Path, run_dir: Path, marker: Path) -> subprocess.Popen:
    """The demo run's command, held before step ``STALL_STEP`` until SIGTERM; ``marker`` appears when it waits."""
    stall = [
        "+callbacks.stall._target_=helpers.stall.StallAtStep",
        f"+callbacks.stall.step={STALL_STEP}",
        f"+callbacks.stall.marker={marker}",
    ]
    pythonpath = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, *demo_train_args(demo_corpus, run_dir, *stall)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": pythonpath},
    )


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


@pytest.fixture(scope="module")
def uninterrupted(demo_run) -> dict:
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["steps"] == DEMO_RUN_STEPS and len(summary["train_losses"]) == DEMO_RUN_STEPS
    return summary


def test_kill9_then_rerun_continues_bitwise(demo_corpus, uninterrupted, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "stalled"
    proc = start_stalled(demo_corpus, run_dir, marker)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["periodic-step0000010.ckpt"]
    rerun = run_cmd(demo_train_args(demo_corpus, run_dir))  # the run's command
    assert "auto-resume: continuing from" in rerun.stderr + rerun.stdout
    assert "periodic-step0000010.ckpt" in rerun.stderr + rerun.stdout
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["steps"] == DEMO_RUN_STEPS
    # the loss of every step equals the uninterrupted run's, bit for bit (CPU)
    assert resumed["train_losses"] == uninterrupted["train_losses"]


def test_sigterm_saves_and_exits_cleanly_then_resumes(demo_corpus, uninterrupted, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "stalled"
    proc = start_stalled(demo_corpus, run_dir, marker)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    preempted = sorted((run_dir / "checkpoints").glob("preempted-step*.ckpt"))
    assert len(preempted) == 1
    step = torch.load(preempted[0], map_location="cpu", weights_only=False)["global_step"]
    assert STALL_STEP <= step < DEMO_RUN_STEPS
    run_cmd(demo_train_args(demo_corpus, run_dir))
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["steps"] == DEMO_RUN_STEPS and resumed["train_losses"] == uninterrupted["train_losses"]


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
