"""Long jobs never lose finished work: atomic checkpoints, preemption, auto-resume, step-keyed RNG,
non-finite loss guards.

- ``AtomicCheckpointIO``: every checkpoint is written to a temp file, fsynced, then renamed; a full disk is
  reported by path (``NoSpaceLeftError``) and the partial file removed. ``remove_leftover_temp_files``: the temp
  files a killed process left behind are removed at the next start.
- ``RunCheckpoint``: Lightning's ``ModelCheckpoint``, except that a step-interval save at a step that a validation
  follows is written after that validation (a checkpoint from before it would resume past it: the validation, its
  score and the best checkpoint would be lost), and a best / top-k file that is gone at resume is forgotten.
- ``PreemptionCheckpoint``: SIGTERM (and SIGUSR1, SLURM's pre-timeout warning, where Lightning's
  SLURM requeue does not already own it) stops after the current step and saves a checkpoint.
- ``find_resume_checkpoint``: the checkpoint of a run dir with the highest global step that loads
  (file times are not trusted: a copied run dir has them all new); a corrupt one is moved aside to
  ``<name>.corrupt`` with a warning, so the next save can reuse its name.
- ``StepSeed``: torch's RNG (dropout) is re-seeded from (seed, step, rank) before every step, so a
  resumed run draws the same dropout masks as an uninterrupted one whatever else consumed the RNG.
- ``GradientGuard``: logs the gradient norm; on a non-finite loss or gradient, skips the update or
  stops with a message naming the step and the loss term.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from data_modules.atomic import atomic_path
from scgpt_train.compat import request_graceful_stop, validation_follows
from scgpt_train.errors import NoSpaceLeftError

log = logging.getLogger(__name__)

PREEMPT_PREFIX = "preempted-step"


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def out_of_space(directory: Path, error: BaseException) -> bool:
    """Whether ``error`` (raised while writing into ``directory``) came from a full file system or quota.
    torch's writer reports a full disk as ``RuntimeError: ... iostream error`` / ``unexpected pos``, without an
    errno, so when the error carries none, a small probe write into ``directory`` asks the file system."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        with tempfile.TemporaryFile(dir=directory) as probe:
            probe.write(b"\0" * (1 << 20))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as e:
        return e.errno in _NO_SPACE
    return False


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a hidden temp file in the same dir, fsync, rename (``data_modules.atomic``):
    a crash never leaves a half file; a full disk raises ``NoSpaceLeftError`` naming the file, and the partial temp
    file is removed."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        try:
            with atomic_path(path) as tmp:
                try:
                    torch.save(checkpoint, tmp)
                except Exception as e:  # decide while the partial file still takes its space
                    if out_of_space(path.parent, e):
                        raise NoSpaceLeftError(path, f"{type(e).__name__}: {e}") from e
                    raise
        except OSError as e:  # fsync / rename
            if e.errno in _NO_SPACE:
                raise NoSpaceLeftError(path, os.strerror(e.errno)) from e
            raise


_TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp$")  # data_modules.atomic: .<name>.<random>.tmp


def leftover_temp_files(output_dir: str | os.PathLike) -> list[Path]:
    """Temp files of atomic writes (``.last.ckpt.<random>.tmp``, ...) in a run dir and its ``checkpoints/``: what a
    process killed while writing left behind. Read-only."""
    output_dir = Path(output_dir)
    found = []
    for directory in (output_dir, output_dir / "checkpoints"):
        if directory.is_dir():
            found += [p for p in directory.iterdir() if p.is_file() and _TEMP_FILE.match(p.name)]
    return sorted(found)


def remove_leftover_temp_files(output_dir: str | os.PathLike) -> list[Path]:
    """Remove ``leftover_temp_files`` (call it only while holding the run dir's lock: no writer is alive)."""
    removed = []
    for path in leftover_temp_files(output_dir):
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        removed.append(path)
        log.warning("removed %s (%.1f MB), left by a process killed while writing it", path, size / 1e6)
    return removed


def checkpoint_is_valid(path: Path) -> bool:
    return checkpoint_global_step(path) is not None


def checkpoint_global_step(path: Path) -> int | None:
    """The global step a checkpoint holds, or None when it is not a loadable checkpoint of this project.
    A sharded (DeepSpeed / FSDP) checkpoint dir is not loaded: its step comes from its name (``step<N>``)."""
    if path.is_dir():
        if not sharded_checkpoint_is_complete(path):
            return None
        match = re.search(r"step(\d+)", path.name)
        return int(match.group(1)) if match else -1
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # truncated zip, bad pickle, ...
        log.warning("checkpoint %s is unreadable (%s: %s)", path, type(e).__name__, e)
        return None
    if not (isinstance(ckpt, dict) and "state_dict" in ckpt and "global_step" in ckpt):
        log.warning("%s is not a Lightning checkpoint (no state_dict / global_step)", path)
        return None
    return int(ckpt["global_step"])


