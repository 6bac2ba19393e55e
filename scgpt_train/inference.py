"""Inference: the one way every CLI, the API and the tasks load a checkpoint for inference
(:func:`load_for_inference`) and read an h5ad (:func:`read_h5ad_checked`); the embedding of an h5ad file
(:func:`embed_h5ad`, ``scripts/embed.py``, ``api.embed``). The batched pass itself (cells sorted by length, packed,
token budget, precision: :func:`embed_cells`; any loader's batches: :func:`predict_cells`) is
``scgpt_train/inference_batches.py``, imported from here."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from data_modules.errors import check_h5ad_file
from data_modules.vocab import GeneVocab, guess_gene_key
from scgpt_train.errors import UserInputError
from scgpt_train.inference_batches import (  # noqa: F401  (re-exported: the one import of every caller)
    BatchOptions,
    anndata_cells,
    embed_cells,
    predict_cells,
)
from scgpt_train.precision import resolve_precision

log = logging.getLogger(__name__)


def load_for_inference(
    checkpoint, error: type[Exception] = None, batch_labels: str | None = None
) -> tuple[nn.Module, GeneVocab]:
    """(ScGPT, its vocabulary) of an official checkpoint directory, an imported ``.pt`` or a Lightning ``.ckpt``.

    A missing path raises ``error`` (default :class:`EmbedInputError`) naming ``--checkpoint``; a checkpoint
    without a stored vocabulary uses the ``vocab.json`` beside it (``GeneVocab.from_checkpoint``). With
    ``batch_labels`` (what to do instead), a model that needs batch labels (DSBN / batch embedding) is refused."""
    from scgpt_train.checkpoints import load_checkpoint

    error = error or EmbedInputError
    if not Path(checkpoint).exists():
        raise error(f"--checkpoint {checkpoint} does not exist")
    model, vocab = load_checkpoint(checkpoint)
    vocab = GeneVocab(dict(vocab)) if vocab else GeneVocab.from_checkpoint(checkpoint)
    cfg = model.config()
    if batch_labels is not None and (cfg.get("dsbn") or cfg.get("use_batch_labels")):
        raise error(f"{checkpoint} {batch_labels}")
    return model, vocab


def read_h5ad_checked(path, option: str, error: type[Exception] = None, use_raw: bool = False):
    """The AnnData of ``path``, checked where it enters: a missing, non-HDF5 or unreadable (truncated) file, no cells,
    no genes, and NaN / inf / negative values in the matrix that will be read (``.raw.X`` with ``use_raw``) raise
    ``error`` (default :class:`EmbedInputError`) naming the command-line ``option``, the file, and the first
    offending cell and gene; repeated gene names are a warning (:func:`check_expression`)."""
    import anndata as ad

    error = error or EmbedInputError
    check_h5ad_file(path, option, error)
    try:
        adata = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as e:
        raise error(
            f"{option} {path} cannot be read as h5ad ({e}); it may be truncated: copy or export it again"
        ) from None
    check_expression(adata, f"{option} {path}", error, use_raw)
    return adata


def check_expression(adata, where: str, error: type[Exception] = None, use_raw: bool = False, chunk_rows: int = 4096):
    """Refuse an AnnData without cells or genes, or with NaN / inf / negative values (naming the first cell by its
    obs name and the gene), and warn about repeated gene names (only the first of each can match a vocabulary)."""
    error = error or EmbedInputError
    if adata.n_obs == 0:
        raise error(f"{where}: the input has no cells (X has 0 rows); check the file")
    if use_raw and adata.raw is None:
        return  # the caller refuses --use-raw without .raw, naming the option
    matrix, var_names = (adata.raw.X, adata.raw.var_names) if use_raw else (adata.X, adata.var_names)
    if matrix is None or len(var_names) == 0:
        raise error(f"{where}: the input has no genes ({'.raw.X' if use_raw else 'X'} has 0 columns); check the file")
    for lo in range(0, adata.n_obs, chunk_rows):
        block = sp.csr_matrix(matrix[lo : lo + chunk_rows])  # (m, G), dense or sparse input alike
        for bad, what, fix in (
            (~np.isfinite(block.data), "a NaN or infinite value", "expression values are never NaN / inf"),
            (block.data < 0, "a negative value", "expression is counts or log-normalized values, never negative "
             "(scaled / regressed data cannot be turned back into expression)"),
        ):  # fmt: skip
            if bad.any():
                p = int(np.argmax(bad))
                row = lo + int(np.searchsorted(block.indptr, p, side="right") - 1)
                raise error(
                    f"{where}: {what} ({block.data[p]!r}) at cell {str(adata.obs_names[row])!r} (row {row}), gene "
                    f"{str(var_names[int(block.indices[p])])!r} ({int(bad.sum())} such values in rows "
                    f"{lo}-{lo + block.shape[0] - 1}); {fix}: fix the matrix upstream or drop the affected cells"
                )
    repeated = pd.Index(var_names)[pd.Index(var_names).duplicated()].unique()
    if len(repeated):
        log.warning(
            "%s: %d gene names occur more than once (e.g. %s); only the first column of each can match the "
            "vocabulary, the others are left out: sum or rename them (AnnData.var_names_make_unique) to keep them",
            where,
            len(repeated),
            [str(g) for g in repeated[:5]],
        )


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (NaN rows stay NaN), float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def load_best_weights(module, trainer) -> str | None:
    """Copy the best checkpoint's weights (by the monitored validation metric) into ``module``; returns its path."""
    cb = getattr(trainer, "checkpoint_callback", None)
    path = getattr(cb, "best_model_path", "") if cb is not None else ""
    if not path or not os.path.exists(path):
        return None
    state = torch.load(path, map_location=module.device, weights_only=False)["state_dict"]
    module.load_state_dict(state, strict=False)
    return str(Path(path))


