"""docs/architecture.md's recipes, each followed once: add a task (a FineTuneTask with a score hook) and add a
baseline (a name in the task's known_baselines, scored through the same metric and the harness' method rows).
The third recipe, add a benchmark, is tests/test_benchmarks.py::test_a_toy_benchmark_runs_from_a_config_dir_...
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FIXTURES
from test_reference_map import toy_cells

from scgpt_train.benchmarks.harness import ours_rows
from scgpt_train.evaluation.report import markdown_table
from scgpt_train.inference import load_for_inference
from scgpt_train.tasks.base import FineTuneTask


def centroid_accuracy(emb: np.ndarray, labels: np.ndarray) -> float:
    """The task's one metric: the share of cells nearest (cosine) to their own label's centroid."""
    classes = np.unique(labels)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    centroids = np.stack([unit[labels == c].mean(0) for c in classes])
    return float((classes[np.argmax(unit @ centroids.T, axis=1)] == labels).mean())


class CentroidTask(FineTuneTask):
    """Recipe "add a task": a name, the baselines it knows, and score(); FineTuneTask does the rest (best
    weights, predictions for every cell, metrics.json, predictions.h5ad)."""

    name = title = "centroid"
    known_baselines = ("random_embedding",)

    def score(self, dm, outputs, output_dir: Path):
        labels = dm.obs["cell_type"].astype(str).to_numpy()
        metrics = {"test/centroid_accuracy": centroid_accuracy(outputs["cell_emb"], labels)}
        for name in self.baselines:  # recipe "add a baseline": same data, same metric, its own key
            emb = np.random.default_rng(self.seed).normal(size=outputs["cell_emb"].shape)
            metrics[f"baseline/{name}/centroid_accuracy"] = centroid_accuracy(emb, labels)
        return metrics, pd.DataFrame({"cell_type": labels}), {}


def test_a_new_task_and_its_baseline_run_through_the_shared_evaluate_and_rows(tmp_path):
    from data_modules.anndata_module import AnnDataModule

    cells = toy_cells(120, 0)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    model, _ = load_for_inference(FIXTURES)
    dm = AnnDataModule(
        str(tmp_path / "cells.h5ad"), vocab=str(FIXTURES), layout=model.layout, label_key="cell_type",
        val_fraction=0.0, batch_size=32, model_outputs=(),
    )  # fmt: skip
    dm.setup()
    with pytest.raises(ValueError, match=r"centroid baselines are \('random_embedding',\), got \['l1_lr'\]"):
        CentroidTask(baselines=["l1_lr"])
    task = CentroidTask(baselines=["random_embedding"], progress=False, seed=0)
    metrics = task.evaluate(None, model, dm, tmp_path / "run")
    assert set(metrics) == {"test/centroid_accuracy", "baseline/random_embedding/centroid_accuracy"}
    # the toy cell types express their own gene blocks: the embedding separates them, noise does not
    assert metrics["test/centroid_accuracy"] > metrics["baseline/random_embedding/centroid_accuracy"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["task"] == "centroid" and saved["metrics"] == metrics
    rows, summary = ours_rows([metrics], ["scgpt", "random_embedding"], [("centroid_accuracy", "acc")], {}, str, 1)
    table = markdown_table(["method", "source", "acc"], rows)
    assert f"| scgpt | ours (1 seeds) | {metrics['test/centroid_accuracy']:.3f} |" in table
    assert "| random_embedding | ours (1 seeds) |" in table