def move_aside(path: Path) -> Path | None:
    """Rename a corrupt checkpoint to ``<name>.corrupt`` (``.corrupt2``, ... if taken); None if it is gone
    (another rank moved it first)."""
    target = path.with_name(path.name + ".corrupt")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt{n}")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    return target


def sharded_checkpoint_is_complete(path: Path) -> bool:
    """A DeepSpeed checkpoint dir holds ``checkpoint/*model_states.pt`` (and its optimizer shards);
    a torch.distributed.checkpoint (FSDP) dir holds ``.metadata``."""
    if (path / ".metadata").exists():
        return True
    model_states = list((path / "checkpoint").glob("*model_states.pt"))
    optim_states = list((path / "checkpoint").glob("*optim_states.pt"))
    if not model_states or not optim_states:
        log.warning("sharded checkpoint %s is incomplete (model or optimizer states missing)", path)
        return False
    return True


def scan_checkpoints(output_dir: str | os.PathLike) -> tuple[list[tuple[int, Path]], list[Path]]:
    """Read-only look at a run dir's checkpoints (``checkpoints/*.ckpt`` and Lightning's ``hpc_ckpt_*.ckpt``):
    ``([(global step, path), ...] of the loadable ones, highest step first (ties: newer first), [corrupt paths])``."""
    output_dir = Path(output_dir)
    candidates = list((output_dir / "checkpoints").glob("*.ckpt")) + list(output_dir.glob("hpc_ckpt_*.ckpt"))
    candidates = [p for p in candidates if not p.is_symlink() and not p.name.startswith(".")]
    valid: list[tuple[int, int, Path]] = []  # (global step, mtime ns, path)
    corrupt: list[Path] = []
    for path in candidates:
        step = checkpoint_global_step(path)
        if step is None:
            corrupt.append(path)
        else:
            valid.append((step, path.stat().st_mtime_ns, path))
    valid.sort(key=lambda v: (v[0], v[1]), reverse=True)
    return [(step, path) for step, _, path in valid], sorted(corrupt)


def find_resume_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The loadable checkpoint of a run dir with the highest global step, read from each checkpoint. Ties go
    to the newer file. Corrupt ones are moved aside to ``<name>.corrupt``."""
    valid, corrupt = scan_checkpoints(output_dir)
    for path in corrupt:
        moved = move_aside(path) if path.is_file() else None
        where = f"moved it aside to {moved.name}" if moved else "left it in place"
        if valid:
            log.warning(
                "checkpoint %s is corrupt; %s; resuming from the valid checkpoint with the highest step", path, where
            )
        else:
            log.warning("checkpoint %s is corrupt; %s; no valid checkpoint remains: starting from scratch", path, where)
    return valid[0][1] if valid else None


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that never writes a step-interval checkpoint from before the validation of its step.

    Lightning saves ``every_n_train_steps`` checkpoints at the end of the training batch, before the validation
    of that step; a run resumed from such a file skips the validation (Lightning treats it as done), so when a
    kill came before the validation's own checkpoint was written, the validation result, the best checkpoint and its
    score were lost for good. Here such a save waits for the end of that validation. At resume, best / top-k files
    that no longer exist (moved aside as corrupt, deleted) are forgotten, so ``best_model_path`` names a real file.
    The state key is ``ModelCheckpoint``'s, so checkpoints written before this class existed resume unchanged.
    """

    _after_validation_step: int | None = None

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self._every_n_train_steps
        if n >= 1 and trainer.global_step % n == 0 and validation_follows(trainer):
            self._after_validation_step = trainer.global_step
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._after_validation_step is None or self._after_validation_step != trainer.global_step:
            return
        self._after_validation_step = None
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        gone = [p for p in self.best_k_models if not Path(p).exists()]
        for path in gone:
            del self.best_k_models[path]
        if self.best_model_path and not Path(self.best_model_path).exists():
            gone.append(self.best_model_path)
            self.best_model_path, self.best_model_score = "", None
        if not gone:
            return
        log.warning("checkpoint(s) %s no longer exist: no longer counted as best / top-k", ", ".join(sorted(set(gone))))
        if self.best_k_models:
            best = (min if self.mode == "min" else max)(self.best_k_models, key=self.best_k_models.get)
            self.best_model_path, self.best_model_score = best, self.best_k_models[best]
            kth = (max if self.mode == "min" else min)(self.best_k_models, key=self.best_k_models.get)
            self.kth_best_model_path, self.kth_value = kth, self.best_k_models[kth]
        else:
            self.kth_best_model_path = ""
            self.kth_value = torch.tensor(math.inf if self.mode == "min" else -math.inf)


