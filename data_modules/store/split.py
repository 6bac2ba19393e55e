"""Deterministic train/validation membership, computed from cell ids, never stored per cell.

``strategy="cell"``: a cell is in validation iff ``hash(seed, cell_id) < val_fraction``
(splitmix64, uniform in [0, 1)). ``strategy="dataset"``: whole source datasets are held
out. The rule and its parameters live in ``manifest["split"]``.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray, seed: int) -> np.ndarray:
    """Vectorized splitmix64 finalizer of ``x + seed * golden``; uint64 in, uint64 out."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(seed) * _GOLDEN + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def uniform_from_ids(cell_ids: np.ndarray, seed: int) -> np.ndarray:
    """A fixed pseudo-random number in [0, 1) per cell id."""
    return (splitmix64(cell_ids, seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_membership(split: dict, cell_ids: np.ndarray, dataset_codes: np.ndarray | None) -> np.ndarray:
    """(n,) bool: True where the cell belongs to the validation split described by ``split``."""
    strategy = split.get("strategy", "cell")
    if strategy == "none":
        return np.zeros(len(cell_ids), dtype=bool)
    if strategy == "cell":
        return uniform_from_ids(np.asarray(cell_ids), int(split["seed"])) < float(split["val_fraction"])
    if strategy == "dataset":
        if dataset_codes is None:
            raise ValueError("a dataset split needs the per-cell 'dataset' obs codes")
        return np.isin(dataset_codes, np.asarray(split["val_dataset_codes"], dtype=np.int64))
    raise ValueError(f"unknown split strategy {strategy!r}; use 'cell', 'dataset' or 'none'")
