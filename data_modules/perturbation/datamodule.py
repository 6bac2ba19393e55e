"""Perturbation-response fine-tuning data: a GEARS-format h5ad -> split -> control pairs -> ``Batch``.

Each training example is a (perturbed cell, control cell) pair (:mod:`.pairing`): the model reads the control
cell's log1p expression of every gene with the condition's genes flagged and is trained to output the perturbed
cell's expression (:mod:`.inputs` describes the tokens). Conditions are split with the GEARS ``simulation`` split
(:mod:`.splits`; or a split JSON given as ``split_path``), which is written to ``split_out`` (the run dir).

Loaders: ``train`` - pairs of the training conditions (``ctrl`` -> ``ctrl`` identity pairs with
``ctrl_identity``), re-drawn every epoch with ``pairing_mode="redraw"``, shuffled per epoch, at most
``layout.max_genes`` genes per batch (``keep_perturbed_genes``); ``val`` / ``test`` - every cell of those
conditions paired once with a seeded control cell, all genes, in the data's gene order (so a batch's columns are
the data's genes). Every batch carries ``cell_index`` (the perturbed cell), ``obs["control_index"]`` and
``obs["condition"]`` (index into :attr:`PerturbationDataModule.conditions`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_modules.finetune import FineTuneDataModule
from data_modules.perturbation.conditions import CTRL
from data_modules.perturbation.gears_data import PerturbationData, read_gears
from data_modules.perturbation.inputs import (
    N_FLAGS,
    OFFICIAL_FLAG_PAD,
    ZERO_GENE_MODES,
    GeneTokens,
    PerturbationInputError,
    extend_vocab,
    flag_columns,
    gene_positions,
    make_batch,
    map_data_genes,
    select_columns,
)
from data_modules.perturbation.pairing import ControlPairing, Pairs
from data_modules.perturbation.splits import PerturbationSplit, simulation_split
from data_modules.tokenize.layout import TokenLayout
from data_modules.vocab import GeneVocab

log = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "val", "test")


def simulated_description(path) -> str | None:
    """``uns["simulated"]["description"]`` of a simulated dataset (the demo), else None."""
    import anndata as ad

    sim = ad.read_h5ad(path, backed="r").uns.get("simulated")
    if isinstance(sim, dict) and sim.get("is_simulated"):
        return str(sim.get("description", "simulated data"))
    return None


class PairSampler(Sampler):
    """Yields ``(perturbed cell, control cell)`` pairs of the current epoch, shuffled with ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every epoch (``dataloader.sampler``); when nobody does (a wrapped
    sampler), every new iteration counts as the next epoch, so ``redraw`` pairing still changes per epoch."""

    def __init__(self, pairing: ControlPairing, shuffle: bool, seed: int):
        self.pairing, self.shuffle, self.seed = pairing, bool(shuffle), int(seed)
        self.epoch = 0
        self._epoch_set = False
        self._iterated = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_set = int(epoch), True

    def pairs(self) -> Pairs:
        return self.pairing.pairs(self.epoch)

    def __len__(self) -> int:
        return len(self.pairing)

    def __iter__(self):
        if self._iterated and not self._epoch_set:
            self.epoch += 1
        self._iterated, self._epoch_set = True, False
        pairs = self.pairs()
        order = np.arange(len(pairs))
        if self.shuffle:
            order = np.random.default_rng(np.random.SeedSequence([self.seed, 1, self.epoch])).permutation(order)
        for i in order:
            yield int(pairs.perturbed[i]), int(pairs.control[i])


class FixedPairs(Dataset):
    """Evaluation pairs as a map-style dataset (``(perturbed cell, control cell)`` per item)."""

    def __init__(self, pairs: Pairs):
        self.perturbed, self.control = pairs.perturbed, pairs.control

    def __len__(self) -> int:
        return len(self.perturbed)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return int(self.perturbed[i]), int(self.control[i])


class _Items(Dataset):
    """The sampler's items passed through unchanged (the sampler yields the pairs themselves)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item):
        return item


