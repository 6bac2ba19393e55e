"""The GEARS ``simulation`` split, reimplemented from its definition (GEARS ``DataSplitter``, cell-gears 0.1.x).

Definition, on the perturbed conditions (``ctrl`` excluded), with a seed ``s``:

1. The perturbed genes (sorted, unique) are drawn without replacement with ``numpy.random.RandomState(s)``:
   ``int(n_genes * train_gene_set_size)`` of them are *train genes*, the rest are *unseen genes*.
2. Singles of train genes go to train; singles of unseen genes are test (``unseen_single``).
3. Pairs with exactly one train gene are test (``combo_seen1``); pairs with none are test (``combo_seen0``).
4. Pairs with two train genes, sorted by name, are drawn with a fresh ``RandomState(s)``:
   ``int(n * combo_seen2_train_frac)`` go to train, the rest are test (``combo_seen2``).
5. Validation is carved from train by running steps 1-4 again on the train conditions with fractions 0.9 and
   0.9 and the same seed; what that run holds out is validation (with its own four subgroups).
6. ``ctrl`` is added to train.

GEARS draws step 4 on the condition names as spelled in the data (``numpy.setdiff1d`` sorts them), so for an
exact match with GEARS this module sorts by the spelling it was given, while everything it returns uses the
canonical names of :mod:`.conditions`. Two spellings of one condition (``ctrl+A`` and ``A+ctrl``) are merged
(the first spelling seen is used for sorting; GEARS would treat them as two conditions); the merge is recorded.

The split is written as JSON (:meth:`PerturbationSplit.save`) and reloads to an equal object.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_modules.atomic import write_json_atomic
from data_modules.perturbation.conditions import CTRL, condition_genes, normalize_condition

SUBGROUPS = ("combo_seen0", "combo_seen1", "combo_seen2", "unseen_single")
SPLIT_FORMAT = "gears_simulation_split"
SPLIT_VERSION = 1
VAL_TRAIN_GENE_SET_SIZE = 0.9
VAL_COMBO_SEEN2_TRAIN_FRAC = 0.9


@dataclass
class PerturbationSplit:
    """Canonical condition names per split and the GEARS subgroups of test and validation."""

    train: list[str]
    val: list[str]
    test: list[str]
    test_subgroup: dict[str, list[str]]
    val_subgroup: dict[str, list[str]]
    seed: int
    train_gene_set_size: float = 0.75
    combo_seen2_train_frac: float = 0.75
    split_type: str = "simulation"
    merged_spellings: dict[str, list[str]] = field(default_factory=dict)

    def assignment(self) -> dict[str, str]:
        """condition -> ``"train"`` / ``"val"`` / ``"test"``."""
        out = {c: "train" for c in self.train}
        out.update({c: "val" for c in self.val})
        out.update({c: "test" for c in self.test})
        return out

    def split_of(self, condition: str) -> str:
        cond = normalize_condition(condition)
        assignment = self.assignment()
        if cond not in assignment:
            raise KeyError(f"condition {condition!r} is in no split (seed {self.seed})")
        return assignment[cond]

    def subgroup_of(self, condition: str) -> str | None:
        """The test or validation subgroup of ``condition`` (None for train conditions)."""
        cond = normalize_condition(condition)
        for groups in (self.test_subgroup, self.val_subgroup):
            for name, members in groups.items():
                if cond in members:
                    return name
        return None

    def cell_splits(self, cell_conditions: Iterable[str]) -> np.ndarray:
        """Per-cell split labels; a condition in no split raises, naming it."""
        assignment = self.assignment()
        cache: dict[str, str] = {}
        out = []
        for c in cell_conditions:
            if c not in cache:
                cond = normalize_condition(c)
                if cond not in assignment:
                    raise KeyError(f"condition {c!r} of the data is in no split (seed {self.seed})")
                cache[c] = assignment[cond]
            out.append(cache[c])
        return np.asarray(out, dtype=object)

    def to_dict(self) -> dict:
        return {"format": SPLIT_FORMAT, "version": SPLIT_VERSION, **asdict(self)}

    def save(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> PerturbationSplit:
        if d.get("format") != SPLIT_FORMAT:
            raise ValueError(f"not a {SPLIT_FORMAT} file (format={d.get('format')!r})")
        if d.get("version") != SPLIT_VERSION:
            raise ValueError(f"{SPLIT_FORMAT} version {d.get('version')!r} is not supported (expected {SPLIT_VERSION})")
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in keys})

    @classmethod
    def load(cls, path: str | os.PathLike) -> PerturbationSplit:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def _draw(values: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``numpy.random.seed(seed); numpy.random.choice(values, n, replace=False)`` without the global state."""
    if n == 0:
        return values[:0]
    return np.random.RandomState(seed).choice(values, n, replace=False)


