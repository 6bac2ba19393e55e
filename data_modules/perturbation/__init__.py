"""Perturbation-response data (GEARS format): condition names, reading, the GEARS simulation split,
control -> perturbed cell pairing, and the simulated demo dataset. Model-independent (numpy / scanpy only).

The model inputs (``inputs``: flags, all genes, ``Batch``) and the Lightning data module (``datamodule``) import
torch and are not imported here: ``from data_modules.perturbation.datamodule import PerturbationDataModule``."""

from data_modules.perturbation.conditions import (
    CTRL,
    ConditionError,
    condition_genes,
    condition_name,
    normalize_condition,
    normalize_conditions,
)
from data_modules.perturbation.gears_data import PerturbationData, PerturbationDataError, from_anndata, read_gears
from data_modules.perturbation.pairing import ControlPairing, Pairs, sample_controls
from data_modules.perturbation.splits import PerturbationSplit, simulation_split, simulation_splits

__all__ = [
    "CTRL",
    "ConditionError",
    "ControlPairing",
    "Pairs",
    "PerturbationData",
    "PerturbationDataError",
    "PerturbationSplit",
    "condition_genes",
    "condition_name",
    "from_anndata",
    "normalize_condition",
    "normalize_conditions",
    "read_gears",
    "sample_controls",
    "simulation_split",
    "simulation_splits",
]
