"""Every use of a private Lightning name, in one place, checked against the installed Lightning.

Written for pytorch-lightning / lightning-fabric 2.6.6. Each patch first checks that the private
attribute it touches still exists; a Lightning upgrade that moves one fails here, loudly, with the
attribute's name, instead of silently doing nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl

WRITTEN_FOR_LIGHTNING = "2.6.6"


def _require(owner: Any, attribute: str, where: str) -> None:
    if not hasattr(owner, attribute):
        raise RuntimeError(
            f"Lightning {pl.__version__}: {where}.{attribute} no longer exists (scgpt_train/compat.py was written "
            f"for pytorch-lightning {WRITTEN_FOR_LIGHTNING}); update scgpt_train/compat.py for the new location"
        )


def _launcher_modules() -> list[tuple[Any, str]]:
    from lightning_fabric.strategies.launchers import subprocess_script as fabric_launcher
    from pytorch_lightning.strategies.launchers import subprocess_script as pl_launcher

    return [
        (fabric_launcher, "lightning_fabric.strategies.launchers.subprocess_script"),
        (pl_launcher, "pytorch_lightning.strategies.launchers.subprocess_script"),  # imports it by name
    ]


def check_private_api() -> None:
    """Raise ``RuntimeError`` naming the first private attribute this project relies on that is gone."""
    for module, name in _launcher_modules():
        _require(module, "_hydra_subprocess_cmd", name)
    import inspect

    from pytorch_lightning.trainer.connectors.signal_connector import _SignalConnector

    # an instance attribute: set in ``Trainer.__init__``
    if "self._signal_connector = _SignalConnector(" not in inspect.getsource(pl.Trainer.__init__):
        _require(pl.Trainer, "_signal_connector", "pytorch_lightning.Trainer")
    _require(_SignalConnector(None), "received_sigterm", "pytorch_lightning.trainer.connectors._SignalConnector")
    from pytorch_lightning.loops import _FitLoop, _TrainingEpochLoop

    _require(_TrainingEpochLoop, "_should_check_val_fx", "pytorch_lightning.loops._TrainingEpochLoop")
    _require(_FitLoop(None), "_data_fetcher", "pytorch_lightning.loops._FitLoop")


def set_hydra_subprocess_cmd(command_fn: Callable[[int], tuple[list[str], str]]) -> None:
    """Make Lightning's DDP subprocess launcher build child-rank commands with ``command_fn(local_rank)``."""
    for module, name in _launcher_modules():
        _require(module, "_hydra_subprocess_cmd", name)
        module._hydra_subprocess_cmd = command_fn


def request_graceful_stop(trainer: pl.Trainer) -> None:
    """Ask ``trainer`` to stop after the current step as it does on SIGTERM (raises ``SIGTERMException``)."""
    _require(trainer, "_signal_connector", "pytorch_lightning.Trainer")
    connector = trainer._signal_connector
    _require(connector, "received_sigterm", "pytorch_lightning.Trainer._signal_connector")
    connector.received_sigterm = True


def validation_follows(trainer: pl.Trainer) -> bool:
    """Whether Lightning runs a validation right after the training batch that just ended (the decision its
    training epoch loop takes next, in ``on_advance_end``); for ``fault_tolerance.RunCheckpoint``."""
    loop = trainer.fit_loop.epoch_loop
    _require(loop, "_should_check_val_fx", "pytorch_lightning.loops._TrainingEpochLoop")
    _require(trainer.fit_loop, "_data_fetcher", "pytorch_lightning.loops._FitLoop")
    return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
