"""Integration demo benchmark end to end, and composition of every fine-tuning experiment / benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import pytest
from conftest import ROOT, run_cmd

EXPERIMENTS = [
    "finetune_annotation_demo",
    "finetune_annotation_ms",
    "finetune_annotation_myeloid",
    "finetune_annotation_hpancreas",
    "finetune_integration_demo",
    "finetune_integration_pbmc10k",
    "finetune_integration_covid19",
    "finetune_integration_perirhinal",
]


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
            assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.layout.max_seq_len) == (10, 32, 3001)
        else:
            assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.data.preprocess.n_hvg) == (15, 64, 1200)


@pytest.mark.parametrize(
    "name",
    [
        "annotation_ms",
        "annotation_myeloid",
        "annotation_hpancreas",
        "integration_pbmc10k",
        "integration_covid19",
        "integration_perirhinal",
    ],
)
def test_paper_benchmarks_carry_paper_numbers(name):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("benchmark", overrides=[f"benchmark={name}"], return_hydra_config=False)
    assert cfg.benchmark.paper.scgpt and len(cfg.benchmark.seeds) >= 3
    assert cfg.benchmark.experiment == f"finetune_{name}"


@pytest.fixture(scope="module")
def integration_bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integration_bench")
    run_cmd(
        [
            "scripts/benchmark.py",
            "benchmark=integration_demo",
            "seeds=[0]",
            f"hydra.run.dir={out}",
            f"paths.cache_dir={out / 'cache'}",
            'overrides=["trainer.max_epochs=3","callbacks.progress_bar=null"]',
        ]
    )
    return out


def test_integration_benchmark_writes_table_figures_and_outputs(integration_bench):
    table = (integration_bench / "benchmark.md").read_text()
    assert "| scGPT fine-tuned | ours (1 seeds) |" in table and "| HVG + PCA | ours (1 seeds) |" in table
    assert "| Harmony | ours (not installed) |" in table and "| scVI | ours (not installed) |" in table
    assert "scib-metrics" in table
    for fig in ("umap.png", "umap_hvg_pca.png"):
        assert (integration_bench / fig).stat().st_size > 5000, fig
    adata = ad.read_h5ad(integration_bench / "seed_0" / "predictions.h5ad")
    assert adata.obsm["X_scgpt"].shape == (700, 64) and set(adata.obs["batch"]) == {"A", "B"}
    metrics = json.loads((integration_bench / "seed_0" / "metrics.json").read_text())
    assert metrics["skipped_baselines"] == {"harmony": "package not installed", "scvi": "package not installed"}
    m = metrics["metrics"]
    for method in ("test", "baseline/hvg_pca"):
        assert 0 <= m[f"{method}/avg_bio"] <= 1 and 0 <= m[f"{method}/avg_batch"] <= 1
        assert m[f"{method}/overall"] == pytest.approx(0.6 * m[f"{method}/avg_bio"] + 0.4 * m[f"{method}/avg_batch"])
