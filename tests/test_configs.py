"""Every experiment composes, and the paper preset carries the paper's values."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def resolved(cfg) -> dict:
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.paths.output_dir = "/tmp/out"
    cfg.paths.corpus = "/tmp/corpus"
    cfg.pop("hydra")
    return OmegaConf.to_container(cfg, resolve=True)


def test_experiments_exist():
    assert {"demo", "pretrain_33m"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment):
    cfg = resolved(compose_cfg([f"experiment={experiment}"]))
    for group in ("data", "model", "trainer"):
        assert "_target_" in cfg[group], f"{experiment}: {group} has no _target_"
    for name, obj in cfg["objective"].items():
        assert "_target_" in obj, f"{experiment}: objective {name} has no _target_"
    for name, cb in (cfg.get("callbacks") or {}).items():
        assert cb is None or "_target_" in cb, f"{experiment}: callback {name} has no _target_"  # null = disabled


DEMOS = [e for e in EXPERIMENTS if e.startswith("finetune_") and e.endswith("_demo")]


@pytest.mark.parametrize("demo", DEMOS)
def test_each_demo_experiment_takes_its_recipe_through_the_defaults_list(demo):
    """finetune_<task>_demo is its recipe finetune_<task> at CPU size: the recipe is the first entry of its defaults
    list, so the task, objective, callbacks and model selection come from the recipe, not from a copy of it."""
    recipe = demo.removesuffix("_demo")
    defaults = list(OmegaConf.load(CONFIGS / "experiment" / f"{demo}.yaml").get("defaults") or [])
    assert defaults[:1] == [recipe], f"{demo}.yaml: defaults {defaults} do not start with its recipe {recipe}"
    ours, theirs = (resolved(compose_cfg([f"experiment={name}"])) for name in (demo, recipe))
    for key in ("objective", "callbacks", "optimized_metric"):
        assert ours[key] == theirs[key], key
    assert ours["task"]["_target_"] == theirs["task"]["_target_"]
    assert ours["data"]["_target_"] == theirs["data"]["_target_"]
    assert len(DEMOS) >= 4  # annotation, integration, perturbation, multiomic


@pytest.mark.parametrize("trainer", sorted(p.stem for p in (CONFIGS / "trainer").glob("*.yaml")))
def test_every_trainer_preset_composes(trainer):
    cfg = resolved(compose_cfg([f"trainer={trainer}"]))
    assert cfg["trainer"]["_target_"] == "pytorch_lightning.Trainer"


@pytest.mark.parametrize("logger", sorted(p.stem for p in (CONFIGS / "logger").glob("*.yaml")))
def test_every_logger_composes(logger):
    """Each logger preset resolves to Lightning loggers (``none``: no logger at all)."""
    loggers = resolved(compose_cfg([f"logger={logger}"])).get("logger") or {}
    assert (logger == "none") == (not loggers), loggers
    for name, spec in loggers.items():
        assert spec["_target_"].startswith("pytorch_lightning.loggers."), name
        assert spec["save_dir"] == "/tmp/out", name  # every logger writes into the run dir


def test_default_is_demo():
    cfg = resolved(compose_cfg([]))
    assert cfg["task_name"] == "demo"
    assert cfg["data"]["_target_"] == "data_modules.datamodule.CorpusDataModule"
    assert cfg["model"]["net"]["n_layers"] == 4 and cfg["model"]["net"]["d_model"] == 128


def test_pretrain_33m_has_the_paper_values():
    cfg = resolved(compose_cfg(["experiment=pretrain_33m"]))
    net = cfg["model"]["net"]
    assert (net["n_layers"], net["n_heads"], net["d_model"], net["d_ff"], net["dropout"]) == (12, 8, 512, 512, 0.2)
    assert net["norm_scheme"] == "post" and net["layout"]["value_style"] == "continuous"
    assert cfg["layout"]["max_seq_len"] == 1201 and cfg["data"]["layout"]["max_seq_len"] == 1201
    assert cfg["layout"]["n_bins"] == 51 and net["layout"]["n_bins"] == 51
    assert cfg["data"]["tokenizer"]["gen_ratios"] == [0.25, 0.5, 0.75]
    gen = cfg["objective"]["generative"]
    assert gen["use_gepc"] is True and gen["cell_prompt_after_steps"] == 1000
    assert cfg["model"]["optimizer"]["_target_"] == "torch.optim.Adam"
    assert cfg["model"]["optimizer"]["lr"] == 1e-4 and cfg["model"]["optimizer"]["weight_decay"] == 0.0
    assert cfg["model"]["scheduler"]["warmup_steps"] == 10000
    assert cfg["model"]["scheduler"]["_target_"].endswith("warmup_cosine")
    tr = cfg["trainer"]
    assert tr["gradient_clip_val"] == 1.0 and tr["max_epochs"] == 6 and tr["precision"] == "bf16-mixed"
    assert tr["num_nodes"] * tr["devices"] == 16 and cfg["data"]["batch_size"] == 32
    assert "wandb" in cfg["logger"]
    assert cfg["data"]["corpus_dir"] == "/tmp/corpus"


def test_command_line_group_choice_beats_the_experiment_default():
    cfg = resolved(compose_cfg(["experiment=pretrain_33m", "trainer=cpu"]))
    assert cfg["trainer"]["accelerator"] == "cpu" and cfg["trainer"]["devices"] == 1
    assert cfg["trainer"]["max_epochs"] == 6  # the experiment's values still apply on top


@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_sweep_launchers_compose(launcher):
    cfg = compose_cfg([f"hydra/launcher={launcher}", "experiment=demo"])
    target = cfg.hydra.launcher._target_
    assert target.startswith("hydra_plugins.hydra_submitit_launcher"), target


@pytest.fixture(scope="module")
def tiny_h5ad(tmp_path_factory) -> Path:
    """60 cells over genes of the official fixture vocab: log-normalized counts, cell_type / batch, gene_name."""
    import json

    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    vocab = FIXTURES / "vocab.json"
    genes = [g for g in json.loads(vocab.read_text()) if not g.startswith("<")][:80] if vocab.exists() else []
    genes = genes or [f"G{i}" for i in range(80)]
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(0.6, 2.0, (60, len(genes)))).astype(np.float32)
    x = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
    obs = pd.DataFrame(
        {"cell_type": np.repeat(["T", "B", "NK"], 20), "batch": np.tile(["a", "b"], 30)},
        index=[f"cell{i}" for i in range(60)],
    )
    adata = ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame({"gene_name": genes}, index=genes))
    path = tmp_path_factory.mktemp("tiny") / "tiny.h5ad"
    adata.write_h5ad(path)
    return path


# the perturbation experiments read GEARS files (tests/test_perturbation_task.py builds each of them on one), the
# paper multi-omic ones downloaded .h5mu / h5ad files (tests/test_multiomic_train.py builds each on a tiny .h5mu), the
# generic finetune_multiomic a user's paired file (tests/test_user_inputs.py runs it on the real CITE-seq cells)
OWN_FILES = ("finetune_perturbation", "finetune_multiomic_bmmc", "finetune_multiomic_pbmc", "finetune_multiomic_asap")


@pytest.mark.parametrize(
    "experiment", [e for e in EXPERIMENTS if not e.startswith(OWN_FILES) and e != "finetune_multiomic"]
)
def test_every_experiment_instantiates_its_data_module_and_model(experiment, tiny_h5ad, demo_corpus, tmp_path):
    """Composing is not enough: each experiment's data module and model are built on tiny real files."""
    from scgpt_train.pipeline import build_modules

    cfg = compose_cfg([f"experiment={experiment}"])
    uses_anndata = cfg.data._target_.endswith("AnnDataModule")
    overrides = [f"experiment={experiment}", f"paths.output_dir={tmp_path}", f"paths.corpus={demo_corpus}"]
    if cfg.model.net._target_.endswith("load_model"):
        overrides.append(f"pretrained={FIXTURES}")
    if uses_anndata:
        overrides += [f"data.path={tiny_h5ad}", "data.label_key=cell_type", "data.num_workers=0"]
        overrides += ["data.batch_key=batch"] if cfg.data.batch_key else []
        if cfg.data.query_path:  # a separate file: the query may not be the training file itself
            query = tmp_path / "query.h5ad"
            shutil.copyfile(tiny_h5ad, query)
            overrides += [f"data.query_path={query}"]
        overrides += ["data.preprocess.n_hvg=40"] if cfg.data.preprocess.n_hvg else []
    else:
        # 4 cells: the 51M model's forward on a 32-cell batch at L 1,201 held ~8 GB and 27 s of this test
        overrides += ["data.num_workers=0", "data.batch_size=4"]
    datamodule, module = build_modules(compose_cfg(overrides))
    batch = next(iter(datamodule.train_dataloader()))
    terms = module.compute_losses(batch, step=0)
    assert torch.isfinite(terms["loss"]), (experiment, terms)


