"""Integration demo benchmark end to end, and composition of every fine-tuning experiment / benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import pytest
from conftest import ROOT
from helpers.figures import assert_drawn_png

# every annotation / integration recipe of its own dataset (demo or paper; not the generic finetune_<task>.yaml)
EXPERIMENTS = sorted(
    p.stem
    for task in ("annotation", "integration")
    for p in (ROOT / "configs" / "experiment").glob(f"finetune_{task}_*.yaml")
)
# the paper's annotation / integration benchmarks (every such config but the CPU demos)
PAPER_BENCHMARKS = sorted(
    p.stem
    for task in ("annotation", "integration")
    for p in (ROOT / "configs" / "benchmark").glob(f"{task}_*.yaml")
    if not p.stem.endswith("_demo")
)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_finetune_experiments_compose_and_instantiate_their_task(experiment):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "paths.output_dir=/tmp/unused"])
    task = instantiate(cfg.task)
    objectives = set(cfg.objective)
    if "annotation" in experiment:
        assert objectives == {"cls"} and type(task).__name__ == "AnnotationTask"
    else:
        assert objectives == {"mlm", "zero_prob", "ecs", "dar"} and cfg.model.net.dsbn and cfg.model.net.do_dab
        assert cfg.objective.ecs.weight == 10.0 and cfg.objective.ecs.threshold == 0.8
        assert cfg.data.tokenizer.mlm_prob == 0.4 and cfg.data.train_on == "all"
    if "demo" not in experiment:  # the paper's hyperparameters
        assert cfg.model.lr == 1e-4 and cfg.data.vocab == cfg.pretrained
        if "annotation" in experiment:
            cells_per_step = cfg.data.batch_size * cfg.trainer.get("accumulate_grad_batches", 1)  # micro-batches
            assert (cfg.trainer.max_epochs, cells_per_step, cfg.layout.max_seq_len) == (10, 32, 3001)
        else:
            assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.data.preprocess.n_hvg) == (15, 64, 1200)


@pytest.mark.parametrize("name", PAPER_BENCHMARKS)
def test_paper_benchmarks_carry_paper_numbers(name):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("benchmark", overrides=[f"benchmark={name}"], return_hydra_config=False)
    assert cfg.benchmark.paper.scgpt and len(cfg.benchmark.seeds) >= 3
    assert cfg.benchmark.experiment == f"finetune_{name}"


@pytest.fixture(scope="module")
def integration_bench(tmp_path_factory) -> Path:
    """The integration benchmark for one seed, one epoch, in-process: what scripts/benchmark.py's main does
    (tests/test_finetune.py runs the script itself). HVG+PCA is the only baseline: whether Harmony and scVI
    run depends on the 'baselines' extra being installed (tests/test_baselines_integration.py runs them; the
    missing-package rows are tested below without them)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from scgpt_train.benchmarks.harness import run_benchmark

    out = tmp_path_factory.mktemp("integration_bench")
    overrides = [
        "benchmark=integration_demo",
        "benchmark.baselines=[hvg_pca]",
        "seeds=[0]",
        f"paths.cache_dir={out / 'cache'}",
        'overrides=["trainer.max_epochs=1","callbacks.progress_bar=null"]',
    ]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("benchmark", overrides=overrides)
        bench = OmegaConf.to_container(cfg.benchmark, resolve=True)
        run_benchmark(bench, list(cfg.seeds), out, [*cfg.overrides, f"paths.cache_dir={cfg.paths.cache_dir}"])
    return out


def test_integration_benchmark_writes_table_figures_and_outputs(integration_bench):
    table = (integration_bench / "benchmark.md").read_text()
    assert "| scGPT fine-tuned | ours (1 seeds) |" in table and "| HVG + PCA | ours (1 seeds) |" in table
    assert "scib-metrics" in table
    for fig in ("umap.png", "umap_hvg_pca.png"):
        assert_drawn_png(integration_bench / fig)
    adata = ad.read_h5ad(integration_bench / "seed_0" / "predictions.h5ad")
    assert adata.obsm["X_scgpt"].shape == (700, 64) and set(adata.obs["batch"]) == {"A", "B"}
    metrics = json.loads((integration_bench / "seed_0" / "metrics.json").read_text())
    assert metrics["skipped_baselines"] == {}
    m = metrics["metrics"]
    for method in ("test", "baseline/hvg_pca"):
        assert 0 <= m[f"{method}/avg_bio"] <= 1 and 0 <= m[f"{method}/avg_batch"] <= 1
        assert m[f"{method}/overall"] == pytest.approx(0.6 * m[f"{method}/avg_bio"] + 0.4 * m[f"{method}/avg_batch"])


def test_missing_baseline_packages_are_reported_not_fatal(monkeypatch, tmp_path):
    """Harmony / scVI without their packages: listed in skipped_baselines and as 'not installed' rows of the
    table (decided here by pretending the packages are absent, so the test does not depend on the install)."""
    import numpy as np
    import pandas as pd

    from scgpt_train.benchmarks import harness as benchmark
    from scgpt_train.tasks.integration import task as integration

    absent = {"harmony": False, "scvi": False}
    monkeypatch.setattr(integration, "available_baselines", lambda: absent)
    monkeypatch.setattr(benchmark, "available_baselines", lambda: absent)
    task = integration.IntegrationTask(baselines=["harmony", "scvi"], umap=False)
    dm = SimpleNamespace(obs=pd.DataFrame({"batch": ["A", "B", "A"]}), batch_key="batch")
    embeddings, report = task.baseline_embeddings(dm, np.arange(3), tmp_path)
    assert embeddings == {}
    assert report["skipped_baselines"] == {"harmony": "package not installed", "scvi": "package not installed"}
    scores = {"avg_bio": 0.5, "avg_batch": 0.5, "overall": 0.5}
    per_seed = [{f"{m}/{k}": v for m in ("test", "baseline/hvg_pca") for k, v in scores.items()}]
    table, summary = benchmark.results_table("integration", per_seed, ["hvg_pca", "harmony", "scvi"], None, 1)
    assert "| Harmony | ours (not installed) |" in table and "| scVI | ours (not installed) |" in table
    assert "| HVG + PCA | ours (1 seeds) |" in table
    assert summary["harmony"] == summary["scvi"] == {"skipped": "not installed"}
