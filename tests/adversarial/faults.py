"""What can be wrong: input files and AnnData objects (``FAULTS``), where the output goes (``disk_full``,
``out_unwritable``) and a corpus a pretraining run reads (``CORPUS_FAULTS``). Each fault turns a valid tiny input
(``base_adata``: real gene symbols of the official tiny checkpoint, counts or log-normalized values) into the faulty
one and says what a refusal (or warning) must name besides the file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from conftest import FIXTURES

N_CELLS, N_GENES = 40, 60
BAD_CELL, BAD_GENE = 17, 11  # where a planted bad value sits (not the first cell, not the first gene)
LABEL = "group"  # the obs column of the labels (fine-tuning, reference mapping, gene programs)


def vocab_genes(vocab_dir: Path = FIXTURES) -> list[str]:
    return [g for g in json.loads((vocab_dir / "vocab.json").read_text()) if not g.startswith("<")]


def base_adata(kind: str) -> ad.AnnData:
    """A valid input: ``N_CELLS`` cells x ``N_GENES`` genes of the tiny checkpoint's vocabulary, 2 groups.
    ``kind``: ``counts`` (Poisson integers) or ``log`` (log1p of counts normalized to 1e4 per cell)."""
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, (N_CELLS, N_GENES)).astype(np.float32)
    x[:, 0] += 1  # no empty cell
    if kind == "log":
        x = np.log1p(x / x.sum(1, keepdims=True) * 1e4).astype(np.float32)
    genes = vocab_genes()[:N_GENES]
    obs = pd.DataFrame(
        {LABEL: pd.Categorical(["a", "b"] * (N_CELLS // 2)), "condition": ["ctrl"] * N_CELLS},
        index=[f"cell-{i}" for i in range(N_CELLS)],
    )
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame({"gene_name": genes}, index=genes))


def _with_value(value: float) -> Callable[[ad.AnnData], ad.AnnData]:
    def plant(a: ad.AnnData) -> ad.AnnData:
        x = a.X.toarray()
        x[BAD_CELL, BAD_GENE] = value
        a.X = sp.csr_matrix(x)
        return a

    return plant


def _low_depth_counts(a: ad.AnnData) -> ad.AnnData:
    a.X = sp.csr_matrix(np.random.default_rng(1).poisson(1.0, a.shape).clip(0, 7).astype(np.float32))
    return a


def _duplicate_gene(a: ad.AnnData) -> ad.AnnData:
    names = list(a.var_names)
    names[BAD_GENE] = names[BAD_GENE - 1]
    a.var_names = names
    a.var["gene_name"] = names
    return a


def _duplicate_cell(a: ad.AnnData) -> ad.AnnData:
    names = list(a.obs_names)
    names[BAD_CELL] = names[BAD_CELL - 1]
    a.obs_names = names
    return a


@cache
def ensembl_ids() -> dict[str, str]:
    """symbol -> Ensembl id (GENCODE v44, the id table shipped with celltypist) of the base genes that have one."""
    from data_modules.vocab import gene_table

    ids: dict[str, str] = {}
    for key, symbol in gene_table().items():
        if "." not in key:
            ids.setdefault(symbol, key)
    return {g: ids[g] for g in vocab_genes()[:N_GENES] if g in ids}


def _ids_and_symbols_disagree(a: ad.AnnData) -> ad.AnnData:
    """Ensembl ids in var_names, a symbol column with two genes' symbols swapped (the ids are right)."""
    ids = ensembl_ids()
    a = a[:, [g for g in a.var_names if g in ids]].copy()
    symbols = list(a.var_names)
    a.var_names = [ids[g] for g in symbols]
    symbols[BAD_GENE], symbols[BAD_GENE + 1] = symbols[BAD_GENE + 1], symbols[BAD_GENE]
    a.var["gene_name"] = symbols
    return a


def disagreeing_id() -> str:
    return list(ensembl_ids().values())[BAD_GENE]


def _drop_obs(a: ad.AnnData) -> ad.AnnData:
    a.obs = a.obs.drop(columns=[LABEL, "condition"])
    return a


def _nan_labels(a: ad.AnnData) -> ad.AnnData:
    labels = a.obs[LABEL].astype(object)
    labels.iloc[BAD_CELL : BAD_CELL + 3] = np.nan
    a.obs[LABEL] = labels
    return a


def _single_class(a: ad.AnnData) -> ad.AnnData:
    a.obs[LABEL] = "a"
    return a


@dataclass(frozen=True)
class Fault:
    """One way an input (or where the output goes) can be wrong. ``make`` turns a valid AnnData into the faulty one
    (``None``: the fault is about the file or the output, see ``write_fault``); ``names`` says what a refusal or
    warning must name besides the file."""

    name: str
    description: str
    make: Callable[[ad.AnnData], ad.AnnData] | None = None
    names: Callable[[], tuple[str, ...]] = lambda: ()


FILE_FAULTS = ("missing_path", "not_hdf5", "truncated")  # about the file: no AnnData object has them
OUTPUT_FAULTS = ("disk_full", "out_unwritable")  # about where the output goes: the input is valid

