"""Control -> perturbed cell pairs for perturbation-response training.

The model reads a control cell (the input, with the perturbed genes flagged) and is trained to output a perturbed
cell of the condition (the target). Which control cell goes with which perturbed cell is a draw:

- ``mode="fixed"`` (official GEARS / scGPT tutorial): each perturbed cell gets one control cell drawn uniformly at
  random (with replacement across perturbed cells) once, and keeps it for every epoch.
- ``mode="redraw"``: the draw is repeated every epoch with seed ``(seed, epoch)``, so over epochs each perturbed
  cell meets many control cells. Epoch 0 of ``redraw`` is exactly the ``fixed`` pairing.

``ctrl_identity=True`` (official): control cells that belong to the paired set are also training examples,
paired with themselves (input = target = the same control cell; GEARS' ``ctrl`` condition). With ``False`` they
are left out, so every pair teaches a perturbation. The control pool (where inputs come from) defaults to every
``ctrl`` cell of the data, as in GEARS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from data_modules.perturbation.conditions import CTRL, normalize_conditions

PAIRING_MODES = ("fixed", "redraw")


@dataclass(frozen=True)
class Pairs:
    """Aligned arrays: ``control[i]`` is the input cell of target cell ``perturbed[i]`` (indices into the data)."""

    perturbed: np.ndarray
    control: np.ndarray
    conditions: np.ndarray

    def __len__(self) -> int:
        return len(self.perturbed)

    @property
    def identity_fraction(self) -> float:
        """Share of ctrl -> ctrl identity pairs (input cell == target cell)."""
        return float(np.mean(self.perturbed == self.control)) if len(self) else 0.0


class ControlPairing:
    """Seeded pairing of the cells ``cells`` (indices into ``cell_conditions``) with control cells.

    ``cell_conditions``: the condition of every cell of the data (any spelling). ``cells``: the cells to pair
    (e.g. the training split, ``ctrl`` cells included); default all. ``control_pool``: indices of the control
    cells inputs are drawn from; default every ``ctrl`` cell.
    """

    def __init__(
        self,
        cell_conditions: Sequence[str],
        cells: Sequence[int] | np.ndarray | None = None,
        control_pool: Sequence[int] | np.ndarray | None = None,
        mode: str = "fixed",
        ctrl_identity: bool = True,
        seed: int = 0,
    ):
        if mode not in PAIRING_MODES:
            raise ValueError(f"pairing mode {mode!r} is not one of {PAIRING_MODES}")
        conditions = np.asarray(normalize_conditions(cell_conditions), dtype=object)
        is_ctrl = conditions == CTRL
        cells = np.arange(len(conditions)) if cells is None else np.asarray(cells, dtype=np.int64)
        if cells.size and (cells.min() < 0 or cells.max() >= len(conditions)):
            raise IndexError(f"cell indices must be in [0, {len(conditions)}), got {cells.min()}..{cells.max()}")
        pool = np.flatnonzero(is_ctrl) if control_pool is None else np.asarray(control_pool, dtype=np.int64)
        if pool.size == 0:
            raise ValueError("no control cells to pair with: the data has no 'ctrl' cells (or the pool is empty)")
        not_ctrl = pool[~is_ctrl[pool]]
        if not_ctrl.size:
            raise ValueError(
                f"control_pool holds cells that are not 'ctrl' (e.g. cell {not_ctrl[0]}: {conditions[not_ctrl[0]]!r})"
            )
        self.mode = mode
        self.ctrl_identity = bool(ctrl_identity)
        self.seed = int(seed)
        self.control_pool = pool
        self._conditions = conditions
        self._ctrl_cells = cells[is_ctrl[cells]] if self.ctrl_identity else cells[:0]
        self._pert_cells = cells[~is_ctrl[cells]]
        self._fixed: Pairs | None = None

    def __len__(self) -> int:
        return len(self._ctrl_cells) + len(self._pert_cells)

    def _draw(self, epoch: int) -> Pairs:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch)]))
        inputs = self.control_pool[rng.integers(0, len(self.control_pool), size=len(self._pert_cells))]
        perturbed = np.concatenate([self._pert_cells, self._ctrl_cells])
        control = np.concatenate([inputs, self._ctrl_cells])
        return Pairs(perturbed=perturbed, control=control, conditions=self._conditions[perturbed])

    def pairs(self, epoch: int = 0) -> Pairs:
        """The pairs of ``epoch`` (the same for every epoch in ``fixed`` mode)."""
        if self.mode == "fixed":
            if self._fixed is None:
                self._fixed = self._draw(0)
            return self._fixed
        return self._draw(epoch)


def sample_controls(control_pool: Sequence[int] | np.ndarray, n: int | str | None, seed: int = 0) -> np.ndarray:
    """A seeded subset (without replacement, sorted) of ``n`` control cells; ``n`` of None / ``"all"`` keeps all.

    Used for prediction pools (the reverse-perturbation protocol predicts each candidate from 40 control cells).
    """
    pool = np.asarray(control_pool, dtype=np.int64)
    if n is None or n == "all":
        return np.sort(pool)
    n = int(n)
    if n <= 0:
        raise ValueError(f"pool size must be positive, got {n}")
    if n > len(pool):
        raise ValueError(f"pool size {n} exceeds the {len(pool)} control cells available")
    return np.sort(np.random.default_rng(seed).choice(pool, size=n, replace=False))