# ---------------------------------------------------------------------------------------
# checking embed's input (errors name the file, the cell / gene and the scripts/embed.py option that fixes it)


class EmbedInputError(UserInputError):
    """An input ``scripts/embed.py`` cannot embed; the message names the file, the cell / gene and the fix."""


def _columns(frame: pd.DataFrame) -> str:
    cols = [str(c) for c in frame.columns]
    return f"{cols[:15]}{' ...' if len(cols) > 15 else ''}" if cols else "none"


def check_input_layout(
    adata, path, gene_column: str | None = None, use_raw: bool = False, batch_key: str | None = None
) -> None:
    """Refuse an input without cells, and options that do not fit it (--use-raw, --gene-column, --batch-key)."""
    if adata.n_obs == 0:
        raise EmbedInputError(f"{path}: the input has no cells (X has 0 rows); nothing to embed, check --input")
    if use_raw and adata.raw is None:
        raise EmbedInputError(f"{path}: --use-raw was given but the file has no .raw; leave --use-raw out to embed X")
    matrix, var = (adata.raw.X, adata.raw.var) if use_raw else (adata.X, adata.var)
    if matrix is None:
        where, fix = (".raw.X", "leave --use-raw out to embed X") if use_raw else ("X", "write the expression into X")
        if not use_raw and adata.raw is not None:
            fix += ", or pass --use-raw to embed .raw.X"
        raise EmbedInputError(f"{path}: {where} is empty (None); {fix}")
    if gene_column is not None and gene_column not in var.columns:
        raise EmbedInputError(
            f"{path}: --gene-column {gene_column!r} is not a column of {'.raw.var' if use_raw else 'var'} "
            f"(columns: {_columns(var)}); name the column holding gene symbols, or leave --gene-column out to match "
            "var_names"
        )
    if batch_key is not None and batch_key not in adata.obs.columns:
        raise EmbedInputError(
            f"{path}: --batch-key {batch_key!r} is not an obs column (columns: {_columns(adata.obs)})"
        )


def input_gene_names(
    adata,
    gene_column: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
    gene_table: str | None = None,
    species: str | None = None,
    target_species: str | None = None,
    prefer_gene_column: bool = False,
) -> list[str]:
    """The gene name of every input column as the data module matches it: read from ``gene_column`` / var_names,
    brought to ``gene_key`` (the vocabulary's "symbol" / "ensembl": a var column of that kind or the shipped
    GENCODE id table, :func:`data_modules.vocab.resolve_gene_names`; ``prefer_gene_column``: ids and a symbol
    column that disagree use the column), duplicates made unique like AnnData."""
    import anndata as ad

    from data_modules.vocab import gene_table as load_table
    from data_modules.vocab import resolve_gene_names, table_name

    var = adata.raw.var if use_raw else adata.var
    table, label = (load_table(gene_table), table_name(gene_table)) if gene_table else (None, None)
    names, _ = resolve_gene_names(
        var,
        gene_key,
        gene_column,
        table=table,
        table_label=label,
        prefer_column=prefer_gene_column,
        species=species,
        target_species=target_species,
    )
    return list(ad.utils.make_index_unique(pd.Index(np.asarray(names).astype(str))))


