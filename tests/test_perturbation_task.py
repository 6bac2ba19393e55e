"""Perturbation fine-tuning end to end (issue #12): every perturbation experiment builds its data module and
model, the pretrained loader follows the official tutorial, the task scores predictions and baselines through the
same metrics, a real Lightning run selects its checkpoint by validation Pearson-delta, and the benchmark writes
its report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FIXTURES, train_in_process
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_modules.perturbation.datamodule import PerturbationDataModule
from data_modules.perturbation.gears_data import to_gears_anndata
from scgpt_train.tasks.perturbation.task import PerturbationTask

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PERTURBATION_EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("finetune_perturbation*.yaml"))


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def write_gears(path: Path, genes, n_ctrl: int = 40, per_condition: int = 4, seed: int = 0) -> Path:
    """Log-normalized cells in GEARS layout over ``genes``: 12 singles (knock-down + a 4-gene program each),
    8 pairs (additive), ctrl."""
    rng = np.random.default_rng(seed)
    genes = np.asarray(genes).astype(str)
    targets = genes[:12]
    singles = [f"{g}+ctrl" for g in targets]
    pairs = [
        f"{targets[i]}+{targets[j]}" for i, j in [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (0, 2), (1, 3)]
    ]
    conditions = ["ctrl"] * n_ctrl + [c for c in singles + pairs for _ in range(per_condition)]
    program = {g: rng.choice(np.arange(12, len(genes)), 4, replace=False) for g in targets}
    counts = rng.poisson(4.0, size=(len(conditions), len(genes))).astype(np.float64)
    index = {g: i for i, g in enumerate(genes)}
    for row, c in enumerate(conditions):
        for g in c.split("+"):
            if g != "ctrl":
                counts[row, index[g]] = 0.0
                counts[row, program[g]] *= 4.0
    x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    to_gears_anndata(x, conditions, genes, "toy").write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_gears(tmp_path_factory.mktemp("task") / "toy.h5ad", [f"G{i:03d}" for i in range(60)])


@pytest.fixture(scope="module")
def fixture_vocab_gears(tmp_path_factory) -> Path:
    """GEARS data over genes of the official fixture's vocabulary (for the from-checkpoint experiments)."""
    vocab = json.loads((FIXTURES / "vocab.json").read_text())
    genes = [g for g in vocab if not g.startswith("<")][:60]
    return write_gears(tmp_path_factory.mktemp("task") / "fixture_vocab.h5ad", genes)


# every experiment ---------------------------------------------------------------------------------------------------
def test_perturbation_experiments_exist():
    assert {
        "finetune_perturbation", "finetune_perturbation_demo", "finetune_perturbation_adamson",
        "finetune_perturbation_norman", "finetune_perturbation_replogle_k562", "finetune_perturbation_replogle_rpe1",
    } <= set(PERTURBATION_EXPERIMENTS)  # fmt: skip


@pytest.mark.parametrize("experiment", [e for e in PERTURBATION_EXPERIMENTS if e != "finetune_perturbation_demo"])
def test_paper_experiments_have_the_paper_values(experiment):
    cfg = compose_cfg([f"experiment={experiment}"])
    assert cfg.model.lr == 1e-4 and cfg.model.optimizer._target_ == "torch.optim.Adam"
    assert cfg.model.scheduler._target_.endswith("per_epoch_decay") and cfg.model.scheduler.gamma == 0.9
    assert cfg.data.batch_size == 64 and cfg.trainer.max_epochs == 15 and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.layout.max_seq_len - 1 == 1536 and cfg.layout.pad_value == 0.0 and cfg.layout.value_style == "continuous"
    assert cfg.data.include_zero_genes == "all" and cfg.data.split_seed == 1 and cfg.data.pairing_mode == "fixed"
    assert list(cfg.objective) == ["perturb"] and cfg.model.net.dropout == 0.0
    assert cfg.optimized_metric == "val/pearson_delta" and cfg.callbacks.model_checkpoint.mode == "max"