def test_layout_is_one_node_read_by_data_and_model():
    """layout.* overrides reach the data module and the model alike (one node, interpolated)."""
    cfg = resolved(compose_cfg(["layout.n_bins=21", "layout.value_style=category", "layout.max_seq_len=65"]))
    assert cfg["data"]["layout"] == cfg["model"]["net"]["layout"] == cfg["layout"]
    assert cfg["layout"] == {"max_seq_len": 65, "n_bins": 21, "value_style": "category", "pad_value": -2.0,
                             "mask_value": -1.0}  # fmt: skip


def test_finetune_demo_from_a_checkpoint_takes_its_architecture_and_layout(tiny_h5ad, tmp_path):
    """The recipe comment of finetune_annotation_demo ("From a checkpoint: model=from_official pretrained=CKPT"; the
    vocabulary follows through its recipe's data.vocab: ${pretrained}) builds with the checkpoint's architecture; an
    architecture override that fights the checkpoint, or data tokenized with another layout (21 bins against the
    official 51), is refused by name."""
    from hydra.errors import InstantiationException

    from scgpt_train.pipeline import build_modules

    overrides = [
        "experiment=finetune_annotation_demo",
        "model=from_official",
        f"pretrained={FIXTURES}",
        f"data.path={tiny_h5ad}",
        f"paths.output_dir={tmp_path}",
    ]
    _, module = build_modules(compose_cfg(overrides))
    assert module.model.config()["d_model"] == 32  # the fixture's, not the demo's 64
    with pytest.raises(InstantiationException, match=r"model.net.d_model=64 \(the checkpoint has 32\).*~model.net"):
        build_modules(compose_cfg([*overrides, "+model.net.d_model=64"]))
    with pytest.raises(ValueError, match=r"n_bins: model 51, data 21.*layout.n_bins=51"):
        build_modules(compose_cfg([*overrides, "layout.n_bins=21"]))