def unmapped_cells(
    adata,
    path,
    vocab: GeneVocab,
    gene_column: str | None = None,
    use_raw: bool = False,
    chunk_rows: int = 4096,
    gene_table: str | None = None,
    species: str | None = None,
    prefer_gene_column: bool = False,
) -> np.ndarray:
    """(n_cells,) bool: cells with no non-zero value in a gene of ``vocab`` (nothing for the model to read).

    Reads X (or .raw.X) ``chunk_rows`` rows at a time and raises :class:`EmbedInputError` naming the file, the
    first offending cell (obs name) and gene for NaN / inf values, and when no gene or no cell maps to ``vocab``.
    """
    matrix = adata.raw.X if use_raw else adata.X
    where = ".raw.X" if use_raw else "X"
    from data_modules.species import vocab_species

    genes = input_gene_names(
        adata, gene_column, use_raw, vocab.keyed_by, gene_table, species, vocab_species(vocab.genes), prefer_gene_column
    )
    known = vocab.map_genes(genes).ids >= 0  # (G,)
    if not known.any():
        hint = (
            " (the input genes look like Ensembl ids and the vocabulary is keyed by symbols)"
            if guess_gene_key(genes) == "ensembl" and vocab.keyed_by == "symbol"
            else ""
        )
        var = adata.raw.var if use_raw else adata.var
        raise EmbedInputError(
            f"{path}: none of its {len(genes)} genes (e.g. {genes[:3]}) is in the checkpoint's vocabulary "
            f"(e.g. {vocab.genes[:3]}){hint}; pass --gene-column with the var column holding gene symbols "
            f"(var columns: {_columns(var)})" + ("" if use_raw or adata.raw is None else ", or --use-raw")
        )
    n = adata.n_obs
    n_expressed = np.zeros(n, dtype=np.int64)
    for lo in range(0, n, chunk_rows):
        hi = min(lo + chunk_rows, n)
        block = sp.csr_matrix(matrix[lo:hi])  # (m, G), dense or sparse input alike
        bad = ~np.isfinite(block.data)
        if bad.any():
            p = int(np.argmax(bad))
            row = lo + int(np.searchsorted(block.indptr, p, side="right") - 1)
            raise EmbedInputError(
                f"{path}: NaN or infinite value {block.data[p]!r} in {where} at cell {str(adata.obs_names[row])!r} "
                f"(row {row}), gene {genes[int(block.indices[p])]!r} ({int(bad.sum())} such values in rows "
                f"{lo}-{hi - 1}); expression values are never NaN/inf: fix the matrix upstream or drop the affected "
                "cells before embedding"
            )
        rows = np.repeat(np.arange(hi - lo), np.diff(block.indptr))  # (nnz,) row of each entry
        expressed = known[block.indices] & (block.data != 0)
        n_expressed[lo:hi] = np.bincount(rows[expressed], minlength=hi - lo)
    unmapped = n_expressed == 0
    if unmapped.all():
        examples = [g for g, k in zip(genes, known, strict=True) if k][:3]
        raise EmbedInputError(
            f"{path}: none of its {n} cells has a non-zero value in one of the {int(known.sum())} genes it shares "
            f"with the checkpoint's vocabulary (e.g. {examples}); check that "
            f"{where} holds expression values and that --gene-column names the right gene column"
        )
    return unmapped


