"""The demo checkpoint that the zero-shot and GRN demos read is trained on first use and reused after
(``scgpt_train.demo_run``). The session's ``demo_run`` fixture is itself trained through ``demo_checkpoint`` on an
empty project root, so the training path runs in every suite; these tests check what it left and the reuse."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import DEMO_RUN_STEPS

from scgpt_train.demo_run import DemoCheckpointError, demo_checkpoint, find_demo_checkpoint


def test_first_use_trains_then_reuses(demo_run):
    root = demo_run.parents[3]  # <root>/outputs/demo/runs/<time>
    assert demo_run.parent == root / "outputs" / "demo" / "runs"
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["steps"] == DEMO_RUN_STEPS
    found = demo_checkpoint(min_steps=DEMO_RUN_STEPS, root=root)  # no training: the run exists
    assert found == find_demo_checkpoint(DEMO_RUN_STEPS, root) == demo_run / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in demo_run.parent.iterdir() if p.is_dir()) == [demo_run.name]
    assert find_demo_checkpoint(DEMO_RUN_STEPS + 1, root) is None  # too short for a longer demand


def test_unfinished_or_missing_checkpoint_is_not_reused(demo_run, tmp_path):
    root = tmp_path / "root"
    run = shutil.copytree(demo_run, root / "outputs" / "demo" / "runs" / demo_run.name)
    summary = json.loads((run / "summary.json").read_text())
    summary["last_checkpoint"] = str(run / "checkpoints" / "last.ckpt")
    (run / "summary.json").write_text(json.dumps({**summary, "finished": False}))
    assert find_demo_checkpoint(DEMO_RUN_STEPS, root) is None
    (run / "summary.json").write_text(json.dumps(summary))
    assert find_demo_checkpoint(DEMO_RUN_STEPS, root) == run / "checkpoints" / "last.ckpt"
    (run / "checkpoints" / "last.ckpt").unlink()
    assert find_demo_checkpoint(DEMO_RUN_STEPS, root) is None


def test_failed_training_names_the_command(tmp_path):
    with pytest.raises(DemoCheckpointError, match=r"training the demo checkpoint failed .*train\.py"):
        demo_checkpoint(min_steps=1, root=tmp_path, train_overrides=["trainer.max_steps=not_a_number"])