class PreemptionCheckpoint(pl.Callback):
    """Save ``checkpoints/preempted-step<N>.ckpt`` when the run is stopped by SIGTERM / SIGUSR1; ``signum`` is the
    signal that stopped it (SIGTERM unless one of the other requested signals came)."""

    def __init__(self, dirpath: str, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")):
        self.dirpath = Path(dirpath)
        self.signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self.saved_path: Path | None = None
        self.signum: int = signal.SIGTERM

    def on_fit_start(self, trainer, pl_module):
        # Lightning turns SIGTERM into a clean SIGTERMException after the current step; give other
        # requested signals the same meaning unless something (SLURM auto-requeue) already owns them.
        for name in self.signals:
            signum = getattr(signal, name)
            if signum == signal.SIGTERM:
                continue
            current = signal.getsignal(signum)
            if current in (signal.SIG_DFL, signal.SIG_IGN, None):
                self._previous[signum] = current
                signal.signal(signum, lambda received, _frame: self._stop(trainer, received))

    def _stop(self, trainer, signum: int) -> None:
        self.signum = signum
        request_graceful_stop(trainer)

    def on_fit_end(self, trainer, pl_module):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_exception(self, trainer, pl_module, exception):
        if not isinstance(exception, SIGTERMException):
            return
        path = self.dirpath / f"{PREEMPT_PREFIX}{trainer.global_step:07d}.ckpt"
        trainer.save_checkpoint(path)
        self.saved_path = path
        log.warning("preempted at step %d: saved %s; rerun the same command to resume", trainer.global_step, path)


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed from (seed, step, rank) (splitmix-style mixing)."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & (2**63 - 1)


class StepSeed(pl.Callback):
    """Re-seed torch's RNG before every training step from (seed, global_step, rank)."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(step_seed(self.seed, trainer.global_step, trainer.global_rank))


class GradientGuard(pl.Callback):
    """Log ``train/grad_norm``; on a non-finite loss or gradient skip the update or stop.

    ``action="skip"`` drops this step's gradients (the optimizer leaves every parameter and its
    state untouched) and counts ``train/skipped_steps``; ``action="stop"`` raises an error that
    names the step and the loss terms that were not finite.
    """

    def __init__(self, action: str = "skip", log_norm: bool = True, max_skips: int = 100):
        if action not in ("skip", "stop"):
            raise ValueError(f"GradientGuard action must be 'skip' or 'stop', not {action!r}")
        self.action = action
        self.log_norm = log_norm
        self.max_skips = max_skips
        self.skipped = 0

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))

    @staticmethod
    def _bad_terms(trainer) -> list[str]:
        return [
            k
            for k, v in trainer.callback_metrics.items()
            if k.startswith("train/") and torch.is_tensor(v) and v.numel() == 1 and not torch.isfinite(v)
        ]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
        if math.isfinite(float(norm)):
            if self.log_norm:
                pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
            return
        terms = self._bad_terms(trainer) or ["(loss finite; gradient not finite)"]
        message = f"non-finite loss/gradient at step {trainer.global_step}: {', '.join(terms)}"
        if self.action == "stop":
            raise FloatingPointError(message + " (set callbacks.gradient_guard.action=skip to skip such steps)")
        self.skipped += 1
        log.warning("%s; skipping the update (%d skipped so far)", message, self.skipped)
        if self.skipped > self.max_skips:
            raise FloatingPointError(f"{message}; more than {self.max_skips} steps skipped, stopping")
        for p in pl_module.parameters():
            p.grad = None
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)


class ReplicaConsistencyCheck(pl.Callback):
    """At the end of training, check that every data-parallel rank holds the same weights.

    Each rank hashes its parameters (float64 sums of value and value x position, per tensor); rank 0
    writes ``replica_check.json`` with every rank's digest and raises if they differ.
    """

    def __init__(self, path: str | None = None):
        self.path = path

    @staticmethod
    def digest(module: torch.nn.Module) -> torch.Tensor:  # (2,) float64
        total = torch.zeros(2, dtype=torch.float64)
        for p in module.parameters():
            flat = p.detach().double().flatten().cpu()
            total += torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()])
        return total

    def on_train_end(self, trainer, pl_module):
        local = self.digest(pl_module).to(pl_module.device)
        gathered = trainer.strategy.all_gather(local)  # (world, 2) under DDP, (2,) alone
        gathered = gathered.reshape(-1, 2).cpu()
        if trainer.is_global_zero:
            import json

            same = bool(torch.equal(gathered, gathered[:1].expand_as(gathered)))
            if self.path:
                Path(self.path).write_text(
                    json.dumps({"world_size": trainer.world_size, "identical": same, "digests": gathered.tolist()})
                )
            if not same:
                raise RuntimeError(f"data-parallel ranks diverged: parameter digests {gathered.tolist()}")
