"""What ``train.py`` does, as a function tests and other entry points can call with a composed config."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.utilities.exceptions import SIGTERMException
from rich.console import Console
from rich.table import Table

from data_modules.atomic import is_disk_full, write_json_atomic
from data_modules.vocab import GeneVocab, VocabError
from scgpt_train.adapters import apply_peft
from scgpt_train.callbacks import RunSummary
from scgpt_train.compat import set_hydra_subprocess_cmd
from scgpt_train.config_checks import check_config
from scgpt_train.errors import (
    CheckpointPathError,
    NoSpaceLeftError,
    RunInterrupted,
    UserInputError,
    find_user_input_error,
)
from scgpt_train.fault_tolerance import (
    AtomicCheckpointIO,
    PreemptionCheckpoint,
    checkpoint_is_valid,
    find_resume_checkpoint,
    remove_leftover_temp_files,
)
from scgpt_train.heap import set_mmap_threshold
from scgpt_train.run_lock import HOLDER_NAME, LOCK_NAME, RunDirLock, is_job_leader

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


def build_modules(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """Data module (data prepared and set up) and the Lightning module whose model fits it: the model's
    token layout (a checkpoint's, with ``pretrained=``) must be the data's."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if cfg.get("pretrained"):
        extends = bool(getattr(datamodule, "extends_vocab", False))
        check_checkpoint_vocab(cfg.pretrained, datamodule.vocab, resume=False, allow_extension=extends)
    objectives = {name: instantiate(c) for name, c in cfg.objective.items()}
    # The vocabulary is handed to the module as the dict it is, after instantiate: a keyword of instantiate is first
    # turned into an OmegaConf node, ~4 s of CPU for the demo corpus's 32,800 genes (each run, each rank).
    build_module = instantiate(cfg.model, _partial_=True, net=model_kwargs_from_data(datamodule), objectives=objectives)
    module = build_module(vocab=datamodule.vocab.token_to_id)
    source = f"the checkpoint {cfg.pretrained}" if cfg.get("pretrained") else "the model config"
    module.peft = apply_peft(module, cfg.get("peft"), cfg.get("pretrained"), cfg.model.get("freeze"))  # peft=lora|ia3
    module.model.layout.check_compatible(datamodule.layout, model_source=source)
    return datamodule, module


def checkpoint_vocab(path) -> GeneVocab | None:
    """The vocabulary stored with a checkpoint: an official directory's vocab.json, the ``vocab`` entry of our
    .pt / Lightning .ckpt, or that of a sharded (DeepSpeed / FSDP) checkpoint directory's client state."""
    path = Path(path)
    if path.is_dir() and not (path / "vocab.json").is_file():
        for state in (path / "checkpoint" / "mp_rank_00_model_states.pt", path / "meta.pt"):
            if state.is_file():
                obj = torch.load(state, map_location="cpu", weights_only=False)
                vocab = obj.get("vocab") if isinstance(obj, dict) else None
                return GeneVocab(dict(vocab)) if vocab else None
        return None
    try:
        return GeneVocab.from_checkpoint(path)
    except VocabError:
        return None


def check_checkpoint_vocab(path, data_vocab: GeneVocab, resume: bool, allow_extension: bool = False) -> None:
    """Refuse a checkpoint (``pretrained=`` or the one a run resumes from) whose vocabulary is not the data's:
    training would silently map the data's genes onto other genes' embeddings. ``allow_extension``: the data
    appended new tokens on purpose (perturbation ``unknown_genes=new``); the checkpoint's tokens must then be the
    data vocabulary's first ones, with the same ids."""
    ckpt_vocab = checkpoint_vocab(path)
    if ckpt_vocab is None:
        log.warning("checkpoint %s stores no vocabulary: cannot check that it matches the data's", path)
        return
    n = len(ckpt_vocab)
    if allow_extension and len(data_vocab) > n and data_vocab.id_to_token[:n] == ckpt_vocab.id_to_token:
        log.info("the data's vocabulary is the checkpoint's %d tokens + %d new ones", n, len(data_vocab) - n)
        return
    diff = ckpt_vocab.difference(data_vocab, names=("the checkpoint", "the data"))
    if diff is None:
        return
    what = "the run dir's checkpoint" if resume else "the pretrained checkpoint"
    other_way = (
        "or start a new run dir (hydra.run.dir=... or auto_resume=false) to train this data from scratch"
        if resume
        else "or train from scratch without pretrained="
    )
    raise VocabError(
        f"{what} {path} was trained with another vocabulary than the data's: {diff}. Training on it would map "
        f"the data's genes onto other genes' embeddings, so nothing was trained. Either build the data with the "
        f"checkpoint's vocabulary (python scripts/build_corpus.py ... --vocab {path}; for AnnData fine-tuning "
        f"data.vocab={path}), {other_way}."
    )


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Data module (corpus prepared), Lightning module and trainer, all from ``_target_``."""
    datamodule, module = build_modules(cfg)
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks"))
    if not loggers:  # logger=none: nothing to send learning rates to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=trainer_plugins(cfg.trainer)
    )
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

    ``null``: the valid checkpoint with the highest global step in this run dir when ``auto_resume`` (a
    restarted or requeued job picks up where it stopped), else a fresh start. ``last``:
    ``<run dir>/checkpoints/last.ckpt``. Anything else: that file, which must be a checkpoint.
    """
    if ckpt_path in (None, ""):
        found = find_resume_checkpoint(output_dir) if auto_resume else None
        if found is None:
            return None
        log.warning("auto-resume: continuing from %s", found)
        return str(found)
    path = Path(output_dir) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.exists():
        raise CheckpointPathError(f"ckpt_path={ckpt_path!r}: no checkpoint at {path}")
    if not checkpoint_is_valid(path):
        raise CheckpointPathError(
            f"ckpt_path={ckpt_path!r}: {path} is not a training checkpoint of this project (it must be a "
            "Lightning .ckpt holding state_dict and global_step); to start from pretrained weights use "
            "pretrained=<path> instead"
        )
    return str(path)


def keep_previous_metrics(output_dir: Path) -> Path | None:
    """Rename ``<run dir>/csv/metrics.csv`` to the next free ``metrics.<n>.csv`` before the run's CSVLogger starts
    (it deletes an existing metrics.csv): whether the run resumes or restarts from scratch (every checkpoint
    corrupt), the earlier attempt's metrics stay. Only the job's leader (global rank 0) renames."""
    metrics = output_dir / "csv" / "metrics.csv"
    if not is_job_leader() or not metrics.is_file():
        return None
    n = 1
    while (kept := metrics.with_name(f"metrics.{n}.csv")).exists():
        n += 1
    metrics.rename(kept)  # a move inside the run dir, not a write
    log.warning("kept the earlier attempt's metrics as %s", kept)
    return kept


_DDP_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _job_subprocess_cmd(local_rank: int) -> tuple[list[str], str]:
    """Command for DDP rank ``local_rank`` of the current Hydra job: rerun *this job's* composed config.

    Lightning's default reruns ``sys.argv``, which inside a ``--multirun`` sweep (basic or submitit
    launcher) re-executes the whole sweep in every child rank. Hydra saved the job's config under
    ``<job dir>/.hydra``; the child composes exactly that, in the same output dir.
    """
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    script = Path(__file__).resolve().parents[1] / "train.py"
    command = [
        sys.executable,
        str(script),
        "-cp",
        str(job_dir / hc.output_subdir),
        "-cn",
        "config",
        f"hydra.run.dir={job_dir}",
        "hydra.output_subdir=null",
        f"hydra.job.name=ddp_rank_{local_rank}",
    ]
    return command, str(Path.cwd())


def use_job_config_for_ddp_children() -> None:
    """Inside a Hydra multirun job, make Lightning's DDP children rerun only this job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and HydraConfig.get().output_subdir:
        set_hydra_subprocess_cmd(_job_subprocess_cmd)


def write_result(output_dir: Path, cfg: DictConfig, metrics: dict[str, float], summary: dict | None) -> None:
    """One result row per run (``result.json``): the command-line overrides and the final metrics.
    ``scripts/collect_sweep.py`` gathers these into a table."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    row = {
        "task_name": cfg.get("task_name"),
        "seed": cfg.get("seed"),
        "overrides": overrides,
        "metrics": metrics,
        "steps": (summary or {}).get("steps"),
        "cells_per_s": (summary or {}).get("cells_per_s"),
        "output_dir": str(output_dir),
    }
    write_json_atomic(output_dir / "result.json", row)


