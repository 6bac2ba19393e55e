"""What ``train.py`` does, as a function tests and other entry points can call with a composed config."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from scgpt_train.callbacks import RunSummary
from scgpt_train.fault_tolerance import AtomicCheckpointIO, find_resume_checkpoint

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a config group that maps names to ``_target_`` configs."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def model_kwargs_from_data(datamodule) -> dict:
    """Model arguments that the data decides (vocab size, <pad> id; class / batch counts for fine-tuning)."""
    kwargs = {"vocab_size": datamodule.vocab_size, "pad_token_id": datamodule.pad_id}
    kwargs.update(getattr(datamodule, "model_kwargs", None) or {})
    return kwargs


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Data module (corpus prepared), Lightning module and trainer, all from ``_target_``."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    objectives = {name: instantiate(c) for name, c in cfg.objective.items()}
    module = instantiate(cfg.model, net=model_kwargs_from_data(datamodule), objectives=objectives,
                         vocab=datamodule.vocab.token_to_id)
    trainer = instantiate(cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")),
                          logger=instantiate_group(cfg.get("logger")) or False, plugins=trainer_plugins(cfg.trainer))
    return datamodule, module, trainer


def trainer_plugins(trainer_cfg: DictConfig) -> list:
    """The configured plugins, plus atomic checkpoint writes where the strategy uses plain torch files."""
    plugins = [instantiate(p) for p in (trainer_cfg.get("plugins") or [])]
    strategy = trainer_cfg.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    sharded = any(s in target.lower() for s in ("deepspeed", "fsdp"))
    if not sharded and not any(isinstance(p, TorchCheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str, auto_resume: bool = False) -> str | None:
    """Which checkpoint ``fit`` resumes from.

    ``null``: the newest valid checkpoint in this run dir when ``auto_resume`` (a restarted or requeued
    job picks up where it stopped), else a fresh start. ``last``: ``<run dir>/checkpoints/last.ckpt``.
    Anything else: that file, which must exist.
    """
    if ckpt_path in (None, ""):
        found = find_resume_checkpoint(output_dir) if auto_resume else None
        if found is not None:
            log.warning("auto-resume: continuing from %s", found)
        return None if found is None else str(found)
    path = Path(output_dir) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no checkpoint at {path}")
    return str(path)


def run(cfg: DictConfig) -> dict[str, float]:
    """Seed, build, (validate,) fit, print and save the summary; returns the final metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)

    datamodule, module, trainer = build(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), str(output_dir), bool(cfg.get("auto_resume", False)))
    if cfg.get("validate_before_fit") and ckpt_path is None:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if cfg.get("task"):  # fine-tuning tasks evaluate after fit: predictions, metrics, figures
        task = instantiate(cfg.task)
        metrics.update(task.evaluate(trainer=trainer, module=module, datamodule=datamodule, output_dir=output_dir))
    summary_cb = next((c for c in trainer.callbacks if isinstance(c, RunSummary)), None)
    if summary_cb is not None and trainer.is_global_zero:
        summary = summary_cb.write(trainer, output_dir / "summary.json")
        print_summary(summary, output_dir)
    return metrics


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:,.4f}" if isinstance(x, float) else f"{x:,}"


def print_summary(s: dict, output_dir: Path) -> None:
    table = Table(title="scgpt-train run summary", show_header=False)
    table.add_row("steps", _fmt(s["steps"]))
    table.add_row("cells seen", _fmt(s["cells_seen"]))
    table.add_row("cells/s (fit wall time)", _fmt(s["cells_per_s"]))
    table.add_row("train loss first -> last", f"{_fmt(s['train_loss_first'])} -> {_fmt(s['train_loss_last'])}")
    table.add_row("val loss first -> last", f"{_fmt(s['val_loss_first'])} -> {_fmt(s['val_loss_last'])}")
    table.add_row("checkpoint (last)", str(s["last_checkpoint"]))
    table.add_row("checkpoint (best)", str(s["best_checkpoint"]))
    table.add_row("logs", str(output_dir))
    Console().print(table)
