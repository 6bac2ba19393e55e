"""Synthetic inputs for tests and benchmarks: a large h5ad written in bounded memory, a corpus of many tiny
cells written straight in the corpus format (``write_tiny_corpus``), one of a simulated size whose shards repeat
those (``simulate_corpus``), and a small SOMA experiment in the CELLxGENE Census layout."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from data_modules.atomic import atomic_dir, atomic_path
from data_modules.store.format import MANIFEST_NAME, VOCAB_NAME, shard_name
from data_modules.store.reader import Corpus
from data_modules.store.split import split_membership
from data_modules.store.writer import CorpusWriter, write_manifest
from data_modules.vocab import GeneVocab

CELL_TYPES = np.array(["T cell", "B cell", "monocyte", "NK cell", "erythrocyte", "fibroblast"])
TISSUES = np.array(["blood", "lung", "liver", "kidney"])
ASSAYS = np.array(["10x 3' v3", "10x 3' v2", "Smart-seq2"])


def synthetic_genes(n_genes: int) -> pd.DataFrame:
    """var table with symbols as index and Ensembl-like ids in ``gene_ids``."""
    return pd.DataFrame(
        {"gene_ids": [f"ENSG{i:011d}" for i in range(n_genes)]}, index=pd.Index([f"GENE{i}" for i in range(n_genes)])
    )


def synthetic_counts(rng: np.random.Generator, n_cells: int, n_genes: int, nnz_per_cell: int, gene_mean: np.ndarray):
    """CSR parts (indptr, indices, data float32) of ``n_cells`` cells with ~``nnz_per_cell`` genes each."""
    p = min(nnz_per_cell / n_genes, 1.0)
    mask = rng.random((n_cells, n_genes), dtype=np.float32) < p  # (n, G)
    rows, cols = np.nonzero(mask)
    data = (1 + rng.poisson(gene_mean[cols])).astype(np.float32)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_cells), out=indptr[1:])
    return indptr, cols.astype(np.int32), data


def synthetic_obs(rng: np.random.Generator, n_cells: int, n_datasets: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "dataset": pd.Categorical(np.sort(rng.integers(0, n_datasets, n_cells)).astype(str)),
            "cell_type": pd.Categorical(CELL_TYPES[rng.integers(0, len(CELL_TYPES), n_cells)]),
            "tissue": pd.Categorical(TISSUES[rng.integers(0, len(TISSUES), n_cells)]),
            "assay": pd.Categorical(ASSAYS[rng.integers(0, len(ASSAYS), n_cells)]),
            "donor_id": pd.Categorical([f"donor{d}" for d in rng.integers(0, 8, n_cells)]),
        },
        index=pd.Index([f"cell{i}" for i in range(n_cells)]),
    )


def make_synthetic_h5ad(
    path: str | os.PathLike,
    n_cells: int = 1000,
    nnz_per_cell: int = 2000,
    n_genes: int = 20000,
    n_datasets: int = 1,
    seed: int = 0,
    chunk_cells: int = 2000,
) -> Path:
    """Write a raw-count h5ad (CSR X, float32) chunk by chunk; memory is independent of ``n_cells``."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    gene_mean = rng.lognormal(mean=-0.5, sigma=1.0, size=n_genes)  # per-gene expression level
    var = synthetic_genes(n_genes)
    obs = synthetic_obs(rng, n_cells, n_datasets)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", var)
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = (n_cells, n_genes)
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 18,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        indptr_all = np.zeros(n_cells + 1, dtype=np.int64)
        for lo in range(0, n_cells, chunk_cells):
            hi = min(lo + chunk_cells, n_cells)
            indptr, cols, vals = synthetic_counts(rng, hi - lo, n_genes, nnz_per_cell, gene_mean)
            base = int(indptr_all[lo])
            indptr_all[lo + 1 : hi + 1] = base + indptr[1:]
            data.resize((base + len(vals),))
            indices.resize((base + len(vals),))
            data[base:] = vals
            indices[base:] = cols
        g.create_dataset("indptr", data=indptr_all)
        for key in ("layers", "obsm", "varm", "obsp", "varp", "uns"):
            ad.io.write_elem(f, key, {})
    return path


# ---------------------------------------------------------------------------------------
# many tiny cells in the corpus format (the loader at the paper's scale, simulated)
TINY_SPLIT = {"strategy": "cell", "seed": 0, "val_fraction": 0.003}  # pretrain_33m's --val-fraction


