"""Inputs of the attention GRN: the TF-target resource, the gene panel, cells by condition, and token batches.

Every cell is read over the same gene panel in the same order (zeros included), so the per-cell (M, M) maps can
be averaged over cells, as in the official tutorial (``include_zero_gene=True``, max_len = genes + 1):

- ``cls`` input (pretrained models): ``<cls>`` first, then every panel gene, values binned per cell like
  fine-tuning's dense tokenization (``data_modules.tokenize.dense.tokenize_with_zeros``: zeros are bin 0);
- ``perturbation`` input (a model with a perturbation-flag embedding, ``n_conditions`` > 0): no ``<cls>``,
  log-normalized values as stored, and the flag 1 on the genes the cell's condition perturbs (the
  perturbation model's inputs, ``data_modules.perturbation.inputs.make_batch``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scgpt_train.tasks.attention_grn.common import GRNError

INPUT_STYLES = ("auto", "cls", "perturbation")


def read_tf_targets(path) -> dict[str, set[str]]:
    """{source: targets} of a TSV / CSV with ``source`` and ``target`` columns (``fetch_tf_targets()`` writes one)."""
    path = Path(path)
    if not path.is_file():
        raise GRNError(
            f"--tf-targets {path} does not exist; fetch CollecTRI with "
            "`python -c 'from scgpt_train.resources.pypi import fetch_tf_targets; fetch_tf_targets()'`"
        )
    table = pd.read_csv(path, sep="," if path.suffix == ".csv" else "\t", dtype=str)
    missing = {"source", "target"} - set(table.columns)
    if missing:
        raise GRNError(f"--tf-targets {path}: needs columns source and target, lacks {sorted(missing)}")
    table = table.dropna(subset=["source", "target"])
    out: dict[str, set[str]] = {}
    for s, t in zip(table["source"], table["target"], strict=True):
        out.setdefault(s, set()).add(t)
    if not out:
        raise GRNError(f"--tf-targets {path} holds no edge")
    return out


@dataclass
class Panel:
    """The tested genes: names, vocab ids, and the (cells x genes) values of the AnnData over them."""

    genes: list[str]
    ids: np.ndarray  # (G,) int64 vocab ids
    x: sp.csr_matrix  # (N, G) values as stored (log-normalized for GEARS data)
    conditions: np.ndarray  # (N,) str condition of every cell ("all" without a condition column)
    left_out: list[str]  # requested genes not in the vocabulary or the data


def gene_names_of(adata, gene_column: str | None) -> list[str]:
    if gene_column is None:
        if "gene_name" in adata.var.columns:  # GEARS files keep the symbols there
            return adata.var["gene_name"].astype(str).tolist()
        return [str(g) for g in adata.var_names]
    if gene_column not in adata.var.columns:
        raise GRNError(f"--gene-column {gene_column!r} is not a var column (columns: {list(adata.var.columns)[:15]})")
    return adata.var[gene_column].astype(str).tolist()


def build_panel(
    adata, vocab, *, genes: Sequence[str] | None = None, max_genes: int = 1200, gene_column: str | None = None,
    condition_key: str | None = None, where: str = "the data",
) -> Panel:  # fmt: skip
    """The panel: ``genes`` (in that order) or, by default, the ``max_genes`` genes of the data in the vocabulary
    with the highest mean value (all when fewer); duplicated names keep their first column."""
    names = gene_names_of(adata, gene_column)
    first: dict[str, int] = {}
    for j, g in enumerate(names):
        first.setdefault(g, j)
    in_vocab = {g for g, i in zip(first, vocab.map_genes(list(first)).ids, strict=True) if i >= 0}
    if not in_vocab:
        raise GRNError(
            f"{where}: none of its {len(names)} genes (e.g. {names[:3]}) is in the checkpoint's vocabulary "
            f"(e.g. {vocab.genes[:3]}); pass --gene-column with the var column holding the vocabulary's gene names"
        )
    x_all = sp.csr_matrix(adata.X, dtype=np.float32)
    if genes is not None:
        wanted = list(dict.fromkeys(genes))
        chosen = [g for g in wanted if g in in_vocab]
        left_out = [g for g in wanted if g not in in_vocab]
        if not chosen:
            raise GRNError(f"none of the {len(wanted)} requested genes (e.g. {wanted[:3]}) is both in {where} and in "
                           "the checkpoint's vocabulary")  # fmt: skip
    else:
        cand = [g for g in first if g in in_vocab]
        mean = np.asarray(x_all[:, [first[g] for g in cand]].mean(0)).ravel()
        keep = np.sort(np.argsort(-mean, kind="stable")[:max_genes])
        chosen, left_out = [cand[i] for i in keep], []
    if condition_key is None:
        conditions = np.full(adata.n_obs, "all", dtype=object)
    elif condition_key not in adata.obs.columns:
        raise GRNError(f"{where}: --condition-key {condition_key!r} is not an obs column "
                       f"(columns: {list(adata.obs.columns)[:20]})")  # fmt: skip
    else:
        conditions = adata.obs[condition_key].astype(str).to_numpy(dtype=object)
    ids = vocab.map_genes(chosen).ids.astype(np.int64)
    return Panel(chosen, ids, x_all[:, [first[g] for g in chosen]].tocsr(), conditions, left_out)


def input_style(model, style: str = "auto") -> str:
    if style not in INPUT_STYLES:
        raise GRNError(f"--input-style must be one of {INPUT_STYLES}, got {style!r}")
    if style == "auto":
        return "perturbation" if model.config().get("n_conditions") else "cls"
    return style


def token_batches(
    model, vocab, panel: Panel, cells: np.ndarray, *, style: str, batch_size: int = 8, seed: int = 0,
    cls_value: float | None = None,
) -> Iterator[tuple[dict, list[str]]]:  # fmt: skip
    """(model inputs, conditions) of ``cells`` (row indices of the panel) in batches; every cell has the same
    tokens in the same order (M = genes + 1 with ``<cls>``, genes without)."""
    from data_modules.tokenize.dense import tokenize_with_zeros
    from data_modules.tokenize.tokenizer import TokenizerConfig

    g = len(panel.genes)
    if style == "cls":
        cfg = TokenizerConfig(
            layout=model.layout.replace(max_seq_len=g + 1), cls_value=cls_value, gen_ratios=None, mlm_prob=None
        )
    for start in range(0, len(cells), batch_size):
        rows = np.asarray(cells[start : start + batch_size])
        conds = [str(c) for c in panel.conditions[rows]]
        if style == "cls":
            rng = np.random.default_rng([seed, int(rows[0]), len(rows)])
            batch = tokenize_with_zeros(panel.x[rows], panel.ids, cfg, vocab.pad_id, vocab.cls_id, rng)
            yield {"gene_ids": batch.gene_ids, "values": batch.values, "pad_mask": batch.pad_mask}, conds
        else:
            yield perturbation_inputs(model, panel, rows, conds), conds


def perturbation_inputs(model, panel: Panel, rows: np.ndarray, conds: Sequence[str]) -> dict:
    """Inputs of the perturbation model: all panel genes, values as stored, flags of each cell's condition."""
    from data_modules.perturbation.conditions import ConditionError, condition_genes
    from data_modules.perturbation.inputs import FLAG_PERTURBED

    pos = {gene: j for j, gene in enumerate(panel.genes)}
    flags = np.zeros((len(rows), len(panel.genes)), dtype=np.int64)
    for i, c in enumerate(conds):
        try:
            perturbed = condition_genes(c)
        except ConditionError:
            perturbed = ()
        flags[i, [pos[gene] for gene in perturbed if gene in pos]] = FLAG_PERTURBED
    # no padding positions (every panel gene is a token), so the flag padding id is never used
    x = panel.x[rows].toarray().astype(np.float32)
    return {
        "gene_ids": torch.from_numpy(np.broadcast_to(panel.ids, x.shape).copy()),
        "values": torch.from_numpy(x),
        "pad_mask": torch.zeros(x.shape, dtype=torch.bool),
        "condition_ids": torch.from_numpy(flags),
    }
