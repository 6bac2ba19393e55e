"""Inputs: GMT files, gene lists, gene embeddings of a checkpoint, log expression and HVGs of an AnnData."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from data_modules.vocab import GeneVocab
from scgpt_train.tasks.gene_programs.common import GeneProgramError

log = logging.getLogger(__name__)


def read_gmt(path) -> dict[str, list[str]]:
    """{term: genes} of a GMT file (name, description, genes... tab-separated); raises naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise GeneProgramError(f"--gmt {path} does not exist (fetch the MSigDB files with fetch_resources())")
    sets: dict[str, list[str]] = {}
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) < 3:
            raise GeneProgramError(
                f"{path} line {no}: a GMT line is NAME<tab>DESCRIPTION<tab>GENE..., got {len(fields)} field(s)"
            )
        genes = [g for g in fields[2:] if g]
        if fields[0] in sets:
            raise GeneProgramError(f"{path} line {no}: gene set {fields[0]!r} appears twice")
        sets[fields[0]] = list(dict.fromkeys(genes))
    if not sets:
        raise GeneProgramError(f"--gmt {path} holds no gene set")
    return sets


def read_gene_list(path) -> list[str]:
    """Genes of a text file, one per line (blank lines and # comments ignored), in order, duplicates dropped."""
    path = Path(path)
    if not path.is_file():
        raise GeneProgramError(f"--genes {path} does not exist")
    genes = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    genes = list(dict.fromkeys(g for g in genes if g))
    if not genes:
        raise GeneProgramError(f"--genes {path} lists no gene")
    return genes


@dataclass
class GeneEmbeddings:
    genes: list[str]  # tested genes (in the vocabulary), in input order
    emb: np.ndarray  # (G, d) float32: gene encoder output (embedding + LayerNorm)
    missing: list[str]  # requested genes not in the vocabulary


@torch.no_grad()
def gene_embeddings(model, vocab: GeneVocab, genes: Sequence[str], where: str = "the gene list") -> GeneEmbeddings:
    """The gene encoder's output (token embedding + its LayerNorm) of every gene of ``genes`` in the vocabulary."""
    ids = vocab.map_genes(list(genes)).ids
    known = ids >= 0
    if not known.any():
        raise GeneProgramError(
            f"none of the {len(genes)} genes of {where} (e.g. {list(genes)[:3]}) is in the checkpoint's vocabulary "
            f"(e.g. {vocab.genes[:3]}); use gene symbols of the vocabulary's kind"
        )
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = model.gene_encoder(torch.as_tensor(ids[known], device=device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    kept = [g for g, k in zip(genes, known, strict=True) if k]
    return GeneEmbeddings(kept, out.astype(np.float32), [g for g, k in zip(genes, known, strict=True) if not k])


def adata_gene_names(adata, gene_column: str | None, use_raw: bool, path) -> list[str]:
    var = adata.raw.var if use_raw else adata.var
    if gene_column is None:
        return [str(g) for g in var.index]
    if gene_column not in var.columns:
        raise GeneProgramError(
            f"--adata {path}: --gene-column {gene_column!r} is not a var column (columns: {list(var.columns)[:15]})"
        )
    return [str(g) for g in var[gene_column]]


def log_expression(adata, gene_column: str | None, use_raw: bool, path) -> tuple[sp.csr_matrix, list[str]]:
    """(cells x genes) log-normalized CSR of an AnnData (counts normalized to 1e4 + log1p; log values as stored)
    and its gene names; duplicated names keep their first column."""
    from scgpt_train.evaluation.baselines import log_normalized

    names = adata_gene_names(adata, gene_column, use_raw, path)
    x = adata.raw.X if use_raw else adata.X
    if x is None:
        raise GeneProgramError(f"--adata {path}: {'.raw.X' if use_raw else 'X'} is empty")
    _, first = np.unique(np.asarray(names), return_index=True)
    keep = np.sort(first)
    x = sp.csr_matrix(x)[:, keep]
    return log_normalized(x, f"{path}: {'.raw.X' if use_raw else 'X'}"), [names[i] for i in keep]


def select_hvgs(adata, names: list[str], vocab: GeneVocab, n_hvg: int, gene_column, use_raw, path) -> list[str]:
    """The ``n_hvg`` most variable genes among those of the AnnData in the vocabulary (seurat_v3 on counts with
    scikit-misc, else seurat on log values), in the AnnData's order."""
    import anndata as ad

    from data_modules.preprocess import select_hvg
    from data_modules.value_types import detect_value_type

    x_raw = sp.csr_matrix(adata.raw.X if use_raw else adata.X)
    all_names = adata_gene_names(adata, gene_column, use_raw, path)
    col = {g: i for i, g in reversed(list(enumerate(all_names)))}
    in_vocab = [g for g in names if vocab.map_genes([g]).ids[0] >= 0]
    if not in_vocab:
        raise GeneProgramError(
            f"--adata {path}: none of its {len(names)} genes (e.g. {names[:3]}) is in the checkpoint's vocabulary "
            f"(e.g. {vocab.genes[:3]}); pass --gene-column with the var column holding gene symbols"
        )
    cols = [col[g] for g in in_vocab]
    counts = x_raw[:, cols]
    is_counts = detect_value_type(counts, str(path)).value_type == "counts"
    from scgpt_train.evaluation.baselines import log_normalized

    logx = log_normalized(counts, str(path))
    probe = ad.AnnData(X=logx, var=pd.DataFrame(index=in_vocab))
    mask, flavor = select_hvg(probe, n_hvg, "seurat_v3" if is_counts else "seurat", counts if is_counts else None)
    log.info("%d HVGs (%s) among %d vocabulary genes of %s", int(mask.sum()), flavor, len(in_vocab), path)
    return [g for g, m in zip(in_vocab, mask, strict=True) if m]
