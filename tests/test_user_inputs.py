"""A user's own data in fine-tuning and the tasks (issue #25 items 13-19, 21): every input is checked where it
enters, on real cells (scanpy's pbmc68k_reduced as counts, celltypist's raw-count sample, the CITE-seq PBMCs of the
scvi-tools sdist) and real Lightning trainers with tiny settings. docs/reliability.md lists each check."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import ROOT, train_in_process
from test_own_data import pbmc_counts, tiny_checkpoint, write

from data_modules.anndata_module import AnnDataModule
from data_modules.vocab import GeneVocab
from scgpt_train.errors import UserInputError

TINY = ["trainer.max_epochs=1", "data.num_workers=0", "callbacks.progress_bar=null", "task.umap=false"]


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("user_inputs")
    counts = pbmc_counts()
    return {"dir": out, "counts": counts, "path": write(counts, out / "pbmc_counts.h5ad")}


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


# item 13: labels -------------------------------------------------------------------------------------------------
def test_cells_without_a_label_are_refused_or_dropped_and_one_class_is_refused(cells, tmp_path, caplog):
    counts = cells["counts"]
    partly = counts.copy()
    partly.obs["cell_type"] = partly.obs["cell_type"].astype(object)
    partly.obs.iloc[:40, 0] = np.nan
    partly.obs.iloc[40:45, 0] = ""
    partly.obs.iloc[45:50, 0] = None
    path = write(partly, tmp_path / "partly.h5ad")
    with pytest.raises(UserInputError, match=r"partly.h5ad: 50 of 700 cells have no label in obs\['cell_type'\]") as e:
        AnnDataModule(str(path), label_key="cell_type").setup()
    assert str(partly.obs_names[0]) in str(e.value) and "data.drop_unlabeled=true" in str(e.value)

    with caplog.at_level(logging.WARNING):
        dm = AnnDataModule(str(path), label_key="cell_type", drop_unlabeled=True, query_fraction=0.3)
        dm.setup()
    assert len(dm.split) == 650 and "nan" not in dm.label_names and "" not in dm.label_names
    assert "left out 50 of 700 cells without a label" in caplog.text
    assert any("left out 50" in w for w in dm.report()["warnings"])
    assert dm.input_anndata().n_obs == 650  # the predictions file holds the cells trained / evaluated on

    nolabel = counts.copy()
    nolabel.obs["cell_type"] = np.nan
    with pytest.raises(UserInputError, match=r"no cell has a label in obs\['cell_type'\] \(all 700"):
        AnnDataModule(str(write(nolabel, tmp_path / "none.h5ad")), label_key="cell_type").setup()

    one = counts.copy()
    one.obs["cell_type"] = "T cell"
    with pytest.raises(UserInputError, match=r"single class in obs\['cell_type'\] \('T cell', 700 cells\)"):
        AnnDataModule(str(write(one, tmp_path / "one.h5ad")), label_key="cell_type").setup()
    # integration reads labels for its metrics only: one class is no refusal there
    AnnDataModule(str(tmp_path / "one.h5ad"), label_key="cell_type", train_on="all", model_outputs=[]).setup()


def test_classes_too_small_for_the_validation_split_are_warned_about(cells, tmp_path, caplog):
    rare = cells["counts"].copy()
    rare.obs["cell_type"] = rare.obs["cell_type"].astype(str)
    rare.obs.iloc[:3, 0] = "rare"
    with caplog.at_level(logging.WARNING):
        dm = AnnDataModule(str(write(rare, tmp_path / "rare.h5ad")), label_key="cell_type", val_fraction=0.1)
        dm.setup()
    warning = next(w for w in dm.warnings if "too few cells for the validation split" in w)
    assert "'rare' (3)" in warning and "data.val_fraction=0.1" in warning and warning in caplog.text


# item 14: collapsed predictions ----------------------------------------------------------------------------------
def test_predictions_no_better_than_the_majority_are_flagged_in_log_summary_and_benchmark(
    cells, tmp_path, caplog, capsys
):
    """Labels that do not follow the expression, one class 98% of the cells: a real (tiny) fine-tune can only learn
    the prior. The log warns with the likely causes; metrics.json / summary.json carry the flags beside the
    numbers; the benchmark table marks the numbers."""
    from scgpt_train.benchmarks.harness import results_table

    skewed = cells["counts"][:240].copy()
    rng = np.random.default_rng(0)
    skewed.obs["cell_type"] = np.where(rng.random(skewed.n_obs) < 0.02, "B", "A")
    skewed.obs.iloc[:8, 0] = "B"
    path = write(skewed, tmp_path / "skewed.h5ad")
    out = tmp_path / "run"
    over = ["experiment=finetune_annotation_demo", f"data.path={path}", "data.query_fraction=0.3", *TINY]
    over += ["layout.max_seq_len=33", "+trainer.limit_train_batches=3", "validate_before_fit=false"]
    with caplog.at_level(logging.WARNING):
        metrics = train_in_process([*over, "task.baselines=[]", "logger=csv"], out)
    assert metrics["test/no_better_than_majority"] == 1.0
    pred = ad.read_h5ad(out / "predictions.h5ad")
    query = pred.obs["split"] == "query"
    assert metrics["test/collapsed"] == float(pred.obs.loc[query, "scgpt_pred"].nunique() == 1)
    assert "no better than always predicting" in caplog.text or "predictions collapsed" in caplog.text
    assert "Likely causes" in caplog.text
    summary = json.loads((out / "summary.json").read_text())["task_metrics"]
    assert summary["test/no_better_than_majority"] == 1.0 and "test/accuracy" in summary
    assert json.loads((out / "metrics.json").read_text())["quality_warnings"]
    table, agg = results_table("annotation", [metrics, metrics], [], None, 2)
    row = next(line for line in table.splitlines() if line.startswith("| scGPT"))
    assert "‡" in row and "no better than always predicting the majority class in 2 of 2 seeds" in table
    assert agg["scgpt"]["flags"]["no_better_than_majority"] == 2
    printed = capsys.readouterr().out  # item 22: the model summary without Lightning's uncounted FLOPs
    assert "Total params" in printed and "FLOPs" not in printed


def test_collapse_flags_on_real_labels():
    from scgpt_train.evaluation.metrics import collapse_flags

    truth = np.asarray(pbmc_counts().obs["cell_type"])
    majority = pd.Series(truth).value_counts().index[0]
    flags = collapse_flags(truth, np.full(len(truth), majority), truth)
    assert flags["collapsed"] == flags["no_better_than_majority"] == 1.0
    assert flags["majority_accuracy"] == pytest.approx(np.mean(truth == majority))
    good = collapse_flags(truth, truth, truth)
    assert good["collapsed"] == good["no_better_than_majority"] == 0.0


# item 15: ids and a symbol column that disagree --------------------------------------------------------------------
@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict:
    """celltypist's raw-count sample over 1,500 genes that GENCODE v44 names uniquely (CFH and FH among them), keyed by
    Ensembl id with a ``gene_symbols`` column damaged three ways: CFH's id labelled FH, 20 numeric values, 30
    symbols copied from the gene before (duplicates)."""
    from data_modules.demo import celltypist_sample_path
    from data_modules.vocab import gene_table

    out = tmp_path_factory.mktemp("damaged")
    table = {k: v for k, v in gene_table().items() if "." not in k}
    count = pd.Series(list(table.values())).value_counts()
    ids = {s: i for i, s in table.items() if count[s] == 1}
    with open(celltypist_sample_path()) as f:
        header = pd.Index(f.readline().rstrip("\n").split(",")[1:])
    known = [g for g in header if g in ids and g not in ("CFH", "FH")]
    keep = ["CFH", "FH"] + known[:: max(1, len(known) // 1600)][:1498]
    frame = pd.read_csv(celltypist_sample_path(), index_col=0, usecols=[0, *[header.get_loc(g) + 1 for g in keep]])
    src = ad.AnnData(X=sp.csr_matrix(frame[keep].to_numpy(np.float32)), obs=pd.DataFrame(index=frame.index.astype(str)))
    src.var_names = keep
    sub = src[:, keep].copy()
    symbols = list(keep)
    symbols[keep.index("CFH")] = "FH"
    for k in range(100, 120):
        symbols[k] = str(1000 + k)
    for k in range(200, 260, 2):
        symbols[k + 1] = symbols[k]
    sub.var = pd.DataFrame({"gene_symbols": symbols}, index=[ids[g] for g in keep])
    sub.obs["cell_type"] = np.tile(["x", "y"], sub.n_obs)[: sub.n_obs]
    vocab = out / "vocab.json"
    GeneVocab.from_genes(keep).to_json(vocab)
    return {"dir": out, "path": write(sub, out / "damaged.h5ad"), "vocab": vocab, "genes": keep, "ids": ids}


def _token_of(dm: AnnDataModule, gene_id: str) -> str:
    var = dm.input_anndata().var
    return str(var.loc[gene_id, "scgpt_token"])


def test_ids_decide_when_the_symbol_column_disagrees(damaged, caplog):
    cfh = damaged["ids"]["CFH"]
    with caplog.at_level(logging.WARNING):
        dm = AnnDataModule(str(damaged["path"]), vocab=str(damaged["vocab"]), report_path=None)
        dm.setup()
    rep = dm.gene_id_reports[0]
    assert rep["n_disagreements"] == 1 + 20 + 30 and rep["authority"] == "ids"
    assert f"{cfh}: column 'FH', id table 'CFH'" in rep["disagreement_examples"]
    assert "51 of 1,500 genes have a symbol column that disagrees" in caplog.text
    assert _token_of(dm, cfh) == "CFH"  # CFH's counts are fed to the model as CFH
    assert dm.gene_report.n_in_vocab == 1500 and rep["n_duplicates"] == 0

    # a large expression loss is a warning, not an info line
    half = GeneVocab.from_genes(damaged["genes"][::2])
    half.to_json(damaged["dir"] / "half.json")
    lossy = AnnDataModule(str(damaged["path"]), vocab=str(damaged["dir"] / "half.json"), report_path=None)
    lossy.setup()
    assert any("% of the expression is in genes the vocabulary lacks" in w for w in lossy.warnings)
    assert not any("expression is in genes" in w for w in dm.warnings)

    pref = AnnDataModule(
        str(damaged["path"]), vocab=str(damaged["vocab"]), preprocess={"prefer_gene_column": True}, report_path=None
    )
    pref.setup()
    assert pref.gene_id_reports[0]["authority"] == "column" and _token_of(pref, cfh) == "FH"


def test_build_corpus_checks_the_column_and_honours_gene_table(damaged, tmp_path, capsys):
    from data_modules.store.cli import build_main

    cfh = damaged["ids"]["CFH"]
    out = tmp_path / "corpus"
    rc = build_main(["h5ad", str(damaged["path"]), "--vocab", str(damaged["vocab"]), "--out", str(out), "--no-split"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "51 of 1,500 genes have a symbol column that disagrees with their Ensembl id" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["datasets"][0]["n_genes_known"] == 1500
    # --gene-table: the user's table decides, also while the file has a symbol column
    own = tmp_path / "table.csv"
    pd.DataFrame({"feature_id": [cfh], "feature_name": ["FH"]}).to_csv(own, index=False)
    from data_modules.vocab import load_gene_table, resolve_gene_names

    var = ad.read_h5ad(damaged["path"], backed="r").var
    names, rep = resolve_gene_names(var, "symbol", table=load_gene_table(own), table_label=f"gene table {own}")
    assert names[damaged["genes"].index("CFH")] == "FH" and rep.method.endswith(f"checked against gene table {own}")


# item 16: a mistyped path is never filled with demo data ------------------------------------------------------------
def test_a_mistyped_data_path_is_refused_not_filled_with_demo_cells(tmp_path):
    from data_modules.demo import DemoPathError
    from scgpt_train.benchmarks.harness import run_benchmark
    from scgpt_train.pipeline import run

    typo = tmp_path / "my_typo.h5ad"
    over = [f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'out'}", f"data.path={typo}"]
    for experiment in ("finetune_annotation_demo", "finetune_integration_demo", "finetune_perturbation_demo"):
        with pytest.raises(DemoPathError, match=rf"data.path={typo} does not exist. Only the demo's own file"):
            run(_compose([f"experiment={experiment}", *over]))
        assert not typo.exists()
    bench = {
        "name": "annotation_demo",
        "_target_": "scgpt_train.benchmarks.finetune.run_finetune_benchmark",
        "task": "annotation",
        "experiment": "finetune_annotation_demo",
    }
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"), pytest.raises(DemoPathError, match="typo"):
        run_benchmark(bench, [0], tmp_path / "bench", [f"paths.cache_dir={tmp_path / 'cache'}", f"data.path={typo}"])
    assert not typo.exists() and isinstance(DemoPathError("x"), UserInputError)


# item 17: the mosaic variant of one's own multi-omic file ----------------------------------------------------------
@pytest.fixture(scope="module")
def paired(tmp_path_factory) -> Path:
    from data_modules.multiomic.demo import build_citeseq_demo
    from scgpt_train.resources.pypi import fetch_citeseq_demo

    source = fetch_citeseq_demo(log=lambda *_: None)
    return build_citeseq_demo(tmp_path_factory.mktemp("paired") / "mine.h5ad", source)


def test_generic_multiomic_experiment_withholds_a_modality_from_the_file_it_reads(paired, tmp_path):
    """``experiment=finetune_multiomic data.path=MINE data.withhold=...``: the mosaic variant is made from the file
    the run reads (tests/test_multiomic_train.py trains it); the report names that file; impossible variants are
    refused with the reason."""
    from hydra.utils import instantiate

    from data_modules.multiomic.inputs import MultiomicInputError
    from scgpt_train.benchmarks.harness import data_source_note
    from scgpt_train.benchmarks.multiomic import _data_used

    def data_module(withhold: str):
        over = ["experiment=finetune_multiomic", f"data.path={paired}", f"data.withhold={withhold}"]
        cfg = _compose([*over, "data.modalities.RNA.n_top=200", f"paths.output_dir={tmp_path}"])
        return instantiate(cfg.data)

    dm = data_module("{modality:Protein,key:batch,values:[B]}")
    dm.setup()
    assert dm.obs["modalities"].value_counts().to_dict() == {"RNA+Protein": 100, "RNA": 100}
    assert set(dm.obs.loc[dm.obs["modalities"] == "RNA", "batch"]) == {"B"}
    assert dm.counts("Protein")[np.flatnonzero(dm.obs["modalities"] == "RNA")].nnz == 0
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["path"] == str(paired) and report["withheld"]["n_cells"] == 100
    line = _data_used(tmp_path, "mosaic")
    assert str(paired) in line and "Protein withheld from the 100 cells with obs['batch'] in ['B']" in line
    bench = {"name": "multiomic_demo", "dataset": "200 CITE-seq PBMCs"}
    assert f"its recipe on `{paired}` (not its own data" in data_source_note(bench, [f"data.path={paired}"])
    for bad, says in (
        ("{modality:ATAC,key:batch,values:[B]}", "'ATAC' is not a modality of this run"),
        ("{modality:Protein,key:batch,values:[Z]}", "the mosaic variant would equal the paired one"),
    ):
        with pytest.raises(MultiomicInputError, match=says):
            data_module(bad).setup()


# item 18: low-depth counts are not log-normalized controls --------------------------------------------------------
def test_low_depth_integer_controls_are_refused_as_counts(cells, tmp_path):
    from scgpt_train.tasks.perturbation.predict import PredictionInputError, read_controls

    low = cells["counts"].copy()
    x = low.X.copy()
    x.data = np.minimum(np.random.default_rng(0).binomial(x.data.astype(np.int64), 0.1), 7).astype(np.float32)
    x.eliminate_zeros()
    low.X = x
    assert x.max() <= 7 and np.median(np.asarray(x.sum(1))) < 500  # what the old check let through
    low.var["gene_name"] = low.var_names
    path = write(low, tmp_path / "controls.h5ad")
    with pytest.raises(PredictionInputError, match=r"controls.h5ad: X looks like raw counts \(all .* whole numbers"):
        read_controls(path)
    logged = low.copy()
    logged.X = sp.csr_matrix(np.log1p(x.toarray() * 1e4 / np.maximum(x.sum(1).A, 1)), dtype=np.float32)
    assert read_controls(write(logged, tmp_path / "log.h5ad")).x.shape == (700, 765)


# item 19: a query that shares no gene with the reference ----------------------------------------------------------
def test_a_query_sharing_no_gene_names_the_file_and_the_counts(cells, tmp_path):
    query = cells["counts"][:50].copy()
    query.var_names = [f"feature{i}" for i in range(query.n_vars)]
    path = write(query, tmp_path / "q.h5ad")
    with pytest.raises(UserInputError) as e:
        AnnDataModule(str(cells["path"]), query_path=str(path), label_key="cell_type", report_path=None).setup()
    msg = str(e.value)
    assert "q.h5ad: none of its 765 genes (e.g. feature0" in msg and "among the 765 genes" in msg
    assert "none of the 0 genes" not in msg


# item 21: the Python API ---------------------------------------------------------------------------------------
def test_api_raises_one_family_naming_the_anndata_argument(cells, tmp_path):
    from scgpt_train import api

    counts = cells["counts"]
    with pytest.raises(UserInputError, match=r"hydra.run.dir=x.*output_dir="):
        api.finetune(counts, overrides=["hydra.run.dir=x"], output_dir=tmp_path / "a")
    with pytest.raises(UserInputError, match="paths.output_dir"):
        api.finetune(counts, overrides=["paths.output_dir=elsewhere"], output_dir=tmp_path / "a")
    unlabelled = counts.copy()
    unlabelled.obs["cell_type"] = unlabelled.obs["cell_type"].astype(object)
    unlabelled.obs.iloc[:5, 0] = None
    with pytest.raises(UserInputError) as e:
        api.finetune(unlabelled, query_fraction=0.3, output_dir=tmp_path / "b", overrides=["trainer.max_epochs=1"])
    assert "the AnnData `adata`: 5 of 700 cells have no label" in str(e.value)
    assert "reference.h5ad" not in str(e.value)
    ckpt = tiny_checkpoint(["GENE_A", "GENE_B"], tmp_path / "other.pt")
    with pytest.raises(UserInputError) as e:
        api.embed(counts, ckpt)
    assert "`adata`" in str(e.value) and "input.h5ad" not in str(e.value) and "scgpt_embed_" not in str(e.value)
    with pytest.raises(UserInputError, match="adata: expected an AnnData, got list"):
        api.embed([1, 2], ckpt)


# item 22: what a user reads on every run ------------------------------------------------------------------------
def test_step_limited_progress_bar_and_integration_warning_read_right(cells, tmp_path, capsys):
    import pytorch_lightning as pl

    from data_modules.store.cli import build_main
    from scgpt_train.console import ProgressBar

    for limits, title in (
        ({"max_steps": 1000, "max_epochs": -1}, "Epoch 4 (max_steps 1000)"),
        ({"max_epochs": 10}, "Epoch 4/9"),
    ):
        bar = ProgressBar()
        bar._trainer = pl.Trainer(**limits, callbacks=[bar], logger=False, enable_checkpointing=False)
        assert bar._get_train_description(4).strip() == title  # the step-limited one read "Epoch 4/-2"
    # an integration run (no classifier) is not told about the annotation recipes' macro-F1 selection
    small = write(cells["counts"][:200].copy(), tmp_path / "small.h5ad")
    integ = AnnDataModule(str(small), label_key="cell_type", batch_key="donor", train_on="all", model_outputs=[])
    integ.setup()
    assert any("has only 20 cells" in w for w in integ.warnings) and "macro_f1" not in " ".join(integ.warnings)
    annot = AnnDataModule(str(small), label_key="cell_type")
    annot.setup()
    assert any("val/macro_f1" in w for w in annot.warnings)
    # build_corpus says that a file's own obs column 'dataset' gives way to the input's name
    own = cells["counts"][:100].copy()
    own.obs["dataset"] = "study_7"
    rc = build_main(["h5ad", str(write(own, tmp_path / "own.h5ad")), "--out", str(tmp_path / "c"), "--no-split"])
    err = capsys.readouterr().err
    assert rc == 0 and "own.h5ad: its own obs column 'dataset' is not kept" in err and "--obs-columns" in err


def test_zero_shot_reference_mapping_flags_majority_predictions(cells, tmp_path, caplog):
    """The zero-shot kNN transfer (api.reference_map, the zeroshot benchmark) gets the same flags: a reference whose
    labels are 98% one class and do not follow the expression yields predictions no better than that class."""
    from scgpt_train import api
    from scgpt_train.benchmarks.zeroshot import collapse_marks

    skewed = cells["counts"].copy()
    skewed.obs["cell_type"] = np.where(np.random.default_rng(1).random(skewed.n_obs) < 0.02, "B", "A")
    ckpt = tiny_checkpoint(list(skewed.var_names), tmp_path / "tiny.pt")
    with caplog.at_level(logging.WARNING):
        _, summary = api.reference_map(skewed[500:].copy(), skewed[:500].copy(), ckpt, baselines=[], batch_size=128)
    flags = summary["metrics"]["scgpt_knn"]
    assert flags["no_better_than_majority"] == 1.0 and "scgpt_knn on the query" in caplog.text
    row, agg = ["scGPT zero-shot kNN", "ours (2 seeds)", "0.980", "0.495"], {}
    legend = collapse_marks(row, [flags, flags], agg)
    assert (
        row[2].endswith("‡") and legend[-1].endswith("in 2 of 2 seeds") and agg["flags"]["no_better_than_majority"] == 2
    )