def embed_h5ad(
    checkpoint,
    input_path,
    output_path,
    key: str = "X_scgpt",
    batch_size: int | None = None,
    max_seq_len: int | None = None,
    include_zero_genes: bool = False,
    gene_column: str | None = None,
    use_raw: bool = False,
    batch_key: str | None = None,
    cls_value: float | None = None,
    gene_table: str | None = None,
    normalize: bool = True,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    drop_unmapped_cells: bool = False,
    species: str | None = None,
    precision: str = "auto",
    max_tokens: int | str | None = "auto",
    prefer_gene_column: bool = False,
) -> Path:
    """Embed every cell of ``input_path`` with ``checkpoint``; write the input AnnData (same obs_names, same order) +
    ``obsm[key]``.

    Cells go through :func:`embed_cells`: sorted by length into batches of at most ``max_tokens`` tokens ("auto":
    4,096 on a CPU, 16,384 on a GPU; ``inference_batches.default_max_tokens``) (and
    ``batch_size`` cells, when given), packed, at
    ``precision`` (auto / fp32 / bf16, ``scgpt_train/precision.py``; what auto chose is printed). Refuses
    (:class:`EmbedInputError`) an input without cells, NaN / inf values and options that do not fit the file. Cells
    with no expressed gene in the checkpoint's vocabulary are reported; their ``obsm[key]`` rows are NaN
    (predictions -1 / NaN), or, with ``drop_unmapped_cells``, they are left out of the output.
    """
    from data_modules.anndata_module import AnnDataModule
    from scgpt_train.evaluation.report import write_h5ad

    # settings are checked before anything is read
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    options = BatchOptions(max_tokens=max_tokens, max_cells=batch_size).on(device)
    chosen = resolve_precision(precision, device)
    adata = read_h5ad_checked(input_path, "--input", use_raw=use_raw)
    check_input_layout(adata, input_path, gene_column, use_raw, batch_key)
    model, vocab = load_for_inference(checkpoint)
    unmapped = unmapped_cells(
        adata,
        input_path,
        vocab,
        gene_column,
        use_raw,
        gene_table=gene_table,
        species=species,
        prefer_gene_column=prefer_gene_column,
    )
    cfg = model.config()
    if (cfg.get("dsbn") or cfg.get("use_batch_labels")) and batch_key is None:
        raise EmbedInputError(
            f"{checkpoint} uses batch labels (DSBN / batch embedding): pass --batch-key with the obs column of "
            f"{input_path} holding the batches (columns: {_columns(adata.obs)})"
        )
    # the checkpoint's token layout; --max-seq-len changes only how many genes a cell keeps
    token_layout = model.layout if max_seq_len is None else model.layout.replace(max_seq_len=max_seq_len)
    dm = AnnDataModule(
        str(input_path),
        vocab=str(checkpoint),
        batch_key=batch_key,
        layout=token_layout,
        tokenizer={"cls_value": cls_value},
        preprocess={
            "gene_column": gene_column,
            "use_raw": use_raw,
            "gene_table": gene_table,
            "species": species,
            "prefer_gene_column": prefer_gene_column,
        },
        include_zero_genes=include_zero_genes,
        val_fraction=0.0,
        seed=seed,
        model_outputs=(),
    )
    dm.setup()
    log.info("genes: %s", dm.gene_report.summary())
    log.info("precision: %s", chosen.reason)
    if progress:
        from data_modules.vocab import GeneIdReport

        for report in dm.gene_id_reports:
            print(f"gene names: {GeneIdReport(**report).summary()}")
        print(f"genes: {dm.gene_report.summary()}")
        print(f"precision: {chosen.reason}")
    n_cells = len(dm.split)
    if n_cells != adata.n_obs:
        raise RuntimeError(f"{input_path}: the data module holds {n_cells} cells, the file {adata.n_obs}")
    mapped = np.flatnonzero(~unmapped)
    examples = [str(c) for c in adata.obs_names[unmapped][:5]]
    if len(mapped) < n_cells:
        what = (
            "they are left out of the output (--drop-unmapped-cells)"
            if drop_unmapped_cells
            else f"their obsm[{key!r}] rows are NaN (pass --drop-unmapped-cells to leave them out)"
        )
        msg = (
            f"{n_cells - len(mapped)} of {n_cells} cells of {input_path} express no gene of the checkpoint's "
            f"vocabulary (e.g. {examples}); {what}"
        )
        log.warning(msg)
        if progress:
            print(f"warning: {msg}")
    model.to(device)
    out = embed_cells(
        model,
        anndata_cells(dm, seed),
        options=options,
        precision=chosen,
        device=device,
        wanted=~unmapped,  # the others keep embed_cells' NaN / -1
        batch_labels=dm.batch_labels,
        progress=progress,
    )
    emb = l2_normalize(out["cell_emb"]) if normalize else out["cell_emb"]
    keep = mapped if drop_unmapped_cells else np.arange(n_cells)
    if len(keep) < n_cells:
        adata = adata[keep].copy()
    adata.obsm[key] = emb[keep].astype(np.float32)
    if "pred" in out:
        adata.obs["scgpt_pred"] = out["pred"][keep]
        adata.obs["scgpt_pred_prob"] = out["probs"][keep].max(1)
    adata.uns[f"{key}_gene_report"] = {k: v for k, v in dm.gene_report.as_dict().items() if v is not None}
    if dm.gene_id_reports:  # how the input's gene names were read and mapped to the vocabulary's key
        adata.uns[f"{key}_gene_ids"] = {k: v for k, v in dm.gene_id_reports[0].items() if v is not None}
    adata.uns[f"{key}_unmapped_cells"] = {
        "n_cells": int(n_cells - len(mapped)),
        "examples": examples,
        "handling": "dropped" if drop_unmapped_cells else "nan",
    }
    adata.uns[f"{key}_precision"] = {"requested": chosen.requested, "used": chosen.name, "reason": chosen.reason}
    return write_h5ad(adata, output_path)