@pytest.mark.parametrize("experiment", PERTURBATION_EXPERIMENTS)
def test_every_perturbation_experiment_builds_and_computes_a_loss(experiment, toy, fixture_vocab_gears, tmp_path):
    from scgpt_train.pipeline import build_modules

    overrides = [f"experiment={experiment}", f"paths.output_dir={tmp_path}", "data.num_workers=0"]
    if experiment == "finetune_perturbation_demo":
        overrides.append(f"data.path={toy}")
    else:
        overrides += [f"data.path={fixture_vocab_gears}", f"pretrained={FIXTURES}"]
    datamodule, module = build_modules(compose_cfg(overrides))
    assert isinstance(datamodule, PerturbationDataModule)
    cfg = module.model.config()
    assert cfg["decoder_style"] == "affine" and cfg["n_conditions"] == 3 and cfg["condition_pad_id"] == 0
    assert not cfg["use_mvc"] and not cfg["use_generative"]
    batch = next(iter(datamodule.train_dataloader()))
    terms = module.compute_losses(batch, step=0)
    assert torch.isfinite(terms["loss"]) and "perturb/perturb_mse" in terms
    assert (tmp_path / "split.json").is_file()


def test_pretrained_loader_takes_encoder_weights_as_the_tutorial(fixture_vocab_gears):
    """From a non-perturbation checkpoint: the gene embedding, value encoder and transformer layers are the
    checkpoint's; the flag embedding and the affine decoder are fresh; the layout is the data's."""
    from scgpt_train.checkpoints import load_official
    from scgpt_train.tasks.perturbation.model import perturbation_model

    layout = {"max_seq_len": 1537, "pad_value": 0.0}
    model = perturbation_model(FIXTURES, vocab_size=123, pad_token_id=120, layout=layout)
    source = load_official(FIXTURES).state_dict()
    own = model.state_dict()
    for key in ("gene_encoder.embedding.weight", "value_encoder.linear1.weight", "layers.1.self_attn.qkv.weight"):
        assert torch.equal(own[key], source[key]), key
    assert "condition_encoder.weight" in model.load_report["fresh"]
    assert any(k.startswith("expr_decoder.coeff_decoder") for k in model.load_report["fresh"])
    assert model.layout.pad_value == 0.0 and model.layout.max_genes == 1536
    with pytest.raises(ValueError, match="vocab_size=123 but the data gives 99"):
        perturbation_model(FIXTURES, vocab_size=99, pad_token_id=120)
    with pytest.raises(ValueError, match="needs pretrained=PATH"):
        perturbation_model(None)


def test_official_perturbation_checkpoint_continues_whole():
    from scgpt_train.checkpoints import load_official
    from scgpt_train.tasks.perturbation.model import perturbation_model

    d = FIXTURES / "perturbation"
    model = perturbation_model(d, load_prefixes=None, layout={"max_seq_len": 1537, "pad_value": 0.0})
    source = load_official(d).state_dict()
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())


# the task's scoring -------------------------------------------------------------------------------------------------
def _perfect_predictions(dm) -> dict[str, np.ndarray]:
    """Predictions equal to the truth for every test cell (what a perfect model outputs)."""
    pairs = dm.pairing("test").pairs()
    x = dm.x.toarray()
    return {
        "pred": x[pairs.perturbed],
        "truth": x[pairs.perturbed],
        "condition": dm.cell_codes[pairs.perturbed],
        "cell_index": pairs.perturbed,
        "control_index": pairs.control,
    }