def write_tiny_corpus(
    out: str | os.PathLike,
    n_cells: int,
    n_genes: int = 2000,
    genes_per_cell: tuple[int, int] = (4, 12),
    n_datasets: int = 4,
    shard_size: int = 16384,
    seed: int = 0,
) -> Path:
    """A real corpus (the writer's shards: CSR, obs codes, per-block checksums, sealed manifest) of ``n_cells``
    cells with a handful of genes each (uniform in ``genes_per_cell``), built shard by shard through
    ``CorpusWriter`` without an h5ad in between; memory is one shard. Reused when ``out`` holds a manifest."""
    out = Path(out)
    if (out / MANIFEST_NAME).exists():
        return out
    rng = np.random.default_rng(seed)
    vocab = GeneVocab.from_genes([f"GENE{i}" for i in range(n_genes)])
    first_gene = len(vocab) - n_genes  # ids of the genes follow the special tokens
    lo, hi = genes_per_cell
    with atomic_dir(out) as tmp:
        writer = CorpusWriter(tmp, vocab, [], shard_size=shard_size)
        for d in range(n_datasets):
            writer.codes("dataset", np.array([f"ds{d}"]))
        for start in range(0, n_cells, shard_size):
            n = min(shard_size, n_cells - start)
            lengths = rng.integers(lo, hi + 1, n)
            indptr = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lengths, out=indptr[1:])
            # distinct genes per cell, ascending: a random start plus a walk of steps >= 1 (stays below n_genes)
            step = rng.integers(1, n_genes // 2 // hi + 1, int(indptr[-1]))
            walk = np.cumsum(step)
            walk -= np.repeat(walk[indptr[:-1]] - step[indptr[:-1]], lengths)  # restart the walk in every cell
            genes = np.repeat(rng.integers(0, n_genes // 2, n), lengths) + walk
            counts = rng.integers(1, 30, int(indptr[-1])).astype(np.uint16)
            dataset = (np.arange(start, start + n) * n_datasets // n_cells).astype(np.int32)
            writer.add_cells(
                indptr, (genes + first_gene).astype(np.int32), counts, {"dataset": dataset}, np.arange(n), coded=True
            )
        writer.finish(split=dict(TINY_SPLIT), extra={"synthetic": "tiny cells (data_modules.store.synthetic)"})
    return out


def simulate_corpus(out: str | os.PathLike, base: str | os.PathLike, n_cells: int) -> Path:
    """A corpus of ``n_cells`` cells whose shards are hard links to ``base``'s shards, repeated in turn.

    Every shard file exists and is read like any other (checksums, sha256 and sizes are the base shard's), cell
    ids run over all ``n_cells`` (so the split, the block table, the plan and the cursor are those of a corpus of
    that size); only the cells' contents repeat every ``base.n_cells`` cells. Disk use is the base corpus'.
    The last shard is a whole base shard, so the size is rounded up to whole shards. Reused when present.
    """
    out = Path(out)
    if (out / MANIFEST_NAME).exists() and Corpus(out).n_cells >= n_cells:
        return out
    src = Corpus(base)
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "shards").mkdir(parents=True)
        (tmp / VOCAB_NAME).write_bytes((src.root / VOCAB_NAME).read_bytes())
        shards, total, n_val, i = [], 0, 0, 0
        while total < n_cells:
            entry = src.shards[i % src.n_shards]
            target = tmp / shard_name(i)
            try:
                os.link(src.shard_path(i % src.n_shards), target)
            except OSError:  # another file system: a symbolic link reads the same
                target.symlink_to(src.shard_path(i % src.n_shards).resolve())
            ids = np.arange(total, total + entry["n_cells"], dtype=np.int64)
            n_val += int(split_membership(src.split, ids, None).sum())
            shards.append({**entry, "path": shard_name(i)})
            total += entry["n_cells"]
            i += 1
        manifest = {k: v for k, v in src.manifest.items() if k != "manifest_sha256"}
        manifest.update(
            n_cells=total,
            nnz=sum(s["nnz"] for s in shards),
            shards=shards,
            split={**src.split, "n_val": n_val, "n_train": total - n_val},
            synthetic=f"{total:,} cells: shards repeating the {src.n_shards} shards of {src.root.name}",
        )
        write_manifest(tmp, manifest)
    return out


# ---------------------------------------------------------------------------------------
# CELLxGENE Census layout


def make_census_soma(uri: str | os.PathLike, adata: ad.AnnData, organism: str = "homo_sapiens") -> str:
    """Write ``adata`` as ``<uri>/census_data/<organism>`` (obs, ms/RNA/var, ms/RNA/X/raw) like the Census.

    ``adata.var`` needs ``feature_id`` and ``feature_name``; ``adata.obs`` the Census columns
    used by the query (``dataset_id``, ``disease``, ``suspension_type``, ...).
    """
    import tiledbsoma
    import tiledbsoma.io

    uri = str(uri)
    with tiledbsoma.Collection.create(uri) as root:
        root.add_new_collection("census_data")
    exp_uri = f"{uri}/census_data/{organism}"
    tiledbsoma.io.from_anndata(exp_uri, adata, measurement_name="RNA", X_layer_name="raw")
    with tiledbsoma.Collection.open(f"{uri}/census_data", "w") as census_data:
        with tiledbsoma.Experiment.open(exp_uri) as exp:
            census_data.set(organism, exp, use_relative_uri=True)
    return uri