class PairCollate:
    """A list of ``(perturbed, control)`` cell pairs -> ``Batch`` (picklable for worker processes).

    ``subsample``: training batches choose their gene columns (:func:`.inputs.select_columns`); evaluation
    batches use every gene in order. ``seed`` None draws from torch's generator (seeded per worker by Lightning)."""

    def __init__(
        self,
        x: sp.csr_matrix,
        cell_condition_codes: np.ndarray,
        condition_flags: list[np.ndarray],
        tokens: GeneTokens,
        max_genes: int | None,
        keep_perturbed_genes: bool,
        include_zero_genes: str,
        subsample: bool,
        flag_pad: int = OFFICIAL_FLAG_PAD,
        seed: int | None = None,
    ):
        self.x, self.codes, self.condition_flags, self.tokens = x, cell_condition_codes, condition_flags, tokens
        self.max_genes, self.keep_perturbed_genes = max_genes, bool(keep_perturbed_genes)
        self.include_zero_genes, self.subsample, self.flag_pad = include_zero_genes, bool(subsample), int(flag_pad)
        self.seed = seed
        self._calls = 0

    def _rng(self) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        self._calls += 1
        return np.random.default_rng([self.seed, self._calls])

    def columns(self, ctrl_x: np.ndarray, flags: list[np.ndarray]) -> np.ndarray | None:
        """The batch's gene columns (None = all, in order)."""
        n_genes = ctrl_x.shape[1]
        flagged = np.concatenate(flags) if flags else np.zeros(0, np.int64)
        candidates = None
        if self.include_zero_genes == "batch-wise":
            candidates = np.flatnonzero((ctrl_x != 0).any(axis=0))
        if not self.subsample:
            if candidates is None:
                return None
            return select_columns(n_genes, None, flagged, None, self.keep_perturbed_genes, candidates)
        return select_columns(n_genes, self.max_genes, flagged, self._rng(), self.keep_perturbed_genes, candidates)

    def __call__(self, items: Sequence[tuple[int, int]]):
        pert = np.asarray([p for p, _ in items], dtype=np.int64)
        ctrl = np.asarray([c for _, c in items], dtype=np.int64)
        ctrl_x = self.x[ctrl].toarray()
        target_x = self.x[pert].toarray()
        codes = self.codes[pert]
        flags = [self.condition_flags[c] for c in codes]
        cols = self.columns(ctrl_x, flags)
        batch = make_batch(ctrl_x, flags, self.tokens, cols, target_x, self.flag_pad)
        batch.cell_index = torch.from_numpy(pert)
        batch.obs = {"control_index": torch.from_numpy(ctrl), "condition": torch.from_numpy(codes.astype(np.int64))}
        return batch


