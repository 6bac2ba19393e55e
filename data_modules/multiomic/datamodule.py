"""Lightning DataModule for paired and mosaic multi-omic fine-tuning (integration: every cell trained and scored).

setup(): read the file (``inputs.py``), run each modality's recipe (``recipes.py``), build one vocabulary
(``vocab.py``: a checkpoint's tokens keep their ids, new tokens appended) and the modality vocabulary, split the
cells (a stratified ``val_fraction`` for checkpoint selection; metrics on all cells), and batch them through
``tokens.tokenize_cells`` (``Batch.modality_ids`` per token). ``obs`` gains ``has_<modality>`` columns and
``modalities`` ("RNA+Protein") saying what each cell has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from torch.utils.data import DataLoader

from data_modules.finetune import FineTuneDataModule, attach_labels, batch_rng
from data_modules.multiomic.inputs import MultiomicInputError, read_multiomic
from data_modules.multiomic.recipes import ModalityRecipe, ProcessedModality, process_modality
from data_modules.multiomic.tokens import TokenTable, resolve_token_rule, tokenize_cells
from data_modules.multiomic.vocab import build_vocab, check_clashes, modality_vocab
from data_modules.preprocess import encode_categories, stratified_split
from data_modules.tokenize.layout import TokenLayout

log = logging.getLogger(__name__)


class MultiomicCollate:
    """Cell indices -> ``Batch`` (picklable for loader workers)."""

    def __init__(self, table, rule, layout, cls_value, mask_ratio, labels, batch_labels, seed):
        self.table, self.rule, self.layout = table, rule, layout
        self.cls_value, self.mask_ratio = cls_value, mask_ratio
        self.labels, self.batch_labels, self.seed = labels, batch_labels, seed

    def __call__(self, indices) -> Any:
        idx = np.sort(np.asarray(indices, dtype=np.int64))
        rng = batch_rng(self.seed, idx)
        batch = tokenize_cells(self.table, idx, self.rule, self.layout, rng, self.cls_value, self.mask_ratio)
        return attach_labels(batch, idx, self.labels, self.batch_labels)


class MultiomicDataModule(FineTuneDataModule):
    """Paired or mosaic multi-omic fine-tuning data (plain constructor values, Hydra).

    Parameters
    ----------
    path : str
        .h5mu or paired .h5ad.
    builder : callable, optional
        ``builder(path)`` writes ``path`` when it does not exist (the demo).
    modalities : dict
        {name: ModalityRecipe fields} (kind rna / protein / atac, key, layer, recipe switches).
    use_modalities : list of str, optional
        The subset of ``modalities`` that becomes tokens (None = all; [RNA] = the RNA-only model).
    label_key, batch_key : str, optional
        obs columns (in a .h5mu also ``<mod>:<column>``).
    vocab : str, optional
        A checkpoint (official dir, .pt, .ckpt) or vocab.json whose tokens keep their ids; None = from scratch.
    unknown_genes : str
        ``append`` | ``drop`` RNA genes the checkpoint lacks.
    token_rule : str
        ``paper`` | ``nonzero`` | ``all``.
    layout : TokenLayout or dict, optional
        The shared TokenLayout.
    cls_value : float
        Input value at ``<cls>`` (official fine-tuning: 0).
    mask_ratio : float, optional
        MLM masking ratio (None: no masking).
    val_fraction : float
        The stratified validation share (checkpoint selection; metrics on all cells).
    batch_size, val_batch_size, num_workers, seed, report_path
        As :class:`~data_modules.finetune.FineTuneDataModule`.
    model_outputs : sequence of str
        Of ``num_batch_labels``, ``n_modalities`` (also gives ``modality_pad_id``).
    withhold : dict, optional
        {modality, key, values}: the mosaic variant of whatever file is read: cells whose obs[key] is in
        ``values`` lose ``modality`` (as if never measured); refused when the data has no such modality / cells.
    """

    def __init__(
        self,
        path: str,
        modalities: dict,
        builder: Callable[[str], Any] | None = None,
        use_modalities: list[str] | None = None,
        label_key: str | None = None,
        batch_key: str | None = None,
        vocab: str | None = None,
        unknown_genes: str = "append",
        token_rule: str = "paper",
        layout: Any = None,
        cls_value: float = 0.0,
        mask_ratio: float | None = 0.4,
        val_fraction: float = 0.1,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        model_outputs: list[str] | tuple[str, ...] = ("num_batch_labels", "n_modalities"),
        report_path: str | None = None,
        withhold: dict | None = None,
    ):
        super().__init__(
            path, builder, vocab, batch_size, val_batch_size, num_workers, seed, report_path, model_outputs
        )
        self.withhold = dict(withhold) if withhold else None
        self.withheld: dict | None = None  # what withhold did (data_report.json)
        recipes = {str(k): ModalityRecipe.from_any(v) for k, v in dict(modalities).items() if v is not None}
        if use_modalities is not None:
            unknown = [m for m in use_modalities if m not in recipes]
            if unknown:
                raise ValueError(f"data.use_modalities names {unknown}, not in data.modalities ({list(recipes)})")
            recipes = {k: v for k, v in recipes.items() if k in list(use_modalities)}
        # RNA first (the official concatenation order), then the others as declared
        self.recipes = dict(sorted(recipes.items(), key=lambda kv: kv[1].kind != "rna"))
        self.label_key, self.batch_key = label_key, batch_key
        self.unknown_genes, self.token_rule_setting = unknown_genes, token_rule
        self.layout = TokenLayout.from_any(layout)
        self.cls_value, self.mask_ratio = float(cls_value), mask_ratio
        self.val_fraction = float(val_fraction)
        self.obs: pd.DataFrame | None = None

    # lifecycle -------------------------------------------------------------------------------
    missing_hint = "download it (python scripts/download_benchmarks.py NAME) or point data.path at your .h5mu / .h5ad"

    def setup(self, stage: str | None = None) -> None:
        if self.obs is not None:
            return
        self.prepare_data()
        inp = read_multiomic(self.path, self.recipes)
        where = Path(self.path).name
        if self.withhold:
            self._withhold(inp, where)
        self.mods: dict[str, ProcessedModality] = {
            name: process_modality(inp.modalities[name], rec, self.layout.n_bins, self.seed)
            for name, rec in self.recipes.items()
        }
        kinds = {name: rec.kind for name, rec in self.recipes.items()}
        base = self.checkpoint_vocab()
        tokens = {name: m.tokens for name, m in self.mods.items()}
        check_clashes(tokens, kinds, base, where, {n: r.token_prefix for n, r in self.recipes.items()})
        if base is not None and self.unknown_genes == "drop":
            for name, m in self.mods.items():
                if m.kind == "rna":
                    self._keep_columns(name, np.array([t in base for t in m.tokens]))
            tokens = {name: m.tokens for name, m in self.mods.items()}
        self._vocab, self.vocab_report = build_vocab(base, tokens, kinds, self.unknown_genes)
        self.modality_vocab = modality_vocab(self.mods)
        self.token_rule = resolve_token_rule(self.token_rule_setting, kinds.values())
        names = list(self.mods)
        self.table = TokenTable(
            bins=sp.hstack([m.bins for m in self.mods.values()], format="csr", dtype=np.float32),
            token_ids=np.concatenate([[self._vocab[t] for t in m.tokens] for m in self.mods.values()]).astype(np.int64),
            mod_ids=np.concatenate([np.full(len(m.tokens), self.modality_vocab[n]) for n, m in self.mods.items()]),
            column_modality=np.concatenate([np.full(len(m.tokens), k) for k, m in enumerate(self.mods.values())]),
            present=np.stack([m.present for m in self.mods.values()], axis=1),
            pad_id=self._vocab.pad_id,
            cls_id=self._vocab.cls_id,
            mod_pad_id=self.modality_vocab["<pad>"],
            mod_cls_id=self.modality_vocab["<cls>"],
        )
        obs = inp.obs.copy()
        for k, name in enumerate(names):
            obs[f"has_{name}"] = self.table.present[:, k]
        obs["modalities"] = ["+".join(n for k, n in enumerate(names) if row[k]) or "none" for row in self.table.present]
        self._encode_obs(obs, where)
        if self.report_path:
            self.write_report()

    def _withhold(self, inp, where: str) -> None:
        """The mosaic transformation on the data read: ``withhold.modality`` removed from the cells whose
        ``obs[withhold.key]`` is in ``withhold.values`` (their rows emptied, ``present`` False)."""
        spec = self.withhold
        missing = [k for k in ("modality", "key", "values") if spec.get(k) in (None, "", [])]
        if missing:
            raise MultiomicInputError(
                f"data.withhold needs modality, key and values (e.g. {{modality: Protein, key: batch, values: [B]}}); "
                f"missing {missing}"
            )
        name, key, values = str(spec["modality"]), str(spec["key"]), [str(v) for v in spec["values"]]
        if name not in inp.modalities:
            raise MultiomicInputError(
                f"{where}: data.withhold.modality={name!r} is not a modality of this run ({list(inp.modalities)}): "
                "the mosaic variant cannot be made from this data"
            )
        column = self._column(inp.obs, key, "withhold.key", where)
        hit = np.isin(column, values)
        mod = inp.modalities[name]
        lose = hit & mod.present
        if not lose.any():
            raise MultiomicInputError(
                f"{where}: no cell with {name} has obs[{key!r}] in {values} (values there: "
                f"{sorted(set(column))[:10]}); the mosaic variant would equal the paired one"
            )
        if (mod.present & ~hit).sum() == 0:
            raise MultiomicInputError(
                f"{where}: withholding {name} from obs[{key!r}] in {values} leaves no cell with {name}"
            )
        mod.present = mod.present & ~hit
        mod.x = sp.csr_matrix(sp.diags(mod.present.astype(np.float32)) @ mod.x, dtype=np.float32)
        mod.x.eliminate_zeros()
        self.withheld = {"modality": name, "key": key, "values": values, "n_cells": int(lose.sum())}
        log.info("%s: %s withheld from %d cells (obs[%r] in %s)", where, name, lose.sum(), key, values)

    def _keep_columns(self, name: str, keep: np.ndarray) -> None:
        m = self.mods[name]
        cols = np.flatnonzero(keep)
        m.tokens = [m.tokens[i] for i in cols]
        m.values, m.counts, m.bins = m.values[:, cols], m.counts[:, cols], m.bins[:, cols]

    def _column(self, obs: pd.DataFrame, key: str, what: str, where: str) -> np.ndarray:
        if key in obs.columns:
            return obs[key].astype(str).to_numpy()
        found = [c for c in obs.columns if c.endswith(f":{key}")]  # MuData: <mod>:<column>
        if found:
            return obs[found[0]].astype(str).to_numpy()
        raise KeyError(f"data.{what}={key!r} is not an obs column of {where} (columns: {list(obs.columns)})")

    def _encode_obs(self, obs: pd.DataFrame, where: str) -> None:
        n = len(obs)
        self.labels = self.batch_labels = None
        if self.label_key:
            raw = self._column(obs, self.label_key, "label_key", where)
            self.labels, self.label_names = encode_categories(raw)
            obs[self.label_key] = raw
        if self.batch_key:
            raw = self._column(obs, self.batch_key, "batch_key", where)
            self.batch_labels, self.batch_names = encode_categories(raw)
            obs[self.batch_key] = raw
        strat = self.labels if self.labels is not None else np.zeros(n, dtype=np.int64)
        tr, va = stratified_split(strat, self.val_fraction, self.seed)
        split = np.full(n, "train", dtype=object)
        split[va] = "val"
        obs["split"] = pd.Categorical(split, categories=["train", "val"])
        self.split, self.obs = split, obs

    # what scgpt_train reads ----------------------------------------------------------------------
    @property
    def model_kwargs(self) -> dict:
        self.setup()
        kw = super().model_kwargs
        if "n_modalities" in self.model_outputs:
            kw["n_modalities"] = len(self.modality_vocab)
            kw["modality_pad_id"] = self.modality_vocab["<pad>"]
        return kw

    def indices(self, split: str) -> np.ndarray:
        self.setup()
        if split in ("all", "eval"):
            return np.arange(len(self.split))
        if split not in ("train", "val"):
            raise ValueError(f"split must be train / val / all / eval, got {split!r}")
        return np.flatnonzero(self.split == split)

    def expression(self, modality: str) -> sp.csr_matrix:
        """(all cells, kept features) preprocessed values of ``modality`` (empty rows where a cell lacks it)."""
        self.setup()
        return self.mods[modality].values

    def counts(self, modality: str) -> sp.csr_matrix:
        self.setup()
        return self.mods[modality].counts

    def report(self) -> dict:
        return {
            "path": self.path,
            "n_cells": int(len(self.split)),
            "cells_per_split": {k: int((self.split == k).sum()) for k in ("train", "val")},
            "modalities": [m.report for m in self.mods.values()],
            "cells_per_modality_set": self.obs["modalities"].value_counts().to_dict(),
            "token_rule": f"{self.token_rule} (setting: {self.token_rule_setting})",
            "vocab": {"size": len(self._vocab), "from": self.vocab_path, **self.vocab_report},
            "modality_vocab": self.modality_vocab,
            "labels": self.label_names,
            "batches": self.batch_names,
            "withheld": self.withheld,
        }

    # loaders --------------------------------------------------------------------------------------
    def loader(self, split: str, shuffle=False, batch_size=None, deterministic=True, masked=True) -> DataLoader:
        idx = self.indices(split)
        if len(idx) == 0:
            raise MultiomicInputError(f"split {split!r} of {self.path} has no cells")
        collate = MultiomicCollate(
            self.table,
            self.token_rule,
            self.layout,
            self.cls_value,
            self.mask_ratio if masked else None,
            self.labels,
            self.batch_labels,
            self.seed if deterministic else None,
        )
        return self.make_loader(idx.tolist(), collate, batch_size, shuffle=shuffle)

    def predict_dataloader(self) -> DataLoader:
        return self.loader("all", masked=False)
