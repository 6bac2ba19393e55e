"""A SIMULATED GEARS-format perturbation dataset built from real control cells (for CPU demos and tests).

No Perturb-seq data ships with any installed package, so the demo plants known perturbation effects into real
cells: scanpy's ``pbmc68k_reduced`` (700 PBMCs, log-normalized ``.raw``), restricted to the ``n_genes`` most
expressed genes. Every cell is a real cell; cells assigned to a perturbed condition get the planted effect.

What is planted (all seeded, all recorded in ``uns["simulated"]["spec_json"]``):

- **targets**: ``n_targets`` genes drawn from the most expressed genes of the panel.
- **knock-down**: a perturbed target keeps ``knockdown`` (10%) of its normalized counts.
- **downstream program**: each target has its own ``program_size`` genes (never a target), each shifted by a
  log fold change of random sign and magnitude uniform in ``lfc_range`` (natural log, on normalized counts).
- **singles and pairs**: every target as a single (``A+ctrl``) and ``n_pairs`` random pairs (``A+B``). A pair
  knocks down both genes and by default its programs add (log fold changes summed: the additive model is right).
- **non-additive interactions**: a share ``interaction_fraction`` of the pairs interact, in turn ``synergy``
  (summed program x ``synergy_factor``), ``buffering`` (summed program x ``buffering_factor``) or
  ``neomorphic`` (additive plus a new pair-only program of ``program_size`` genes).
- **per-cell efficiency**: each perturbed cell's effect is scaled by a factor uniform in ``efficiency_range``
  (log fold changes x s; knock-down to ``knockdown ** s``), as knock-down efficiency varies between cells.

Cells are dealt to conditions within each source cell type (``deck`` dealing over cells sorted by type), so every
condition gets a similar cell-type mix and condition means differ by the planted effects rather than by
composition. The result is log1p of the changed normalized counts, in GEARS layout (:func:`to_gears_anndata`):
one ``cell_type`` (``pbmc68k_demo``), ``obs["source_cell_type"]`` the real PBMC label.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import anndata as ad
import numpy as np

from data_modules.demo import demo_builder
from data_modules.perturbation.conditions import CTRL, condition_genes, condition_name
from data_modules.perturbation.gears_data import to_gears_anndata, write_h5ad_atomic

DEMO_CELL_TYPE = "pbmc68k_demo"
DEMO_SOURCE = "scanpy.datasets.pbmc68k_reduced() .raw (700 real PBMCs, log-normalized)"
DEMO_PARAMS = {
    "seed": 0,
    "n_genes": 128,
    "n_targets": 20,
    "target_pool": 60,  # targets are drawn from this many most expressed genes
    "n_pairs": 30,
    "cells_per_condition": 9,
    "knockdown": 0.1,
    "program_size": 12,
    "lfc_range": (1.0, 2.0),
    "interaction_fraction": 0.4,
    "synergy_factor": 2.0,
    "buffering_factor": 0.3,
    "efficiency_range": (0.8, 1.0),
}
INTERACTION_TYPES = ("synergy", "buffering", "neomorphic")


def _program(rng: np.random.Generator, pool: np.ndarray, size: int, lfc_range) -> dict:
    genes = np.sort(rng.choice(pool, size=size, replace=False))
    lfc = rng.uniform(*lfc_range, size=size) * rng.choice([-1.0, 1.0], size=size)
    return {"genes": genes.tolist(), "lfc": np.round(lfc, 4).tolist()}


def simulation_spec(gene_names: np.ndarray, mean_expression: np.ndarray, params: dict) -> dict:
    """The planted effects (targets, programs, pairs and their interactions) for a gene panel; seeded."""
    p = {**DEMO_PARAMS, **params}
    rng = np.random.default_rng(p["seed"])
    order = np.argsort(-mean_expression, kind="stable")
    pool = gene_names[order[: p["target_pool"]]]
    targets = sorted(rng.choice(pool, size=p["n_targets"], replace=False).tolist())
    others = np.array([g for g in gene_names if g not in set(targets)])
    programs = {t: _program(rng, others, p["program_size"], p["lfc_range"]) for t in targets}
    all_pairs = list(itertools.combinations(targets, 2))
    chosen = rng.choice(len(all_pairs), size=p["n_pairs"], replace=False)
    pairs = sorted(condition_name(all_pairs[i]) for i in chosen)
    n_inter = int(round(p["interaction_fraction"] * len(pairs)))
    interacting = sorted(rng.choice(pairs, size=n_inter, replace=False).tolist()) if n_inter else []
    interactions = {}
    for i, pair in enumerate(interacting):
        kind = INTERACTION_TYPES[i % len(INTERACTION_TYPES)]
        entry: dict = {"type": kind}
        if kind == "synergy":
            entry["factor"] = p["synergy_factor"]
        elif kind == "buffering":
            entry["factor"] = p["buffering_factor"]
        else:
            entry["program"] = _program(rng, others, p["program_size"], p["lfc_range"])
        interactions[pair] = entry
    singles = [condition_name([t]) for t in targets]
    return {
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
        "targets": targets,
        "programs": programs,
        "conditions": singles + pairs,
        "interactions": interactions,
    }


def condition_log_fold_change(spec: dict, condition: str, gene_names: np.ndarray) -> np.ndarray:
    """The planted log fold change of ``condition`` per gene at full efficiency (knock-down excluded)."""
    index = {g: i for i, g in enumerate(gene_names)}
    lfc = np.zeros(len(gene_names))
    for t in condition_genes(condition):
        prog = spec["programs"][t]
        lfc[[index[g] for g in prog["genes"]]] += prog["lfc"]
    inter = spec["interactions"].get(condition)
    if inter is not None:
        if inter["type"] in ("synergy", "buffering"):
            lfc *= inter["factor"]
        else:
            prog = inter["program"]
            lfc[[index[g] for g in prog["genes"]]] += prog["lfc"]
    return lfc


def _deal_cells(cell_types: np.ndarray, conditions: list[str], per_condition: int, rng) -> np.ndarray:
    """Condition per cell: a deck (every condition once + a share of ctrl) dealt over cells sorted by cell type."""
    n = len(cell_types)
    n_ctrl_per_deck = (n - per_condition * len(conditions)) // per_condition
    if n_ctrl_per_deck < 1:
        raise ValueError(
            f"{n} cells are too few for {len(conditions)} conditions x {per_condition} cells plus controls"
        )
    order = np.lexsort((rng.random(n), cell_types))
    deck = np.array(list(conditions) + [CTRL] * n_ctrl_per_deck, dtype=object)
    labels = np.full(n, CTRL, dtype=object)
    for k in range(per_condition):
        start = k * len(deck)
        labels[order[start : start + len(deck)]] = rng.permutation(deck)
    return labels


def make_perturbation_demo(base: ad.AnnData | None = None, **params) -> ad.AnnData:
    """The demo dataset in memory (GEARS layout, ``uns["simulated"]`` describing what was planted)."""
    p = {**DEMO_PARAMS, **params}
    if base is None:
        from data_modules.demo import pbmc68k_log_normalized

        base = pbmc68k_log_normalized()
    x_all = np.asarray(base.X.toarray() if hasattr(base.X, "toarray") else base.X, dtype=np.float64)
    names_all = base.var_names.astype(str).to_numpy()
    mean_all = x_all.mean(axis=0)
    panel = np.sort(np.argsort(-mean_all, kind="stable")[: p["n_genes"]])
    x, gene_names = x_all[:, panel], names_all[panel]
    spec = simulation_spec(gene_names, x.mean(axis=0), p)

    rng = np.random.default_rng([p["seed"], 1])
    source_types = base.obs["cell_type"].astype(str).to_numpy()
    labels = _deal_cells(source_types, spec["conditions"], p["cells_per_condition"], rng)
    efficiency = np.where(labels == CTRL, 0.0, rng.uniform(*p["efficiency_range"], size=len(labels)))
    index = {g: i for i, g in enumerate(gene_names)}
    counts = np.expm1(x)
    lfc_of = {c: condition_log_fold_change(spec, c, gene_names) for c in spec["conditions"]}
    for i, c in enumerate(labels):
        if c == CTRL:
            continue
        s = efficiency[i]
        counts[i] *= np.exp(s * lfc_of[c])
        for t in condition_genes(c):
            counts[i, index[t]] *= p["knockdown"] ** s
    out = np.log1p(counts).astype(np.float32)

    counts_per_condition = {c: int(np.sum(labels == c)) for c in [CTRL] + spec["conditions"]}
    spec["cells_per_condition"] = counts_per_condition
    description = (
        "SIMULATED perturbation data: real control cells (" + DEMO_SOURCE + ") with planted effects - "
        f"knock-down of each target to {p['knockdown']:.0%} of its counts, a {p['program_size']}-gene downstream "
        f"program per target (|log fold change| in {tuple(p['lfc_range'])}), {p['n_targets']} singles and "
        f"{p['n_pairs']} pairs, {len(spec['interactions'])} pairs non-additive (synergy x{p['synergy_factor']}, "
        f"buffering x{p['buffering_factor']}, neomorphic extra program), per-cell efficiency in "
        f"{tuple(p['efficiency_range'])}. Not real Perturb-seq data."
    )
    uns = {
        "simulated": {
            "is_simulated": True,
            "description": description,
            "source": DEMO_SOURCE,
            "seed": int(p["seed"]),
            "spec_json": json.dumps(spec, sort_keys=True),
        }
    }
    obs_extra = {"source_cell_type": source_types, "source_cell": base.obs_names.astype(str).to_numpy()}
    adata = to_gears_anndata(out, labels, gene_names, DEMO_CELL_TYPE, uns=uns, obs_extra=obs_extra)
    adata.obs["perturbation_efficiency"] = efficiency
    return adata


def demo_spec(adata: ad.AnnData) -> dict:
    """The planted-effect specification stored in a demo dataset (raises if ``adata`` is not simulated)."""
    sim = adata.uns.get("simulated")
    if sim is None or "spec_json" not in sim:
        raise ValueError("this dataset has no uns['simulated'] specification (not the simulated demo)")
    return json.loads(str(sim["spec_json"]))


@demo_builder
def build_perturbation_demo(path: str | os.PathLike, overwrite: bool = False, **params) -> Path:
    """Write the demo to ``path`` (atomically); an existing file is kept unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        return path
    return write_h5ad_atomic(make_perturbation_demo(**params), path)
