"""Checkpoints you can rely on: the final step is always in last.ckpt, auto-resume picks the highest
step (not the newest file), corrupt files are moved aside (and forgotten as best), bad ckpt_paths are refused by
name, the earlier attempt's metrics survive a resume or a restart from scratch, a full disk is reported by path
with nothing kept, and the private Lightning names we patch still exist."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    DEMO_RUN_PERIODIC_EVERY,
    DEMO_RUN_STEPS,
    DEMO_RUN_VAL_EVERY,
    ROOT,
    copy_run,
    demo_overrides,
    demo_train_args,
    train_in_process,
)


def save_fake_checkpoint(path: Path, step: int) -> Path:
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": step}, path)
    return path


def test_last_ckpt_holds_the_final_step_off_the_intervals(demo_run, demo_corpus, tmp_path, caplog):
    """The shared demo run ends at step 32, on neither the validation (15) nor the periodic (10) interval. Its
    rerun with a higher max_steps happens on a copy, in-process (``python train.py`` reruns are in
    tests/test_fault_tolerance.py)."""
    run_dir = copy_run(demo_run, tmp_path / "run")
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert last["global_step"] == DEMO_RUN_STEPS
    assert DEMO_RUN_STEPS % DEMO_RUN_VAL_EVERY and DEMO_RUN_STEPS % DEMO_RUN_PERIODIC_EVERY  # off the intervals
    assert summary["steps"] == last["global_step"]
    assert Path(summary["last_checkpoint"]).name == "last.ckpt"
    # a rerun of the same command with a higher max_steps resumes from the final step, keeps the first
    # attempt's metrics and keeps writing last.ckpt
    first_metrics = (run_dir / "csv" / "metrics.csv").read_text()
    end = DEMO_RUN_STEPS + 2
    with caplog.at_level(logging.WARNING, logger="scgpt_train.pipeline"):
        train_in_process(demo_overrides(demo_corpus, f"trainer.max_steps={end}"), run_dir)
    assert f"auto-resume: continuing from {run_dir / 'checkpoints' / 'last.ckpt'}" in caplog.text
    assert (run_dir / "csv" / "metrics.1.csv").read_text() == first_metrics
    names = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert "last-v1.ckpt" not in names, names
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == end


def test_auto_resume_picks_the_highest_step_not_the_newest_file(tmp_path):
    from scgpt_train.fault_tolerance import find_resume_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    high = save_fake_checkpoint(ckpts / "last.ckpt", 120)
    old = save_fake_checkpoint(ckpts / "periodic-step0000027.ckpt", 27)
    newest = high.stat().st_mtime + 100
    os.utime(old, (newest, newest))  # as after copying a run dir: the old checkpoint looks newest
    assert find_resume_checkpoint(tmp_path) == high


def test_corrupt_checkpoint_is_moved_aside_and_says_what_happened(tmp_path, caplog):
    from scgpt_train.fault_tolerance import find_resume_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    good = save_fake_checkpoint(ckpts / "periodic-step0000008.ckpt", 8)
    last = save_fake_checkpoint(ckpts / "last.ckpt", 16)
    last.write_bytes(last.read_bytes()[:100])  # truncated
    assert find_resume_checkpoint(tmp_path) == good
    assert not last.exists() and (ckpts / "last.ckpt.corrupt").exists()  # last.ckpt is free for the next save
    assert "last.ckpt.corrupt" in caplog.text and "starting from scratch" not in caplog.text

    caplog.clear()
    good.write_bytes(b"not a checkpoint")
    assert find_resume_checkpoint(tmp_path) is None
    assert "starting from scratch" in caplog.text and "falling back" not in caplog.text
    assert (ckpts / "periodic-step0000008.ckpt.corrupt").exists()


def test_ckpt_path_that_is_not_a_checkpoint_is_refused_by_name(tmp_path):
    from scgpt_train.pipeline import resolve_ckpt_path

    weights = tmp_path / "weights.pt"
    torch.save({"encoder.weight": torch.ones(2)}, weights)  # a bare state dict, not a Lightning checkpoint
    with pytest.raises(ValueError, match="weights.pt is not a training checkpoint") as info:
        resolve_ckpt_path(str(weights), str(tmp_path))
    assert "weights_only" not in str(info.value)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="garbage.ckpt is not a training checkpoint"):
        resolve_ckpt_path(str(garbage), str(tmp_path))


def test_private_lightning_names_we_patch_exist():
    """Fails loudly when a Lightning upgrade moves a private name that scgpt_train/compat.py patches."""
    from lightning_fabric.strategies.launchers import subprocess_script as fabric_launcher
    from pytorch_lightning.strategies.launchers import subprocess_script as pl_launcher

    from scgpt_train import compat

    compat.check_private_api()
    assert callable(fabric_launcher._hydra_subprocess_cmd) and callable(pl_launcher._hydra_subprocess_cmd)
    with pytest.raises(RuntimeError, match=r"_no_such_attribute no longer exists.*2\.6\.6"):
        compat._require(fabric_launcher, "_no_such_attribute", "lightning_fabric.strategies.launchers")


def test_request_graceful_stop_sets_lightnings_sigterm_flag():
    import pytorch_lightning as pl

    from scgpt_train.compat import request_graceful_stop

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    request_graceful_stop(trainer)
    assert trainer._signal_connector.received_sigterm is True


def test_a_best_checkpoint_that_is_gone_is_forgotten_at_resume(tmp_path):
    """A run resumed after its best checkpoint was moved aside as corrupt (or deleted) must not name it as best."""
    from scgpt_train.fault_tolerance import RunCheckpoint

    kept = save_fake_checkpoint(tmp_path / "step0000010.ckpt", 10)
    gone = tmp_path / "step0000020.ckpt"  # moved aside to step0000020.ckpt.corrupt
    callback = RunCheckpoint(dirpath=tmp_path, monitor="val/loss", mode="min", save_top_k=2)
    callback.load_state_dict(
        {
            "dirpath": callback.dirpath,
            "best_model_score": torch.tensor(1.0),
            "best_model_path": str(gone),
            "kth_best_model_path": str(kept),
            "kth_value": torch.tensor(2.0),
            "best_k_models": {str(kept): torch.tensor(2.0), str(gone): torch.tensor(1.0)},
            "last_model_path": "",
        }
    )
    assert callback.best_model_path == str(kept) and float(callback.best_model_score) == 2.0
    assert list(callback.best_k_models) == [str(kept)]
    assert callback.state_key.startswith("ModelCheckpoint{")  # checkpoints of earlier versions resume unchanged


def test_restart_from_scratch_keeps_the_earlier_metrics(small_corpus, tmp_path, caplog):
    """Every checkpoint corrupt: the run starts from scratch and the earlier attempt's metrics.csv is kept as
    metrics.1.csv, as for a resumed run. (conftest's small corpus: what is tested is the run dir, not the data.)"""
    run_dir = tmp_path / "run"
    (run_dir / "csv").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    earlier = "step,train/loss\n0,8.5\n"
    (run_dir / "csv" / "metrics.csv").write_text(earlier)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"truncated by a crash")
    with caplog.at_level(logging.WARNING):
        train_in_process(
            [
                f"data.corpus_dir={small_corpus}",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "trainer.log_every_n_steps=1",
                "validate_before_fit=false",
                "callbacks.periodic_checkpoint.every_n_train_steps=null",
            ],
            run_dir,
        )
    assert "starting from scratch" in caplog.text
    assert (run_dir / "csv" / "metrics.1.csv").read_text() == earlier
    assert (run_dir / "checkpoints" / "last.ckpt.corrupt").exists()
    assert "train/loss" in (run_dir / "csv" / "metrics.csv").read_text()


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MB tmpfs (a file system that fills up); skipped where mounting is not permitted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_while_saving_a_checkpoint_says_so_and_keeps_nothing(demo_corpus, small_tmpfs):
    run_dir = small_tmpfs / "run"
    args = demo_train_args(
        demo_corpus,
        run_dir,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "validate_before_fit=false",
        "callbacks.periodic_checkpoint.every_n_train_steps=null",
    )
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-3000:]
    message = re.findall(r"^error: no space left on device while writing (\S+): (.*)$", done.stderr, re.MULTILINE)
    assert len(message) == 1, done.stderr[-3000:]
    path, rest = message[0]
    assert Path(path).parent == run_dir / "checkpoints" and path.endswith(".ckpt")
    assert rest.startswith("free space or choose another hydra.run.dir; nothing was kept")
    assert "Traceback" not in done.stderr
    assert not [p.name for p in (run_dir / "checkpoints").iterdir()]  # no checkpoint, no temp file
