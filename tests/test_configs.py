"""Every experiment composes, and the paper preset carries the paper's values."""

from __future__ import annotations

from pathlib import Path

import pytest
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


@pytest.mark.parametrize("trainer", sorted(p.stem for p in (CONFIGS / "trainer").glob("*.yaml")))
def test_every_trainer_preset_composes(trainer):
    cfg = resolved(compose_cfg([f"trainer={trainer}"]))
    assert cfg["trainer"]["_target_"] == "pytorch_lightning.Trainer"


@pytest.mark.parametrize("logger", sorted(p.stem for p in (CONFIGS / "logger").glob("*.yaml")))
def test_every_logger_composes(logger):
    resolved(compose_cfg([f"logger={logger}"]))


def test_default_is_demo():
    cfg = resolved(compose_cfg([]))
    assert cfg["task_name"] == "demo"
    assert cfg["data"]["_target_"] == "data_modules.datamodule.CorpusDataModule"
    assert cfg["model"]["net"]["n_layers"] == 4 and cfg["model"]["net"]["d_model"] == 128


def test_pretrain_33m_has_the_paper_values():
    cfg = resolved(compose_cfg(["experiment=pretrain_33m"]))
    net = cfg["model"]["net"]
    assert (net["n_layers"], net["n_heads"], net["d_model"], net["d_ff"], net["dropout"]) == (12, 8, 512, 512, 0.2)
    assert net["norm_scheme"] == "post" and net["input_emb_style"] == "continuous"
    assert cfg["max_seq_len"] == 1201 and cfg["data"]["tokenizer"]["max_seq_len"] == 1201
    assert cfg["n_bins"] == 51 and net["n_bins"] == 51
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
