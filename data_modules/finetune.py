"""The fine-tune data contract: what the pipeline and the tasks read from a fine-tuning data module, and the base
class the three fine-tune data modules (AnnData, multi-omic, perturbation) share.

:class:`FineTuneData` is the Protocol (``scgpt_train.pipeline`` and ``scgpt_train.tasks`` rely on nothing
else); :class:`FineTuneDataModule` holds the plumbing every implementation needs the same way: the input
path and its builder, the vocabulary, batch sizes and loaders, ``model_kwargs`` from the data-decided label
counts, and the data report (``data_report.json``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from data_modules.atomic import write_text_atomic
from data_modules.batch import Batch
from data_modules.tokenize.layout import TokenLayout
from data_modules.vocab import GeneVocab, VocabSizes

LABEL_OUTPUTS = ("n_cls", "num_batch_labels")  # data-decided model kwargs counted from the labels


class FineTuneData(Protocol):
    """What a fine-tuning run reads from its data module (besides Lightning's hooks and dataloaders): the
    ``datamodule`` that ``scgpt_train.tasks.base.FineTuneTask`` and the pipeline are typed with.

    Attributes
    ----------
    layout : TokenLayout
        The token layout shared with the model.
    vocab : GeneVocab
        The vocabulary the batches' token ids index.
    model_kwargs : dict
        Data-decided model constructor keywords (``n_cls``, ``num_batch_labels``, ``n_conditions`` ...).
    """

    layout: TokenLayout

    @property
    def vocab(self) -> GeneVocab: ...

    @property
    def model_kwargs(self) -> dict: ...

    def report(self) -> dict:
        """What was read and how (the ``data`` entry of ``metrics.json``, ``data_report.json``)."""
        ...

    def loader(self, split: str, *args: Any, **kwargs: Any) -> DataLoader:
        """The cells (or pairs) of ``split`` as ``Batch`` es, in a fixed order."""
        ...


def batch_rng(seed: int | None, idx: np.ndarray) -> np.random.Generator:
    """The generator of one batch: drawn from torch's (seeded per loader worker by Lightning) when ``seed`` is None
    (training); else fixed by ``(seed, first cell, batch size)``, so evaluation batches are the same every epoch."""
    if seed is None:
        return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
    return np.random.default_rng([seed, int(idx[0]), len(idx)])


def attach_labels(batch: Batch, idx: np.ndarray, labels: np.ndarray | None, batch_labels: np.ndarray | None) -> Batch:
    """``batch.labels`` / ``batch.batch_labels`` of the cells ``idx`` (left None when the data has none)."""
    if labels is not None:
        batch.labels = torch.from_numpy(labels[idx])
    if batch_labels is not None:
        batch.batch_labels = torch.from_numpy(batch_labels[idx])
    return batch


class FineTuneDataModule(VocabSizes, pl.LightningDataModule):
    """Base of the fine-tuning data modules (plain constructor values; Hydra-instantiable subclasses).

    Subclasses build ``self._vocab`` (and their cells) in ``setup``, implement :meth:`loader` and :meth:`report`,
    and extend :attr:`model_kwargs`.

    Parameters
    ----------
    path : str
        The input file (h5ad, h5mu, GEARS h5ad).
    builder : callable, optional
        ``builder(path)`` writes ``path`` when it does not exist (the demos); None = the file must exist.
    vocab : str, optional
        vocab.json, official checkpoint directory, imported .pt or Lightning .ckpt; None = the data's genes.
    batch_size, val_batch_size : int
        Training batch size; evaluation batch size (None = ``batch_size``).
    num_workers : int
        DataLoader worker processes.
    seed : int
        Seeds the splits and the evaluation batches' draws.
    report_path : str, optional
        Where ``setup`` writes the data report (``data_report.json``); None = not written.
    model_outputs : sequence of str
        Which data-decided model kwargs :attr:`model_kwargs` exposes (of ``n_cls``, ``num_batch_labels`` and the
        subclass's own).
    """

    missing_hint = "download it (python scripts/download_benchmarks.py NAME) or point data.path at your file"

    def __init__(
        self,
        path: str,
        builder: Callable[[str], Any] | None = None,
        vocab: str | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        report_path: str | None = None,
        model_outputs: list[str] | tuple[str, ...] = (),
    ):
        super().__init__()
        self.path, self.builder, self.vocab_path = str(path), builder, vocab
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size or batch_size)
        self.num_workers, self.seed, self.report_path = int(num_workers), int(seed), report_path
        self.model_outputs = tuple(model_outputs or ())
        self._vocab: GeneVocab | None = None
        self.label_names: list[str] = []
        self.batch_names: list[str] = []

    # lifecycle ----------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if Path(self.path).exists():
            return
        if self.builder is None:
            raise FileNotFoundError(f"{self.path} does not exist: {self.missing_hint}")
        self.builder(self.path)

    def checkpoint_vocab(self) -> GeneVocab | None:
        """The vocabulary ``vocab`` names (its tokens keep their ids), or None when the data's genes make it."""
        return GeneVocab.from_checkpoint(self.vocab_path) if self.vocab_path else None

    # what scgpt_train reads ---------------------------------------------------------------------------------
    @property
    def vocab(self) -> GeneVocab:
        self.setup()
        return self._vocab

    @property
    def n_cls(self) -> int:
        self.setup()
        return len(self.label_names)

    @property
    def num_batch_labels(self) -> int:
        self.setup()
        return len(self.batch_names)

    @property
    def model_kwargs(self) -> dict:
        """``n_cls`` / ``num_batch_labels`` when named in ``model_outputs`` and the data has such labels."""
        return {k: getattr(self, k) for k in LABEL_OUTPUTS if k in self.model_outputs and getattr(self, k) > 0}

    def report(self) -> dict:
        raise NotImplementedError

    def write_report(self, path: str | os.PathLike | None = None) -> Path:
        """The data report as JSON, written atomically to ``path`` (default ``report_path``)."""
        return write_text_atomic(path or self.report_path, json.dumps(self.report(), indent=2, default=str))

    # loaders ------------------------------------------------------------------------------------------------
    def loader(self, split: str, *args: Any, **kwargs: Any) -> DataLoader:
        raise NotImplementedError

    def make_loader(self, items, collate: Callable, batch_size: int | None = None, **kwargs: Any) -> DataLoader:
        """A DataLoader over ``items`` with this module's workers (``batch_size`` None = the evaluation size)."""
        options = {"persistent_workers": self.num_workers > 0, **kwargs}
        size = batch_size or self.val_batch_size
        return DataLoader(items, batch_size=size, collate_fn=collate, num_workers=self.num_workers, **options)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True, batch_size=self.batch_size, deterministic=False)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")
