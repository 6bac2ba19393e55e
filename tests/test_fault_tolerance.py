"""Preemption and crashes never lose finished work: kill -9 and SIGTERM mid-run, restart the same
command, and the run continues exactly; a corrupt newest checkpoint falls back; non-finite guards."""

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
from conftest import ROOT, run_cmd


def demo_args(demo_corpus: Path, run_dir: Path) -> list[str]:
    return [
        "train.py",
        f"paths.cache_dir={demo_corpus.parent}",
        f"hydra.run.dir={run_dir}",
        "trainer.max_steps=24",
        "trainer.val_check_interval=12",
        "trainer.log_every_n_steps=1",
        "callbacks.periodic_checkpoint.every_n_train_steps=8",
    ]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline"},
    )


def wait_for(path_glob: str, directory: Path, proc: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted(directory.glob(path_glob))
        if found:
            return found[-1]
        if proc.poll() is not None:
            raise AssertionError(
                f"training exited ({proc.returncode}) before {path_glob} appeared: {proc.stderr.read()[-3000:]}"
            )
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{path_glob} did not appear in {directory}")


@pytest.fixture(scope="module")
def uninterrupted(demo_corpus, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_cmd(demo_args(demo_corpus, run_dir))
    return json.loads((run_dir / "summary.json").read_text())


def test_kill9_then_rerun_continues_bitwise(demo_corpus, uninterrupted, tmp_path):
    proc = start(demo_args(demo_corpus, tmp_path))
    wait_for("checkpoints/periodic-step0000008.ckpt", tmp_path, proc)
    time.sleep(1.0)  # let it run past the checkpoint, mid-epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "summary.json").exists()
    rerun = run_cmd(demo_args(demo_corpus, tmp_path))  # the same command
    assert "auto-resume: continuing from" in rerun.stderr + rerun.stdout
    resumed = json.loads((tmp_path / "summary.json").read_text())
    assert resumed["steps"] == 24
    # the loss of every step equals the uninterrupted run's, bit for bit (CPU)
    assert resumed["train_losses"] == uninterrupted["train_losses"]
    assert len(uninterrupted["train_losses"]) == 24


def test_sigterm_saves_and_exits_cleanly_then_resumes(demo_corpus, uninterrupted, tmp_path):
    proc = start(demo_args(demo_corpus, tmp_path))
    wait_for("checkpoints/periodic-step0000008.ckpt", tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    preempted = sorted((tmp_path / "checkpoints").glob("preempted-step*.ckpt"))
    assert len(preempted) == 1
    step = torch.load(preempted[0], map_location="cpu", weights_only=False)["global_step"]
    assert 8 <= step < 24
    run_cmd(demo_args(demo_corpus, tmp_path))
    resumed = json.loads((tmp_path / "summary.json").read_text())
    assert resumed["steps"] == 24 and resumed["train_losses"] == uninterrupted["train_losses"]


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