def run(cfg: DictConfig) -> dict[str, float]:
    """Check the config, lock the run dir, build, (validate,) fit, print and save the summary; returns the final
    metrics. Raises a ``UserInputError`` for a refused input (a refused run leaves no run dir of its own behind) and
    ``RunInterrupted`` when a preemption signal stopped the run after its checkpoint was saved."""
    output_dir = Path(cfg.paths.output_dir)
    lock = RunDirLock(output_dir).acquire() if is_job_leader() else None  # the job's other ranks do not lock
    try:
        return _run_locked(cfg, output_dir)
    finally:
        if lock is not None:
            lock.release()


_STARTED = time.time() - 2.0  # this process's start, with slack for coarse file-system clocks


def _holds_nothing_of_a_run(output_dir: Path) -> bool:
    """True when ``output_dir`` does not exist or holds only what this job wrote before the run: the lock and
    Hydra's ``.hydra/`` records and ``*.log``, all written since this process started (a user's older files there,
    logs included, make it a dir that is never removed)."""
    if not output_dir.exists():
        return True
    for entry in output_dir.iterdir():
        if entry.name in (LOCK_NAME, HOLDER_NAME):
            continue
        if entry.name != ".hydra" and not (entry.suffix == ".log" and entry.is_file()):
            return False
        files = [entry, *entry.rglob("*")] if entry.is_dir() else [entry]
        if any(f.stat().st_mtime < _STARTED for f in files):
            return False
    return True