FAULTS = {
    f.name: f
    for f in [
        Fault("missing_path", "the input path does not exist (a typo)"),
        Fault("not_hdf5", "a text file named .h5ad"),
        Fault("truncated", "an .h5ad cut to half its bytes (an interrupted copy)"),
        Fault("empty", "0 cells", lambda a: a[:0].copy()),
        Fault("zero_genes", "0 genes", lambda a: a[:, :0].copy()),
        Fault("nan", "a NaN value", _with_value(np.nan), lambda: (f"cell-{BAD_CELL}",)),
        Fault("inf", "an infinite value", _with_value(np.inf), lambda: (f"cell-{BAD_CELL}",)),
        Fault("negative", "a negative value", _with_value(-1.0), lambda: (f"cell-{BAD_CELL}",)),
        Fault("non_integer", "one fractional value among raw counts", _with_value(0.5), lambda: (f"cell-{BAD_CELL}",)),
        Fault(
            "counts_for_log",
            "low-depth integer counts (max 7) where log-normalized values are required",
            _low_depth_counts,
        ),  # fmt: skip
        Fault(
            "duplicate_genes",
            "two columns with the same gene name",
            _duplicate_gene,
            lambda: (vocab_genes()[BAD_GENE - 1],),
        ),  # fmt: skip
        Fault(
            "duplicate_cells", "two cells with the same obs name", _duplicate_cell, lambda: (f"cell-{BAD_CELL - 1}",)
        ),  # fmt: skip
        Fault("duplicate_files", "the same input file given twice (as two inputs, or as data.path and query)"),
        Fault(
            "ids_symbols_disagree",
            "Ensembl ids in var_names, a symbol column with two symbols swapped",
            _ids_and_symbols_disagree,
            lambda: (disagreeing_id(),),
        ),  # fmt: skip
        Fault("missing_column", "the obs column the run needs is absent", _drop_obs),
        Fault("nan_labels", "3 cells without a label (NaN)", _nan_labels, lambda: (LABEL,)),
        Fault("single_class", "every cell has the same label", _single_class, lambda: (LABEL,)),
        Fault("wrong_type", "not an AnnData (a list) where the Python API wants one"),
        Fault("disk_full", "the output's file system is full (a small tmpfs; root only)"),
        Fault("out_unwritable", "the output's parent directory cannot be written (read-only)"),
    ]
}


def write_fault(fault: Fault, kind: str, path: Path) -> Path:
    """The input file for ``fault`` at ``path`` (``missing_path``: nothing is written; output faults and
    ``duplicate_files``: a valid file)."""
    if fault.name == "missing_path":
        return path
    if fault.name == "not_hdf5":
        path.write_text("cell,gene,count\nc1,CD3E,4\n")
        return path
    a = base_adata(kind)
    if fault.make is not None:
        a = fault.make(a)
    a.write_h5ad(path)
    if fault.name == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


# ---------------------------------------------------------------------------------------------------------------
# a corpus that pretraining reads


@dataclass(frozen=True)
class CorpusFault:
    name: str
    description: str
    make: Callable[[Path, Path], Path]  # (valid corpus, where the faulty one goes) -> the corpus path to give
    names: Callable[[Path], tuple[str, ...]]  # what the refusal names, given the corpus path


def _missing(valid: Path, root: Path) -> Path:
    return root


def _not_a_corpus(valid: Path, root: Path) -> Path:
    root.mkdir()
    (root / "cells.csv").write_text("cell,gene,count\n")
    return root


def _copy(valid: Path, root: Path) -> Path:
    shutil.copytree(valid, root)
    return root


def _corrupt_shard(valid: Path, root: Path) -> Path:
    """One bit flipped inside the first shard's counts (the file keeps its size: the cheap size check passes)."""
    from data_modules.store.format import DATA

    path = next((_copy(valid, root) / "shards").glob("*.h5"))
    with h5py.File(path, "r") as f:
        offset = f[DATA].id.get_offset() + 3 * f[DATA].dtype.itemsize
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    return root


def _edited_vocab(valid: Path, root: Path) -> Path:
    vocab_path = _copy(valid, root) / "vocab.json"
    vocab = json.loads(vocab_path.read_text())
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    vocab_path.write_text(json.dumps(vocab))
    return root


CORPUS_FAULTS = {
    f.name: f
    for f in [
        CorpusFault("missing_path", "data.corpus_dir does not exist", _missing, lambda r: ("data.corpus_dir", str(r))),
        CorpusFault(
            "not_a_corpus", "a directory without manifest.json", _not_a_corpus, lambda r: ("data.corpus_dir", str(r))
        ),  # fmt: skip
        CorpusFault(
            "corrupt_shard",
            "one flipped bit in a shard's counts",
            _corrupt_shard,
            lambda r: (str(r / "shards"), "checksum"),
        ),  # fmt: skip
        CorpusFault(
            "edited_vocab", "vocab.json with two ids swapped", _edited_vocab, lambda r: (str(r / "vocab.json"),)
        ),  # fmt: skip
    ]
}
