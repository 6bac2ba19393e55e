"""End to end through `python train.py`: the demo (shortened), resume, the paper preset smoke run, and refusals of
config values and resumes (one message, exit 2, no run dir left)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import DEMO_RUN_STEPS, ROOT, demo_overrides, run_cmd, train_in_process


def test_demo_trains_validates_checkpoints_and_summarizes(demo_run):
    """The shared demo run (conftest.DEMO_RUN: 32 steps, validation at 0, 15, 30). Measured on 5 seeds: validation
    loss at step 30 0.28-0.47 of the untrained one (seed 42: 0.34), training loss last / first 0.38-0.57."""
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["steps"] == DEMO_RUN_STEPS
    assert summary["cells_seen"] == DEMO_RUN_STEPS * 16
    assert summary["cells_per_s"] > 0
    # validation before fit, then at steps 15 and 30: the model really learns
    assert [s for s, _ in summary["val_losses"]] == [0, 15, 30]
    assert summary["val_loss_last"] < 0.7 * summary["val_loss_first"], summary["val_losses"]
    assert summary["train_loss_last"] < summary["train_loss_first"]
    ckpts = {p.name for p in (demo_run / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in ckpts and any(n.startswith("periodic-step") for n in ckpts), ckpts
    metrics = (demo_run / "csv" / "metrics.csv").read_text()
    for column in ("train/loss", "val/loss", "perf/cells_per_s", "perf/pad_fraction", "perf/tokens_per_s"):
        assert column in metrics, column
    cfg = yaml.safe_load((demo_run / "config.yaml").read_text())
    assert cfg["task_name"] == "demo"
    if __import__("platform").libc_ver()[0] == "glibc":  # scgpt_train/heap.py, configs/train.yaml's default
        assert "glibc's mmap threshold: fixed at 1048576 bytes" in (demo_run / "demo.log").read_text()


def test_resume_from_checkpoint_continues_the_step_count(demo_run, demo_corpus, tmp_path):
    """An explicit ckpt_path into a new run dir (in-process: what is tested is the resume, not the entry point;
    tests/test_fault_tolerance.py resumes through `python train.py`)."""
    import torch

    last = demo_run / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == DEMO_RUN_STEPS
    assert state["hyper_parameters"]["model"]["d_model"] == 128
    end = DEMO_RUN_STEPS + 4
    train_in_process(
        demo_overrides(demo_corpus, f"trainer.max_steps={end}", "trainer.val_check_interval=2", f"ckpt_path={last}"),
        tmp_path,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == end
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == end
    # the optimizer state was restored and moved on: Adam's step counter continues from the checkpoint's
    adam_steps = {int(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()}
    assert adam_steps == {end}


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory) -> Path:
    """A small real corpus with short cells (pbmc68k_reduced restricted to 150 genes)."""
    from data_modules.demo import pbmc68k_adata
    from data_modules.store.convert import Source, convert_sources

    adata = pbmc68k_adata()[:200, :150].copy()
    out = tmp_path_factory.mktemp("short") / "corpus"
    convert_sources(
        [Source("pbmc_short", adata)],
        out,
        obs_columns=["cell_type"],
        allow_float=True,
        shard_size=64,
        split={"strategy": "cell", "seed": 0, "val_fraction": 0.2},
    )
    return out


def test_pretrain_33m_smoke_runs_with_the_paper_values(short_corpus, tmp_path):
    run_cmd(
        [
            "train.py",
            "experiment=pretrain_33m",
            f"paths.corpus={short_corpus}",
            "trainer=cpu",
            "trainer.max_steps=2",
            "data.num_workers=0",
            "trainer.limit_val_batches=1",
            f"hydra.run.dir={tmp_path}",
        ],
        env={"WANDB_MODE": "offline"},
    )
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    net = cfg["model"]["net"]
    assert (net["n_layers"], net["n_heads"], net["d_model"], net["d_ff"], net["dropout"]) == (12, 8, 512, 512, 0.2)
    assert cfg["layout"]["max_seq_len"] == 1201 and cfg["data"]["batch_size"] == 32
    assert cfg["model"]["optimizer"]["lr"] == 1e-4 and cfg["model"]["scheduler"]["warmup_steps"] == 10000
    assert cfg["trainer"]["accelerator"] == "cpu" and cfg["trainer"]["precision"] == "bf16-mixed"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 < summary["cells_seen"] <= 64
    assert (tmp_path / "wandb").is_dir()  # the wandb logger ran (offline)
    state = __import__("torch").load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert sum(v.numel() for k, v in state["state_dict"].items() if k.startswith("model.layers.")) > 10_000_000


def test_tensorboard_logger_writes_events(demo_corpus, tmp_path):
    train_in_process(
        [
            "logger=tensorboard",
            f"paths.cache_dir={demo_corpus.parent}",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "validate_before_fit=false",
        ],
        tmp_path,
    )
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "csv" / "metrics.csv").exists()


def test_bad_config_values_are_refused_by_key_before_anything_is_built(tmp_path):
    """One message naming every bad key, exit 2, no traceback, and no run dir left behind (Hydra had made it)."""
    run_dir = tmp_path / "run"
    bad = ["trainer.max_steps=abc", "model.net.d_model=-1", "data.batch_size=-4", "malloc_mmap_threshold=-1"]
    done = subprocess.run(
        [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *bad], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    named_keys = ("trainer.max_steps='abc' (str) must be a whole number", "model.net.d_model=-1", "data.batch_size=-4")
    for named in (*named_keys, "malloc_mmap_threshold=-1 must be a whole number of bytes from 0 to 33554432"):
        assert named in errors[0]
    assert not run_dir.exists()
    # the API gets the same refusal as a typed exception
    from scgpt_train.errors import ConfigValueError, UserInputError

    with pytest.raises(ConfigValueError, match=r"trainer.max_steps=-5 must be a whole number >= -1") as info:
        train_in_process(["trainer.max_steps=-5"], tmp_path / "api_run")
    assert isinstance(info.value, UserInputError) and not (tmp_path / "api_run").exists()


def test_a_refused_resume_leaves_no_run_dir_and_hydra_full_error_adds_the_traceback(demo_corpus, tmp_path):
    run_dir, missing = tmp_path / "run", tmp_path / "missing.ckpt"
    done = subprocess.run(
        [sys.executable, "train.py", f"hydra.run.dir={run_dir}", f"paths.cache_dir={demo_corpus.parent}"]
        + [f"ckpt_path={missing}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" in done.stderr and "CheckpointPathError" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: ckpt_path='{missing}': no checkpoint at {missing}"
    assert not run_dir.exists()