class PerturbationDataModule(FineTuneDataModule):
    """GEARS-format perturbation data for fine-tuning (plain constructor values; Hydra-instantiable).

    Parameters
    ----------
    path : str
        The GEARS ``perturb_processed.h5ad``.
    builder : callable, optional
        ``builder(path)`` writes ``path`` when it does not exist (the demo).
    vocab : str, optional
        vocab.json / checkpoint (official directory, imported .pt, .ckpt); None = the data's genes.
    layout : TokenLayout or dict, optional
        ``max_genes`` caps training sequences; ``pad_value`` at padded positions.
    include_zero_genes : str
        ``"all"`` (official) or ``"batch-wise"`` (genes non-zero in a control of the batch).
    keep_perturbed_genes : bool
        Training subsets always keep the flagged genes (False: the tutorial's uniform draw).
    unknown_genes : str
        ``"pad"`` (official ``<pad>`` id), ``"mask"``, ``"new"`` (appended to the vocabulary as new tokens; the
        model gets their embedding rows, learned) or ``"error"`` for genes outside the vocab.
    split_path, split_seed, train_gene_set_size, combo_seen2_train_frac, split_out
        A split JSON to use; else the GEARS simulation split with these settings; written to ``split_out``.
    pairing_mode, ctrl_identity, pairing_seed
        ``"fixed"`` (official) or ``"redraw"`` pairing; ctrl -> ctrl pairs in training (official); the draw's seed.
    flag_pad, n_conditions : int
        Condition id at padded positions and the number of condition ids (official 0 / 3).
    batch_size, val_batch_size, num_workers, seed, report_path
        As :class:`~data_modules.finetune.FineTuneDataModule`.
    compute_missing_de : bool
        Compute the top DE genes per condition when the file lacks them.
    """

    def __init__(
        self,
        path: str,
        builder: Callable[[str], Any] | None = None,
        vocab: str | None = None,
        layout: Any = None,
        include_zero_genes: str = "all",
        keep_perturbed_genes: bool = True,
        unknown_genes: str = "pad",
        split_path: str | None = None,
        split_seed: int = 1,
        train_gene_set_size: float = 0.75,
        combo_seen2_train_frac: float = 0.75,
        split_out: str | None = None,
        pairing_mode: str = "fixed",
        ctrl_identity: bool = True,
        pairing_seed: int = 0,
        flag_pad: int = OFFICIAL_FLAG_PAD,
        n_conditions: int = N_FLAGS,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        compute_missing_de: bool = True,
        report_path: str | None = None,
    ):
        super().__init__(path, builder, vocab, batch_size, val_batch_size, num_workers, seed, report_path)
        if include_zero_genes not in ZERO_GENE_MODES:
            raise ValueError(f"include_zero_genes must be one of {ZERO_GENE_MODES}, got {include_zero_genes!r}")
        if pairing_mode not in ("fixed", "redraw"):
            raise ValueError(f"pairing_mode must be 'fixed' or 'redraw', got {pairing_mode!r}")
        if not 0 <= int(flag_pad) < int(n_conditions) or int(n_conditions) < 2:
            raise ValueError(f"flag_pad ({flag_pad}) must be a condition id below n_conditions ({n_conditions}) >= 2")
        self.layout = TokenLayout.from_any(layout)
        self.include_zero_genes, self.keep_perturbed_genes = include_zero_genes, bool(keep_perturbed_genes)
        self.unknown_genes = unknown_genes
        self.split_path, self.split_seed, self.split_out = split_path, int(split_seed), split_out
        self.train_gene_set_size = float(train_gene_set_size)
        self.combo_seen2_train_frac = float(combo_seen2_train_frac)
        self.pairing_mode, self.ctrl_identity, self.pairing_seed = pairing_mode, bool(ctrl_identity), int(pairing_seed)
        self.flag_pad, self.n_conditions = int(flag_pad), int(n_conditions)
        self.compute_missing_de = bool(compute_missing_de)
        self.data: PerturbationData | None = None
        self.appended_genes: list[str] = []

    # lifecycle ------------------------------------------------------------------------------------------------
    missing_hint = (
        "download the GEARS file (see docs/perturbation.md) or point data.path at a GEARS-format perturb_processed.h5ad"
    )

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        data = read_gears(self.path, compute_missing_de=self.compute_missing_de)
        self._vocab = self.checkpoint_vocab()
        if self._vocab is None:
            self._vocab = GeneVocab.from_genes(data.gene_names.tolist())
        self.tokens = map_data_genes(data.gene_names, self._vocab, self.unknown_genes, self.path)
        if self.unknown_genes == "new":  # the same extension the token ids were computed in
            self._vocab, self.appended_genes = extend_vocab(self._vocab, data.gene_names)
        if self.tokens.n_unknown:
            handled = {
                "pad": "official <pad> token, attended",
                "mask": "masked out",
                "new": f"new tokens appended after id {len(self._vocab) - len(self.appended_genes) - 1}, learned",
            }
            log.warning(
                "%s: %d of %d genes are not in the vocabulary (%s): %s",
                self.path,
                self.tokens.n_unknown,
                len(self.tokens.ids),
                handled[self.unknown_genes],
                ", ".join(self.tokens.unknown_genes[:10]),
            )
        self.split = self._make_split(data)
        self.conditions = list(data.conditions)
        code_of = {c: i for i, c in enumerate(self.conditions)}
        self.cell_codes = np.asarray([code_of[c] for c in data.cell_conditions], dtype=np.int64)
        index = gene_positions(data.gene_names)
        self.condition_flags = [flag_columns(c, index, self.path) for c in self.conditions]
        self.cell_split = self.split.cell_splits(data.cell_conditions)
        self.x = data.adata.X.tocsr()
        self.simulated = simulated_description(self.path)
        self.data = data
        if self.split_out:
            self.split.save(self.split_out)
        if self.report_path:
            self.write_report()

    def _make_split(self, data: PerturbationData) -> PerturbationSplit:
        if self.split_path:
            split = PerturbationSplit.load(self.split_path)
            known = set(split.assignment())
            absent = [c for c in data.conditions if c not in known]
            if absent:
                raise PerturbationInputError(
                    f"split {self.split_path} assigns no split to {len(absent)} conditions of {self.path} "
                    f"(e.g. {absent[0]!r}); it was made for other data"
                )
            return split
        return simulation_split(
            data.raw_conditions,
            seed=self.split_seed,
            train_gene_set_size=self.train_gene_set_size,
            combo_seen2_train_frac=self.combo_seen2_train_frac,
        )

    # what scgpt_train.pipeline reads -----------------------------------------------------------------------------
    @property
    def model_kwargs(self) -> dict:
        """The condition embedding the flags need (official: 3 ids, padding row 0)."""
        return {"n_conditions": self.n_conditions, "condition_pad_id": self.flag_pad}

    @property
    def extends_vocab(self) -> bool:
        """True when the vocabulary is the checkpoint's with new tokens appended (``unknown_genes="new"``): the
        vocabulary check then accepts a checkpoint whose tokens are the first ones, unchanged."""
        self.setup()
        return bool(self.appended_genes)

    # cells and pairs ----------------------------------------------------------------------------------------------
    def cells(self, split: str) -> np.ndarray:
        """Cell indices of the conditions of ``split`` (train includes the ``ctrl`` cells)."""
        self.setup()
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        return np.flatnonzero(self.cell_split == split)

    def split_conditions(self, split: str) -> list[str]:
        self.setup()
        return list(getattr(self.split, split))

    @property
    def control_cells(self) -> np.ndarray:
        self.setup()
        return self.data.control_cells

    def pairing(self, split: str) -> ControlPairing:
        """The pairing of ``split``: training as configured; val / test fixed, without identity pairs."""
        cells = self.cells(split)
        if split == "train":
            return ControlPairing(
                self.data.cell_conditions, cells, mode=self.pairing_mode, ctrl_identity=self.ctrl_identity,
                seed=self.pairing_seed,
            )  # fmt: skip
        cells = cells[self.data.cell_conditions[cells] != CTRL]
        offset = SPLIT_NAMES.index(split)
        return ControlPairing(self.data.cell_conditions, cells, mode="fixed", ctrl_identity=False,
                              seed=self.pairing_seed + offset)  # fmt: skip

    def collate(self, subsample: bool, seed: int | None = None) -> PairCollate:
        self.setup()
        return PairCollate(
            self.x, self.cell_codes, self.condition_flags, self.tokens, self.layout.max_genes,
            self.keep_perturbed_genes, self.include_zero_genes, subsample, self.flag_pad, seed,
        )  # fmt: skip

    # loaders --------------------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        pairing = self.pairing("train")
        if len(pairing) == 0:
            raise PerturbationInputError(f"{self.path}: the training split has no cells")
        sampler = PairSampler(pairing, shuffle=True, seed=self.seed)
        return self.make_loader(_Items(len(pairing)), self.collate(True), self.batch_size, sampler=sampler)

    def loader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """Evaluation pairs of ``split`` (every perturbed cell once, seeded control), all genes, in order."""
        pairs = self.pairing(split).pairs()
        if len(pairs) == 0:
            raise PerturbationInputError(f"{self.path}: split {split!r} has no perturbed cells")
        return self.make_loader(FixedPairs(pairs), self.collate(False), batch_size, persistent_workers=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    # reports ----------------------------------------------------------------------------------------------------------
    def report(self) -> dict:
        self.setup()
        train_pairs = self.pairing("train").pairs()
        counts = {s: int((self.cell_split == s).sum()) for s in SPLIT_NAMES}
        n_genes = len(self.tokens.ids)
        return {
            "path": self.path,
            "n_cells": int(self.x.shape[0]),
            "n_genes": n_genes,
            "cells_per_split": counts,
            "conditions_per_split": {s: len(getattr(self.split, s)) for s in SPLIT_NAMES},
            "test_subgroups": {k: len(v) for k, v in self.split.test_subgroup.items()},
            "split_seed": self.split.seed,
            "split_path": self.split_path,
            "genes": self.tokens.report(),
            "pairing": {
                "mode": self.pairing_mode,
                "ctrl_identity": self.ctrl_identity,
                "n_train_pairs": len(train_pairs),
                "identity_fraction": train_pairs.identity_fraction,
            },
            "max_genes": self.layout.max_genes,
            "subsampled": n_genes > self.layout.max_genes,
            "keep_perturbed_genes": self.keep_perturbed_genes,
            "include_zero_genes": self.include_zero_genes,
            "de_source": self.data.de_source,
            "simulated": self.simulated,
        }
