"""Your own data, as a scanpy user brings it (issue #18): the README's own-data commands run on small ordinary
h5ad files built from real cells (scanpy's pbmc68k_reduced), from a small checkpoint whose vocabulary is keyed by
gene symbols, like the official whole-human one."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import ROOT, run_cmd

SHORT = ["trainer.max_epochs=1", "data.num_workers=0", "callbacks.progress_bar=null", "task.umap=false"]


# real cells in the forms users bring them ----------------------------------------------------------------------
def pbmc_counts() -> ad.AnnData:
    """700 PBMCs x 765 genes (symbols) with integer counts, obs ``cell_type`` / ``donor``.

    pbmc68k_reduced's ``.raw`` holds log1p of per-cell normalized counts: expm1 divided by the cell's smallest
    non-zero value gives the counts back (max deviation from an integer 0.11; rounded)."""
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    x = sp.csr_matrix(src.raw.X, dtype=np.float64)
    x.data = np.expm1(x.data)
    smallest = np.minimum.reduceat(x.data, x.indptr[:-1])  # every cell has a non-zero value
    x.data = np.round(x.data / np.repeat(smallest, np.diff(x.indptr)))
    obs = pd.DataFrame(
        {"cell_type": src.obs["bulk_labels"].astype(str).to_numpy(), "donor": np.tile(["d1", "d2"], 350)},
        index=src.obs_names.astype(str),
    )
    return ad.AnnData(X=sp.csr_matrix(x, dtype=np.float32), obs=obs, var=pd.DataFrame(index=src.raw.var_names))


def log_normalized(adata: ad.AnnData, target: float = 1e4) -> ad.AnnData:
    out = adata.copy()
    x = out.X.copy()
    x.data = np.log1p(x.data * np.repeat(target / np.asarray(x.sum(1)).ravel(), np.diff(x.indptr))).astype(np.float32)
    out.X = x
    return out


def split_ref_query(adata: ad.AnnData, query_fraction: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    is_query = rng.random(adata.n_obs) < query_fraction
    return adata[~is_query].copy(), adata[is_query].copy()


def write(adata: ad.AnnData, path: Path) -> Path:
    adata.write_h5ad(path)
    return path


def tiny_checkpoint(genes, path: Path) -> Path:
    """A small randomly initialized scGPT (this project's single-file format) with a symbol vocabulary."""
    from data_modules.vocab import GeneVocab
    from scgpt_train.checkpoints import save_checkpoint
    from scgpt_train.model import ScGPT

    vocab = GeneVocab.from_genes(genes)
    torch.manual_seed(0)
    model = ScGPT(
        vocab_size=len(vocab), pad_token_id=vocab.pad_id, d_model=32, n_heads=2, d_ff=64, n_layers=2, dropout=0.0
    )
    return save_checkpoint(model, vocab.token_to_id, path)


def rows_summing_to(adata: ad.AnnData, target: float) -> ad.AnnData:
    """Counts scaled so every cell sums to ``target`` (TPM-like: non-integer, constant row sums)."""
    out = adata.copy()
    x = out.X.copy()
    x.data *= np.repeat(target / np.asarray(x.sum(1)).ravel(), np.diff(x.indptr)).astype(np.float32)
    out.X = x
    return out


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> dict:
    """A reference with raw counts and a query with TPM-like values (rows summing to 1e5), same 765 genes."""
    out = tmp_path_factory.mktemp("own_data")
    counts = pbmc_counts()
    ref, query = split_ref_query(counts)
    return {
        "dir": out,
        "counts": counts,
        "ref": ref,
        "query": query,
        "ckpt": tiny_checkpoint(list(counts.var_names), out / "tiny.pt"),
        "ref_counts": write(ref, out / "ref_counts.h5ad"),
        "query_tpm": write(rows_summing_to(query, 1e5), out / "query_tpm.h5ad"),
    }


# item 1: the README's own-data command ---------------------------------------------------------------------------
def test_readme_annotation_command_runs_on_ordinary_h5ad_files(own, tmp_path):
    """`train.py experiment=finetune_annotation pretrained=... data.path=ref.h5ad data.query_path=query.h5ad
    data.label_key=cell_type` (README) on plain files, on whatever hardware this is (trainer=auto): a reference
    with raw counts and a query with TPM-like values both reach the model and the L1-LR baseline log-normalized."""
    run = tmp_path / "run"
    proc = run_cmd(
        [
            "train.py",
            "experiment=finetune_annotation",
            f"pretrained={own['ckpt']}",
            f"data.path={own['ref_counts']}",
            f"data.query_path={own['query_tpm']}",
            "data.label_key=cell_type",
            "task.baselines=[l1_lr]",
            "task.l1_c_grid=[1.0]",
            f"hydra.run.dir={run}",
            *SHORT,
        ]
    )
    report = json.loads((run / "data_report.json").read_text())
    kinds = [(v["source"], v["value_type"], v["steps"]) for v in report["values"]]
    steps = ["normalize_total 10000", "log1p"]
    assert kinds == [("ref_counts.h5ad: X", "counts", steps), ("query_tpm.h5ad: X", "normalized", steps)]
    assert report["values"][1]["normalized_to"] == 1e5
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["metrics"]["test/accuracy"] <= 1.0
    # L1-LR (C=1) on the log-normalized values of these cells: 0.779 (on their raw counts it would be 0.754)
    assert metrics["metrics"]["baseline/l1_lr/accuracy"] == pytest.approx(152 / 195)
    assert "normalize_total 10000, log1p" in metrics["baseline_inputs"]["l1_lr"]["values"]
    expected = "GPU available: True" if torch.cuda.is_available() else "GPU available: False"
    assert expected in proc.stdout + proc.stderr
    # item 6: the metrics beside the baseline's in the end-of-run output and summary.json
    assert "annotation metrics" in proc.stdout and "scGPT fine-tuned" in proc.stdout and "l1_lr" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task_metrics"]["baseline/l1_lr/accuracy"] == metrics["metrics"]["baseline/l1_lr/accuracy"]
    # predictions.h5ad: the inputs (obs_names, all genes in var order, X untouched) + predictions + the values
    pred = ad.read_h5ad(run / "predictions.h5ad")
    query_x = ad.read_h5ad(own["query_tpm"]).X
    assert list(pred.obs_names) == list(own["ref"].obs_names) + list(own["query"].obs_names)
    assert list(pred.var_names) == list(own["counts"].var_names)
    assert (pred.X != sp.vstack([own["ref"].X, query_x])).nnz == 0
    assert {"cell_type", "donor", "split", "scgpt_pred", "scgpt_pred_prob"} <= set(pred.obs.columns)
    assert pred.obsm["X_scgpt"].shape == (own["counts"].n_obs, 32) and pred.var["scgpt_gene"].all()
    # the layer holds what the model and L1-LR read: scanpy's normalize_total 1e4 + log1p of the counts ...
    import scanpy as sc

    reference = own["counts"][pred.obs_names].copy()
    sc.pp.normalize_total(reference, target_sum=1e4)
    sc.pp.log1p(reference)
    layer = pred.layers["preprocessed"]
    np.testing.assert_allclose(layer.toarray(), reference.X.toarray(), rtol=1e-4, atol=1e-5)
    # ... exactly (the same bytes: digests of the model genes' columns in vocabulary order)
    from scgpt_train.tasks.base import matrix_sha256

    columns = np.argsort(pred.var["scgpt_token"].to_numpy())
    is_ref = (pred.obs["split"] != "query").to_numpy()
    inputs = metrics["baseline_inputs"]["l1_lr"]
    assert inputs["train_sha256"] == matrix_sha256(layer[is_ref][:, columns])
    assert inputs["eval_sha256"] == matrix_sha256(layer[~is_ref][:, columns])
    assert metrics["model_input_sha256"] == matrix_sha256(layer[:, columns])


def train_in_process(overrides: list[str], run_dir: Path) -> dict:
    """What `train.py OVERRIDES hydra.run.dir=RUN_DIR` runs, without starting a new interpreter."""
    from hydra import compose, initialize_config_dir

    from scgpt_train.pipeline import run

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={run_dir}"])
    return run(cfg)


def test_readme_integration_command_runs_on_an_ordinary_h5ad(own, tmp_path):
    """`train.py experiment=finetune_integration pretrained=... data.path=cells.h5ad data.label_key=cell_type
    data.batch_key=batch` (README), here with 200 cells, the donor column as the batch and 100 HVGs to keep it short."""
    sample = np.random.default_rng(1).choice(own["counts"].n_obs, 200, replace=False)
    cells = write(own["counts"][np.sort(sample)].copy(), tmp_path / "cells.h5ad")
    metrics = train_in_process(
        [
            "experiment=finetune_integration",
            f"pretrained={own['ckpt']}",
            f"data.path={cells}",
            "data.label_key=cell_type",
            "data.batch_key=donor",
            "data.preprocess.n_hvg=100",
            "layout.max_seq_len=101",
            *SHORT,
        ],
        tmp_path,
    )
    assert {"test/avg_bio", "test/avg_batch"} <= set(metrics)
    pred = ad.read_h5ad(tmp_path / "predictions.h5ad")
    assert pred.obsm["X_scgpt"].shape == (200, 32)


def test_trainer_auto_picks_the_hardware_there_is():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=auto", "paths.output_dir=/tmp/unused"])
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    kind = type(trainer.accelerator).__name__
    assert kind == ("CUDAAccelerator" if torch.cuda.is_available() else "CPUAccelerator"), kind
    assert trainer.precision == ("bf16-mixed" if torch.cuda.is_available() else "32-true")


@pytest.mark.parametrize("experiment", ["finetune_annotation_ms", "finetune_annotation_myeloid"])
def test_paper_experiments_are_the_generic_recipe_plus_their_dataset(experiment):
    """The paper experiments keep their datasets' specifics; the generic recipe has none of them."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        generic = compose("train", overrides=["experiment=finetune_annotation", "paths.output_dir=/tmp/unused"])
        paper = compose("train", overrides=[f"experiment={experiment}", "paths.output_dir=/tmp/unused"])
    assert generic.data.preprocess.gene_column is None and generic.data.label_key == "cell_type"
    assert generic.trainer.accelerator._target_ == "scgpt_train.hardware.auto_accelerator"
    assert paper.trainer.accelerator == generic.trainer.accelerator
    for node in ("model", "layout", "task", "objective", "callbacks"):
        assert OmegaConf.to_container(paper[node]) == OmegaConf.to_container(generic[node]), node
    assert "benchmarks" in paper.data.path and paper.data.vocab == paper.pretrained
    if experiment == "finetune_annotation_ms":
        assert paper.data.preprocess.gene_column == "gene_name"


# item 5: model selection on small validation sets -----------------------------------------------------------------
def test_small_validation_set_warns_and_the_checkpoint_is_chosen_by_macro_f1(own, tmp_path):
    """200 reference cells (19 validation cells): the data module warns, the best checkpoint is the one with the
    highest validation macro-F1 (logged by ValidationMacroF1), and the task evaluates that one."""
    ref = write(own["ref"][:200].copy(), tmp_path / "small_ref.h5ad")
    query = write(own["query"][:60].copy(), tmp_path / "small_query.h5ad")
    run = tmp_path / "run"
    train_in_process(
        [
            "experiment=finetune_annotation",
            f"pretrained={own['ckpt']}",
            f"data.path={ref}",
            f"data.query_path={query}",
            "data.batch_size=16",
            "model.lr=3e-3",
            *SHORT,
            "trainer.max_epochs=3",
        ],
        run,
    )
    report = json.loads((run / "data_report.json").read_text())
    assert report["cells_per_split"]["val"] < 50
    small = [w for w in report["warnings"] if "has only" in w]
    assert len(small) == 1 and "val/macro_f1" in small[0]
    selection = json.loads((run / "metrics.json").read_text())["selection"]
    assert (selection["monitor"], selection["mode"], selection["use_best"]) == ("val/macro_f1", "max", True)
    logged = pd.read_csv(run / "csv" / "metrics.csv")
    per_epoch = logged.dropna(subset=["val/macro_f1"])
    assert len(per_epoch) == 4  # the pass before training + 3 epochs
    best_fit = per_epoch.iloc[1:]["val/macro_f1"].max()  # checkpoints are saved during fit only
    assert selection["best_score"] == pytest.approx(best_fit)
    step = int(per_epoch.iloc[1:].loc[per_epoch.iloc[1:]["val/macro_f1"].idxmax(), "step"])
    assert selection["weights"].endswith(f"step{step + 1:07d}.ckpt")  # csv rows log global_step - 1


def test_macro_f1_from_counts_matches_the_task_metric():
    from scgpt_train.evaluation.metrics import classification_metrics, confusion_matrix
    from scgpt_train.tasks.annotation import macro_f1_from_counts

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, 200)
    pred = np.where(rng.random(200) < 0.6, truth, rng.integers(0, 6, 200))  # class 5 only predicted
    cm, _ = confusion_matrix(truth.astype(str), pred.astype(str), [str(i) for i in range(7)])  # class 6 unused
    expected = classification_metrics(truth.astype(str), pred.astype(str))["macro_f1"]
    assert float(macro_f1_from_counts(torch.from_numpy(cm))) == pytest.approx(expected, rel=1e-6)


# item 4: the Python API, through the example of docs/python_api.md -------------------------------------------------
def test_python_api_example_runs_as_documented(tmp_path, monkeypatch):
    """Executes every ```python block of docs/python_api.md (in a scratch directory) and checks what it made."""
    import re

    text = (ROOT / "docs" / "python_api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/python_api.md has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile("\n".join(blocks), "docs/python_api.md", "exec"), namespace)  # noqa: S102
    pbmc, pred, metrics = namespace["pbmc"], namespace["pred"], namespace["metrics"]
    assert list(pred.obs_names) == list(pbmc.obs_names) and list(pred.var_names) == list(pbmc.var_names)
    assert (pred.X != sp.csr_matrix(pbmc.X)).nnz == 0  # X untouched
    query = (pbmc.obs["donor"] == "d4").to_numpy()
    assert (pred.obs["split"][query] == "query").all() and (pred.obs["split"][~query] != "query").all()
    assert 0.0 <= metrics["test/accuracy"] <= 1.0 and "test/macro_f1" in metrics
    assert type(namespace["model"]).__name__ == "ScGPT" and namespace["model"].config()["n_cls"] == 10
    embedded = namespace["embedded"]
    assert embedded.obsm["X_scgpt"].shape == (int(query.sum()), 32)
    assert list(embedded.obs_names) == list(pbmc.obs_names[query])
    corpus = namespace["corpus"]
    assert corpus.n_cells == pbmc.n_obs and (tmp_path / "corpora" / "pbmc" / "manifest.json").exists()


def test_python_api_reference_map_transfers_labels(own):
    """api.reference_map (scripts/reference_map.py's path) on in-memory AnnData: the query keeps its obs_names
    and gets one predicted label per cell from the reference's cell types."""
    from scgpt_train.api import reference_map

    reference, query = own["ref"][:200].copy(), own["query"][:60].copy()
    mapped, summary = reference_map(query, reference, own["ckpt"], "cell_type", k=5, baselines=[])
    assert list(mapped.obs_names) == list(query.obs_names) and mapped.obsm["X_scgpt"].shape == (60, 32)
    predicted = [c for c in mapped.obs.columns if c.endswith("pred")]
    assert predicted and set(mapped.obs[predicted[0]].astype(str)) <= set(reference.obs["cell_type"])
    assert isinstance(summary, dict)


def test_benchmark_takes_user_data_as_plain_overrides_and_reports_it(own, tmp_path):
    """`scripts/benchmark.py benchmark=integration_demo data.path=cells.h5ad ...`: arguments that are not the
    benchmark's own keys are train.py overrides for every seed (no quoted overrides=[...] list), and benchmark.md
    describes the file, cells and values the fine-tune actually read (its data_report.json)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from scgpt_train.benchmarks.harness import run_benchmark, split_cli_overrides

    sample = np.random.default_rng(2).choice(own["counts"].n_obs, 120, replace=False)
    cells = write(own["counts"][np.sort(sample)].copy(), tmp_path / "cells.h5ad")
    user = [f"data.path={cells}", "data.batch_key=donor", "data.builder=null", "data.preprocess.n_hvg=60"]
    user += ["layout.max_seq_len=61", *SHORT]
    args = ["benchmark=integration_demo", "seeds=[0]", *user, "benchmark.baselines=[hvg_pca]", "--cfg", "job"]
    own_args, train = split_cli_overrides(args)
    assert own_args == ["benchmark=integration_demo", "seeds=[0]", "benchmark.baselines=[hvg_pca]", "--cfg", "job"]
    assert train == user
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("benchmark", overrides=own_args[:3])
        bench = OmegaConf.to_container(cfg.benchmark, resolve=True)
        result = run_benchmark(bench, [0], tmp_path / "bench", train)
    report = (tmp_path / "bench" / "benchmark.md").read_text()
    assert (
        f"its recipe on `{cells}` (not its own data" in report
        and f"`data.path={cells}`" in report
        and f"Data used: `{cells}`; 120 cells" in report
    )
    assert "Values of cells.h5ad: X: counts" in report and "normalize_total 10000, log1p" in report
    assert {"scgpt", "hvg_pca"} <= set(result["summary"])