def _run_locked(cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    leader = is_job_leader()
    new_dir = leader and _holds_nothing_of_a_run(output_dir)
    launch_env = {k: os.environ.get(k) for k in _DDP_LAUNCH_ENV}
    try:
        try:  # every refusal of the user's input comes before training starts
            check_config(cfg)
            log.info("glibc's mmap threshold: %s", set_mmap_threshold(cfg.get("malloc_mmap_threshold")))
            if leader:
                remove_leftover_temp_files(output_dir)
            ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), str(output_dir), bool(cfg.get("auto_resume", False)))
            pl.seed_everything(cfg.seed, workers=True)
            use_job_config_for_ddp_children()
            datamodule, module, trainer = build(cfg)
            if ckpt_path is not None:
                check_checkpoint_vocab(ckpt_path, datamodule.vocab, resume=True)
        except Exception as e:
            if new_dir and find_user_input_error(e) is not None:
                shutil.rmtree(output_dir, ignore_errors=True)  # a refused run leaves no run dir behind
            raise
        try:
            if leader:
                OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
                keep_previous_metrics(output_dir)  # the earlier attempt's csv/metrics.csv -> csv/metrics.<n>.csv
            return _fit_and_report(cfg, output_dir, datamodule, module, trainer, ckpt_path)
        except (OSError, RuntimeError) as e:  # a full disk met by a writer outside our atomic writes (logger, yaml)
            if isinstance(e, UserInputError) or not is_disk_full(e):
                raise
            raise NoSpaceLeftError(getattr(e, "filename", None) or output_dir, f"{type(e).__name__}: {e}") from e
    finally:
        # A sweep runs several jobs in one process: each job's DDP group, and the environment that
        # Lightning's launcher set for it (which would make the next job think its ranks exist), go with it.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in launch_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# A run stopped by a preemption signal exits 128 + the signal number (143 after SIGTERM, 138 after SIGUSR1): what a
# shell reports for a process that signal ended, so `train.py && next_step` stops, SLURM records the job as failed
# (not COMPLETED: an `afterok` dependency does not start on an unfinished model), and a cluster's slurm.conf can
# requeue it with `RequeueExit=143,138`. The checkpoint is saved first; rerunning the same command resumes exactly.
def preempted_exit_code(signum: int) -> int:
    return 128 + int(signum)


def _fit_and_report(cfg: DictConfig, output_dir: Path, datamodule, module, trainer, ckpt_path) -> dict[str, float]:
    if cfg.get("validate_before_fit") and ckpt_path is None:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    summary_cb = next((c for c in trainer.callbacks if isinstance(c, RunSummary)), None)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        raise _preempted(trainer, summary_cb, output_dir) from None

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if cfg.get("task"):  # fine-tuning tasks evaluate after fit: predictions, metrics, figures
        task = instantiate(cfg.task)
        metrics.update(task.evaluate(trainer=trainer, module=module, datamodule=datamodule, output_dir=output_dir))
    if trainer.is_global_zero:
        summary = summary_cb.write(trainer, output_dir / "summary.json") if summary_cb is not None else None
        write_result(output_dir, cfg, metrics, summary)
        if summary is not None:
            print_summary(summary, output_dir)
    return metrics


def _preempted(trainer: pl.Trainer, summary_cb: RunSummary | None, output_dir: Path) -> RunInterrupted:
    """summary.json with ``finished: false`` and the reason; the exception ``train.py`` turns into its exit code."""
    preemption = next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
    signum = preemption.signum if preemption is not None else signal.SIGTERM
    saved = preemption.saved_path if preemption is not None else None
    reason = (
        f"stopped by {signal.Signals(signum).name} at step {trainer.global_step} before the end of training; "
        + (f"saved {saved}; " if saved else "")
        + "rerun the same command to resume"
    )
    if trainer.is_global_zero and summary_cb is not None:
        summary_cb.write(trainer, output_dir / "summary.json", stop_reason=reason)
    return RunInterrupted(reason, exit_code=preempted_exit_code(signum), checkpoint=str(saved) if saved else None)


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
    for key, value in (s.get("val_per_gene") or {}).items():  # e.g. val/generative/gep_vs_per_gene
        if key.endswith("_vs_per_gene"):
            table.add_row(f"{key[4:]} (1.0 = gene means only)", f"{value:.3f}")
    table.add_row("checkpoint (last)", str(s["last_checkpoint"]))
    table.add_row("checkpoint (best)", str(s["best_checkpoint"]))
    table.add_row("logs", str(output_dir))
    Console().print(table)