def test_task_scores_a_perfect_prediction_and_every_baseline(toy, tmp_path):
    dm = PerturbationDataModule(str(toy), layout={"max_seq_len": 61, "pad_value": 0.0})
    dm.setup()
    metrics = PerturbationTask().score(dm, _perfect_predictions(dm), tmp_path)
    assert metrics["test/pearson_delta"] == pytest.approx(1.0) and metrics["test/pearson_de_delta"] == pytest.approx(
        1.0
    )
    assert metrics["test/mse_de"] == pytest.approx(0.0, abs=1e-12) and metrics["test/direction_de"] == 1.0
    assert metrics["test/n_conditions"] == len(dm.split.test)
    for name in ("no_change", "train_mean", "non_control_mean", "additive", "linear"):
        assert f"baseline/{name}/mse_de" in metrics and metrics[f"baseline/{name}/mse_de"] > 0
    assert np.isnan(metrics["baseline/no_change/pearson_delta"])  # a constant change: undefined, omitted
    assert metrics["baseline/no_change/n_nan/pearson_delta"] == len(dm.split.test)
    for group, members in dm.split.test_subgroup.items():
        if members:
            assert metrics[f"test/{group}/pearson_delta"] == pytest.approx(1.0)
    table = pd.read_csv(tmp_path / "per_condition.csv")
    assert set(table["method"]) == {"scgpt", "no_change", "train_mean", "non_control_mean", "additive", "linear"}
    assert len(table) == 6 * len(dm.split.test)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"]["test/pearson_delta"] == pytest.approx(1.0)
    # cell-eval's minimal profile, run through the package on ours and every baseline
    assert saved["cell_eval"].startswith("profile minimal (cell-eval 0.8.2)")
    assert metrics["test/cell_eval/pearson_delta"] == pytest.approx(1.0)
    assert metrics["test/cell_eval/mse"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["baseline/train_mean/cell_eval/mse"] > 0
    for method in ("scgpt", "no_change", "additive", "linear"):
        assert (tmp_path / "cell_eval" / method / "results.csv").stat().st_size > 0
    for name in ("subgroups.png", "delta_top_de.png", "test_predictions.h5ad"):
        assert (tmp_path / name).stat().st_size > 0


def test_task_refuses_unknown_baselines():
    with pytest.raises(ValueError, match="perturbation baselines are"):
        PerturbationTask(baselines=["magic"])


# a real run ---------------------------------------------------------------------------------------------------------
def test_demo_experiment_trains_selects_by_val_pearson_delta_and_evaluates(toy, tmp_path):
    """train.py experiment=finetune_perturbation_demo on the toy data (3 epochs): val/pearson_delta is logged
    every epoch, the best checkpoint is the epoch with the highest one, the task writes its outputs."""
    metrics = train_in_process(
        [
            "experiment=finetune_perturbation_demo", f"data.path={toy}", "trainer.max_epochs=3", "data.batch_size=32",
            "callbacks.progress_bar=null", "logger=csv",
            "layout.max_seq_len=41",  # 40 of 60 genes per training batch: subsampling with flagged genes kept
        ],
        tmp_path,
    )  # fmt: skip
    for key in ("val/pearson_delta", "val/pearson", "test/pearson_de_delta", "baseline/additive/pearson_de_delta"):
        assert key in metrics and np.isfinite(metrics[key]), key
    log = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    per_epoch = log.dropna(subset=["val/pearson_delta"])
    assert len(per_epoch) >= 3  # the validation before fit + one per epoch
    saved = json.loads((tmp_path / "metrics.json").read_text())
    best = saved["best_checkpoint"]
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    monitor = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint") and v.get("monitor"))
    assert monitor["monitor"] == "val/pearson_delta"
    fit_epochs = per_epoch[per_epoch["step"] > 0]
    assert float(monitor["best_model_score"]) == pytest.approx(fit_epochs["val/pearson_delta"].max(), abs=1e-6)
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["subsampled"] and report["keep_perturbed_genes"] and report["pairing"]["mode"] == "fixed"
    for name in ("split.json", "per_condition.csv", "subgroups.png", "delta_top_de.png", "test_predictions.h5ad"):
        assert (tmp_path / name).is_file(), name


def test_benchmark_writes_report_and_results(toy, tmp_path):
    """The perturbation benchmark harness (scripts/benchmark.py benchmark=perturbation_demo) on the toy data,
    one seed, one epoch: report.md lists every baseline and the subgroups, results.csv has mean / sd rows."""
    from scgpt_train.benchmarks.harness import run_benchmark

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        bench = OmegaConf.to_container(compose("benchmark", overrides=["benchmark=perturbation_demo"]).benchmark)
        extra = [f"data.path={toy}", "trainer.max_epochs=1", "callbacks.progress_bar=null"]
        result = run_benchmark(bench, [1], tmp_path, extra)
    text = (tmp_path / "report.md").read_text()
    assert "SIMULATED" in text
    for name in ("scGPT fine-tuned", "no change", "train mean", "non-control mean", "additive", "linear"):
        assert name in text, name
    for group in ("combo_seen0", "combo_seen1", "combo_seen2", "unseen_single"):
        assert group in text
    frame = pd.read_csv(tmp_path / "results.csv")
    assert set(frame["method"]) == {"scgpt", "no_change", "train_mean", "non_control_mean", "additive", "linear"}
    assert {"all", "unseen_single"} <= set(frame["subgroup"])
    assert "## cell-eval" in text and "pearson_delta" in text.split("## cell-eval")[1]
    assert (tmp_path / "subgroups.png").is_file() and (tmp_path / "delta_top_de.png").is_file()
    assert result["seeds"] == [1] and json.loads((tmp_path / "seed_1" / "split.json").read_text())["seed"] == 1


# reverse perturbation ------------------------------------------------------------------------------------------------
def test_reverse_perturbation_script_on_a_saved_model(toy, tmp_path):
    """scripts/reverse_perturbation.py with a perturbation model (our .pt; untrained: this checks the protocol's
    plumbing, not skill): 10-gene subspace -> 55 candidates, every method scored at K = 1..8, chance analytic."""
    import importlib.util

    from data_modules.vocab import GeneVocab
    from scgpt_train.checkpoints import save_checkpoint
    from scgpt_train.model import ScGPT

    dm = PerturbationDataModule(str(toy), layout={"max_seq_len": 61, "pad_value": 0.0})
    dm.setup()
    dm.split.save(tmp_path / "split.json")
    torch.manual_seed(0)
    net = ScGPT(vocab_size=dm.vocab_size, pad_token_id=dm.pad_id, d_model=16, n_heads=2, d_ff=32, n_layers=1,
                dropout=0.0, layout=dm.layout, use_generative=False, use_mvc=False, decoder_style="affine",
                **dm.model_kwargs)  # fmt: skip
    save_checkpoint(net, dm.vocab.token_to_id, tmp_path / "model.pt")
    spec = importlib.util.spec_from_file_location("reverse_perturbation", ROOT / "scripts" / "reverse_perturbation.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "reverse"
    args = ["--checkpoint", tmp_path / "model.pt", "--data", toy, "--split", tmp_path / "split.json", "--out", out,
            "--n-genes", 10, "--pool-size", 8, "--direction", "down", "--queries", "test+val"]  # fmt: skip
    assert script.main([str(a) for a in args]) == 0
    table = pd.read_csv(out / "reverse_results.csv")
    assert set(table["method"]) == {"scgpt", "scgpt_masked", "top_de", "oracle", "random", "chance"}
    assert sorted(set(table["K"])) == list(range(1, 9))
    chance = table[table["method"] == "chance"].set_index("K")
    assert chance.loc[1, "correct"] == pytest.approx(1 / 55) and chance.loc[8, "correct"] == pytest.approx(8 / 55)
    rankings = json.loads((out / "rankings.json").read_text())
    assert len(rankings["candidates"]) == 55 and len(rankings["genes"]) == 10
    for q in rankings["queries"]:
        assert all(g in rankings["genes"] for g in q.split("+") if g != "ctrl")
    oracle = table[table["method"] == "oracle"].set_index("K")
    assert oracle.loc[8, "relevant"] == 1.0  # the toy knocks its targets out: reading them finds the genes
    text = (out / "report.md").read_text()
    assert "55 candidates" in text and "chance (analytic)" in text and (out / "reverse_topk.png").is_file()
    assert GeneVocab.from_checkpoint(tmp_path / "model.pt").token_to_id == dm.vocab.token_to_id
    bad = ["--checkpoint", tmp_path / "model.pt", "--data", toy, "--split", tmp_path / "split.json", "--out", out,
           "--n-genes", 30]  # fmt: skip
    assert script.main([str(a) for a in bad]) == 2


def test_reverse_benchmark_writes_report(toy, tmp_path):
    from scgpt_train.benchmarks.harness import run_benchmark

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        bench = OmegaConf.to_container(
            compose("benchmark", overrides=["benchmark=reverse_perturbation_demo"]).benchmark
        )
        bench["reverse"].update(n_genes=10, pool_size=8, queries="test+val")
        extra = [f"data.path={toy}", "trainer.max_epochs=1", "callbacks.progress_bar=null"]
        run_benchmark(bench, [1], tmp_path, extra)
    text = (tmp_path / "report.md").read_text()
    assert "SIMULATED" in text and "scGPT retrieval" in text and "chance (analytic)" in text
    frame = pd.read_csv(tmp_path / "results.csv")
    assert {"scgpt", "oracle", "chance"} <= set(frame["method"]) and set(frame["seed"]) == {1}
    assert (tmp_path / "reverse_topk.png").is_file() and (tmp_path / "seed_1" / "reverse" / "report.md").is_file()