def _simulation_round(
    items: dict[str, tuple[str, ...]], spelling: dict[str, str], gene_frac: float, combo_frac: float, seed: int
) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """One GEARS ``get_simulation_split`` on canonical conditions -> (train, held out, subgroups)."""
    genes = np.unique([g for gs in items.values() for g in gs])
    train_genes = set(_draw(genes, int(len(genes) * gene_frac), seed).tolist()) if len(genes) else set()

    singles = [c for c, gs in items.items() if len(gs) == 1]
    combos = [c for c, gs in items.items() if len(gs) == 2]
    n_seen = {c: sum(g in train_genes for g in items[c]) for c in combos}

    single_train = [c for c in singles if items[c][0] in train_genes]
    unseen_single = [c for c in singles if items[c][0] not in train_genes]
    seen1 = [c for c in combos if n_seen[c] == 1]
    seen0 = [c for c in combos if n_seen[c] == 0]
    by_spelling = {spelling[c]: c for c in combos if n_seen[c] == 2}
    pool = np.array(sorted(by_spelling), dtype=object)
    chosen = set(_draw(pool, int(len(pool) * combo_frac), seed).tolist())
    combo_train = [by_spelling[s] for s in pool if s in chosen]
    seen2 = [by_spelling[s] for s in pool if s not in chosen]

    train = single_train + combo_train
    held = seen1 + seen2 + unseen_single + seen0
    assert len(train) + len(held) == len(items)
    groups = {"combo_seen0": seen0, "combo_seen1": seen1, "combo_seen2": seen2, "unseen_single": unseen_single}
    return train, held, {k: sorted(v) for k, v in groups.items()}


def simulation_split(
    conditions: Sequence[str],
    seed: int = 1,
    train_gene_set_size: float = 0.75,
    combo_seen2_train_frac: float = 0.75,
) -> PerturbationSplit:
    """The GEARS ``simulation`` split of ``conditions`` (any spelling; ``ctrl`` may be included or not).

    Defaults are GEARS' (train gene fraction 0.75, seen-2 train fraction 0.75; the paper used seed 1).
    Returns canonical names; ``ctrl`` is always in train.
    """
    fractions = {"train_gene_set_size": train_gene_set_size, "combo_seen2_train_frac": combo_seen2_train_frac}
    for name, frac in fractions.items():
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {frac}")
    spellings: dict[str, list[str]] = {}
    for raw in conditions:
        cond = normalize_condition(raw)
        if cond != CTRL and str(raw).strip() not in spellings.setdefault(cond, []):
            spellings[cond].append(str(raw).strip())
    items = {c: condition_genes(c) for c in spellings}
    spelling = {c: s[0] for c, s in spellings.items()}  # the first spelling seen sorts, as GEARS sorts names
    merged = {c: s for c, s in spellings.items() if len(s) > 1}

    train, test, test_groups = _simulation_round(items, spelling, train_gene_set_size, combo_seen2_train_frac, seed)
    train_items = {c: items[c] for c in train}
    train, val, val_groups = _simulation_round(
        train_items, spelling, VAL_TRAIN_GENE_SET_SIZE, VAL_COMBO_SEEN2_TRAIN_FRAC, seed
    )
    return PerturbationSplit(
        train=sorted(train) + [CTRL],
        val=sorted(val),
        test=sorted(test),
        test_subgroup=test_groups,
        val_subgroup=val_groups,
        seed=int(seed),
        train_gene_set_size=float(train_gene_set_size),
        combo_seen2_train_frac=float(combo_seen2_train_frac),
        merged_spellings=merged,
    )


def simulation_splits(
    conditions: Sequence[str], seeds: Iterable[int] = (1, 2, 3, 4, 5), **kwargs
) -> list[PerturbationSplit]:
    """One :func:`simulation_split` per seed (the paper reports seed 1; several seeds give mean +- sd)."""
    return [simulation_split(conditions, seed=s, **kwargs) for s in seeds]
