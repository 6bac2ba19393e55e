"""Predict perturbed expression with a fine-tuned perturbation model.

Two entry points share one forward (:func:`predict_expression`):

- :func:`predict_conditions`: what ``scripts/predict_perturbation.py`` does. For every requested condition, every
  control cell of a pool (``pool_size`` ``"all"`` or N seeded cells, :func:`data_modules.perturbation.sample_controls`)
  is read with the condition's genes flagged; one predicted cell per (condition, pool cell). With an official
  checkpoint and the whole pool, the per-condition mean is the tutorial's ``predict()`` (which averages
  ``pred_perturb`` over the control pool). The tutorial draws its pool with replacement; here every control
  cell of the pool counts once.
- :func:`predict_loader`: the predictions for a data module's evaluation pairs (task evaluation, validation
  metrics), each perturbed cell predicted from its paired control cell.

Inputs follow :mod:`data_modules.perturbation.inputs` (every gene, no ``<cls>``, log1p values, flags; genes outside
the vocabulary as ``<pad>`` tokens by default). Predictions cover every gene of the input: genes the model does not
read (``batch-wise`` zero genes, ``mask``-ed unknown genes) keep their control value.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from data_modules.perturbation.conditions import CTRL, ConditionError, normalize_condition
from data_modules.perturbation.gears_data import PerturbationDataError, check_log_normalized
from data_modules.perturbation.inputs import (
    OFFICIAL_FLAG_PAD,
    ZERO_GENE_MODES,
    GeneTokens,
    PerturbationInputError,
    flag_columns,
    gene_positions,
    make_batch,
    map_data_genes,
    scatter_predictions,
    select_columns,
)
from data_modules.perturbation.pairing import sample_controls
from data_modules.vocab import GeneVocab
from scgpt_train.errors import UserInputError

log = logging.getLogger(__name__)


class PredictionInputError(UserInputError):
    """An input the prediction cannot use; the message names the file, condition or gene."""


def check_perturbation_model(model, source: str = "the checkpoint") -> None:
    """Refuse a model without perturbation flags (condition embedding) and affine decoder."""
    cfg = model.config() if hasattr(model, "config") else {}
    if not cfg.get("n_conditions"):
        raise PredictionInputError(
            f"{source} has no condition (perturbation flag) embedding: it is not a perturbation model; fine-tune one "
            "with experiment=finetune_perturbation_* first"
        )
    if cfg.get("decoder_style") != "affine":
        style = cfg.get("decoder_style")
        log.warning("%s: decoder_style=%r (the official perturbation model uses 'affine')", source, style)


def load_predictor(checkpoint) -> tuple[torch.nn.Module, GeneVocab]:
    """(model in eval mode, vocabulary) of an official directory, an imported ``.pt`` or a Lightning ``.ckpt``
    (:func:`~scgpt_train.inference.load_for_inference`); refuses a model without perturbation flags."""
    from scgpt_train.inference import load_for_inference

    model, vocab = load_for_inference(checkpoint, PredictionInputError)
    check_perturbation_model(model, str(checkpoint))
    return model.eval(), vocab


def _flag_pad(model) -> int:
    cfg = model.config() if hasattr(model, "config") else {}
    pad = cfg.get("condition_pad_id")
    return OFFICIAL_FLAG_PAD if pad is None else int(pad)


@torch.no_grad()
def predict_expression(
    model,
    ctrl_x: np.ndarray,
    flags: Sequence[np.ndarray],
    tokens: GeneTokens,
    batch_size: int = 64,
    include_zero_genes: str = "all",
    keep_perturbed_genes: bool = True,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """(N, G) predicted expression of control cells ``ctrl_x`` (N, G) under the flags ``flags[i]`` (flagged
    columns of row i). ``include_zero_genes="batch-wise"`` reads only genes non-zero in some control of the
    batch (plus the flagged ones with ``keep_perturbed_genes``; the tutorial's ``pred_perturb`` drops them)."""
    if include_zero_genes not in ZERO_GENE_MODES:
        raise ValueError(f"include_zero_genes must be one of {ZERO_GENE_MODES}, got {include_zero_genes!r}")
    was_training = model.training
    model.eval()
    ctrl_x = np.asarray(ctrl_x, dtype=np.float32)
    out = np.empty_like(ctrl_x)
    pad = _flag_pad(model)
    try:
        for start in range(0, len(ctrl_x), batch_size):
            rows = slice(start, start + batch_size)
            x, f = ctrl_x[rows], list(flags[rows])
            cols = None
            if include_zero_genes == "batch-wise":
                flagged = np.concatenate(f) if f else np.zeros(0, np.int64)
                nonzero = np.flatnonzero((x != 0).any(axis=0))
                cols = select_columns(x.shape[1], None, flagged, None, keep_perturbed_genes, nonzero)
            batch = make_batch(x, f, tokens, cols, flag_pad=pad).to(device)
            pred = model(**batch.model_inputs())["mlm_output"].float().cpu().numpy()
            out[rows] = scatter_predictions(pred, x, cols, batch.pad_mask.cpu().numpy())
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def predict_loader(model, loader, device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Predictions for evaluation batches whose columns are the data's genes in order (the perturbation data
    module's val / test loaders): ``pred`` and ``truth`` (N, G), ``condition`` codes, ``cell_index``,
    ``control_index``."""
    was_training = model.training
    model.eval()
    preds, truths, codes, cells, ctrls = [], [], [], [], []
    try:
        for batch in loader:
            batch = batch.to(device)
            out = model(**batch.model_inputs())["mlm_output"].float().cpu().numpy()
            values = batch.values.float().cpu().numpy()
            preds.append(scatter_predictions(out, values, None, batch.pad_mask.cpu().numpy()))
            truths.append(batch.target_values.float().cpu().numpy())
            codes.append(batch.obs["condition"].cpu().numpy())
            cells.append(batch.cell_index.cpu().numpy())
            ctrls.append(batch.obs["control_index"].cpu().numpy())
    finally:
        model.train(was_training)
    return {
        "pred": np.concatenate(preds),
        "truth": np.concatenate(truths),
        "condition": np.concatenate(codes),
        "cell_index": np.concatenate(cells),
        "control_index": np.concatenate(ctrls),
    }


def mean_by_condition(values: np.ndarray, codes: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """``{condition name: mean row}`` over the rows of each condition code present (float64)."""
    out = {}
    for code in np.unique(codes):
        out[names[int(code)]] = np.asarray(values[codes == code], dtype=np.float64).mean(axis=0)
    return out


# the prediction CLI's library part ------------------------------------------------------------------------------------
@dataclass
class ControlCells:
    """Log-normalized control cells (GEARS layout) to predict from."""

    x: np.ndarray  # (cells, genes) float32
    gene_names: np.ndarray
    obs_names: np.ndarray
    var: pd.DataFrame
    source: str
    n_dropped_non_ctrl: int = 0
    notes: list[str] = field(default_factory=list)


def read_controls(path: str | os.PathLike, gene_column: str | None = "gene_name") -> ControlCells:
    """Control cells of a GEARS-layout h5ad: the ``ctrl`` cells when ``obs["condition"]`` exists (other cells are
    left out and counted), else every cell. Genes from ``var[gene_column]`` (default ``gene_name``; the
    ``var_names`` when that column is absent). X must be log1p-normalized."""
    from scgpt_train.inference import read_h5ad_checked

    path = Path(path)
    # missing / not HDF5 / truncated, no cells or genes, NaN / inf / negative values named by cell and gene
    adata = read_h5ad_checked(path, "--controls", PredictionInputError)
    source = str(path)
    dropped = 0
    if "condition" in adata.obs:
        conds = adata.obs["condition"].astype(str).to_numpy()
        try:
            is_ctrl = np.asarray([normalize_condition(c) == CTRL for c in conds])
        except ConditionError as e:
            raise PredictionInputError(f"{source}: obs['condition']: {e}") from None
        if not is_ctrl.any():
            raise PredictionInputError(
                f"{source}: no 'ctrl' cells (obs['condition'] == 'ctrl'); pass control cells, or a file without a "
                "condition column whose cells are all controls"
            )
        dropped = int((~is_ctrl).sum())
        adata = adata[is_ctrl]
    if gene_column and gene_column in adata.var:
        names = adata.var[gene_column].astype(str).to_numpy()
    else:
        names = adata.var_names.astype(str).to_numpy()
    try:
        check_log_normalized(adata.X, source)
    except PerturbationDataError as e:
        raise PredictionInputError(str(e)) from None
    x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    return ControlCells(
        x=np.asarray(x, dtype=np.float32),
        gene_names=names,
        obs_names=adata.obs_names.astype(str).to_numpy(),
        var=adata.var.copy(),
        source=source,
        n_dropped_non_ctrl=dropped,
    )


def predict_conditions(
    model,
    vocab: GeneVocab,
    controls: ControlCells,
    conditions: Sequence[str],
    pool_size: int | str | None = "all",
    seed: int = 0,
    batch_size: int = 64,
    include_zero_genes: str = "all",
    keep_perturbed_genes: bool = True,
    unknown_genes: str = "pad",
    device: str | torch.device = "cpu",
) -> ad.AnnData:
    """One predicted cell per (condition, pool cell): X over the controls' genes, ``obs["condition"]`` (canonical
    name), ``obs["condition_input"]`` (as given), ``obs["control_cell"]``; ``uns["perturbation_prediction"]``
    with the pool size, seed and settings. A condition gene absent from the controls' genes is refused by name."""
    if not conditions:
        raise PredictionInputError("no conditions to predict (pass e.g. --conditions A+ctrl A+B)")
    canonical = []
    for c in conditions:
        try:
            canonical.append(normalize_condition(c))
        except ConditionError as e:
            raise PredictionInputError(str(e)) from None
    index = gene_positions(controls.gene_names)
    try:
        flags = [flag_columns(c, index, controls.source) for c in canonical]
    except PerturbationInputError as e:
        raise PredictionInputError(str(e)) from None
    tokens = map_data_genes(controls.gene_names, vocab, unknown_genes, controls.source)
    for c, f in zip(canonical, flags, strict=True):
        unknown = [controls.gene_names[j] for j in f if not tokens.known[j]]
        if unknown:
            log.warning("condition %s: perturbed gene(s) %s not in the model's vocabulary (<pad> token)", c, unknown)
    try:
        pool = sample_controls(np.arange(len(controls.x)), pool_size, seed)
    except ValueError as e:
        raise PredictionInputError(f"{controls.source}: {e}") from None
    xs, rows_cond, rows_input, rows_ctrl = [], [], [], []
    for given, cond, f in zip(conditions, canonical, flags, strict=True):
        x = controls.x[pool]
        pred = predict_expression(
            model, x, [f] * len(pool), tokens, batch_size, include_zero_genes, keep_perturbed_genes, device
        )
        xs.append(pred)
        rows_cond += [cond] * len(pool)
        rows_input += [str(given)] * len(pool)
        rows_ctrl += controls.obs_names[pool].tolist()
    obs = pd.DataFrame(
        {"condition": rows_cond, "condition_input": rows_input, "control_cell": rows_ctrl},
        index=[f"pred{i}" for i in range(len(rows_cond))],
    )
    out = ad.AnnData(X=np.concatenate(xs).astype(np.float32), obs=obs, var=controls.var.copy())
    out.uns["perturbation_prediction"] = {
        "pool_size": int(len(pool)),
        "pool_size_requested": "all" if pool_size in (None, "all") else int(pool_size),
        "seed": int(seed),
        "conditions": list(dict.fromkeys(canonical)),
        "include_zero_genes": include_zero_genes,
        "keep_perturbed_genes": bool(keep_perturbed_genes),
        "unknown_genes": unknown_genes,
        "n_genes_not_in_vocab": tokens.n_unknown,
        "controls": controls.source,
        "n_non_ctrl_cells_left_out": int(controls.n_dropped_non_ctrl),
    }
    return out


def condition_means_of(predictions: ad.AnnData) -> dict[str, np.ndarray]:
    """Per-condition mean of a :func:`predict_conditions` result (the tutorial's ``predict()`` output)."""
    conds = predictions.obs["condition"].astype(str).to_numpy()
    x = np.asarray(predictions.X, dtype=np.float64)
    return {c: x[conds == c].mean(axis=0) for c in dict.fromkeys(conds)}


def predict_h5ad(
    checkpoint,
    controls_path,
    conditions: Sequence[str],
    out_path,
    pool_size: int | str | None = "all",
    seed: int = 0,
    batch_size: int = 64,
    include_zero_genes: str = "all",
    keep_perturbed_genes: bool = True,
    unknown_genes: str = "pad",
    gene_column: str | None = "gene_name",
    device: str | None = None,
) -> ad.AnnData:
    """``scripts/predict_perturbation.py``: load, predict every (condition, pool cell), write ``out_path``."""
    from scgpt_train.evaluation.report import write_h5ad

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, vocab = load_predictor(checkpoint)
    model.to(device)
    controls = read_controls(controls_path, gene_column)
    pred = predict_conditions(
        model, vocab, controls, conditions, pool_size, seed, batch_size, include_zero_genes,
        keep_perturbed_genes, unknown_genes, device,
    )  # fmt: skip
    pred.uns["perturbation_prediction"]["checkpoint"] = str(checkpoint)
    write_h5ad(pred, out_path)
    return pred
