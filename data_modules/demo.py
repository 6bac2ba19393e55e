"""The embedded demo corpus, built from real single-cell data that ships inside installed packages.

Two real datasets, joined by the union of their gene sets (as the paper joins studies):
- ``pbmc68k_reduced`` (scanpy): 700 PBMCs x 765 genes, log-normalized values from ``.raw``
  (stored as float32: binning is a per-cell rank, so normalization does not change the bins);
  cell types from ``obs.bulk_labels``.
- celltypist's ``sample_cell_by_gene.csv``: 559 cells x 32,786 genes, raw counts (stored as uint16).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data_modules.atomic import atomic_dir, atomic_path
from data_modules.errors import UserInputError

if TYPE_CHECKING:
    import anndata as ad

# anndata, pandas, scipy.sparse and the corpus writer are imported where the cells are built: every run on the demo
# data imports this module (Hydra resolves data.builder's _target_) but builds nothing once the data exist, and
# those imports cost each such process ~1 s of CPU.

DEMO_SPLIT = {"strategy": "cell", "seed": 0, "val_fraction": 0.1}


class DemoPathError(FileNotFoundError, UserInputError):
    """A data path that does not exist was about to be filled with demo data (a mistyped path to one's own file)."""


def demo_builder(build):
    """Decorator: a demo builder writes only to its own location. The data modules call ``builder(data.path)``
    when that file does not exist; with ``home`` (the experiment's default ``data.path``, given in the builder's
    config) any other path is refused by name instead of being filled with demo cells. Without ``home`` (tests,
    scripts calling the builder directly) it writes where it is told."""

    @functools.wraps(build)
    def wrapper(path, *args, home: str | os.PathLike | None = None, **kw):
        if home is not None and Path(path).expanduser().resolve() != Path(home).expanduser().resolve():
            raise DemoPathError(
                f"data.path={path} does not exist. Only the demo's own file ({home}) is built from demo data: check "
                "the path of your file, or leave data.path unset to run the demo"
            )
        return build(path, *args, **kw)

    return wrapper


def pbmc68k_adata() -> ad.AnnData:
    import scanpy as sc
    import scipy.sparse as sp

    adata = sc.datasets.pbmc68k_reduced()
    raw = adata.raw.to_adata()
    raw.X = sp.csr_matrix(raw.X, dtype=np.float32)
    raw.obs = adata.obs[["bulk_labels"]].rename(columns={"bulk_labels": "cell_type"}).astype(str)
    return raw


def celltypist_sample_path() -> Path:
    import celltypist

    path = Path(celltypist.__file__).parent / "data" / "samples" / "sample_cell_by_gene.csv"
    if not path.exists():
        raise FileNotFoundError(f"celltypist's sample data is missing at {path}; reinstall celltypist (make setup)")
    return path


@functools.lru_cache(maxsize=1)
def _celltypist_table():
    """celltypist's sample CSV parsed once per process (6-10 s on one core; the demo corpus, the simulator's fits and
    the memory benchmark all read it): (cells x genes csr float32, cell names, gene names), never handed out."""
    import pandas as pd
    import scipy.sparse as sp

    table = pd.read_csv(celltypist_sample_path(), index_col=0)
    return sp.csr_matrix(table.to_numpy(dtype=np.float32)), table.index.astype(str), table.columns.astype(str)


def celltypist_adata() -> ad.AnnData:
    """celltypist's raw-count sample (559 cells x 32,786 genes) as a new AnnData (its own copy of the counts)."""
    import anndata as ad
    import pandas as pd

    x, cells, genes = _celltypist_table()
    adata = ad.AnnData(X=x.copy(), obs=pd.DataFrame(index=cells.copy()), var=pd.DataFrame(index=genes.copy()))
    adata.obs["cell_type"] = "unlabelled"
    return adata


def build_demo_corpus(out: str | os.PathLike, shard_size: int = 256) -> Path:
    """Build the demo corpus at ``out`` (atomically: built in a temp dir, then renamed)."""
    from data_modules.store.convert import Source, convert_sources

    out = Path(out)
    if (out / "manifest.json").exists():
        return out
    with atomic_dir(out) as tmp:  # a concurrent builder that finishes first wins; ours is then discarded
        convert_sources(
            [Source("pbmc68k_reduced", pbmc68k_adata()), Source("celltypist_sample", celltypist_adata())],
            tmp,
            obs_columns=["cell_type"],
            allow_float=True,
            shard_size=shard_size,
            split=DEMO_SPLIT,
        )
    return out


# fine-tuning demo datasets (real cells shipped with scanpy) ---------------------------------
def _atomic_write_h5ad(adata: ad.AnnData, path: str | os.PathLike) -> Path:
    with atomic_path(path, ".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


def pbmc68k_log_normalized() -> ad.AnnData:
    """scanpy's pbmc68k_reduced: 700 PBMCs x 765 genes, log-normalized (``.raw``), obs ``cell_type``."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc
    import scipy.sparse as sp

    src = sc.datasets.pbmc68k_reduced()
    x = sp.csr_matrix(src.raw.X, dtype=np.float32)
    obs = pd.DataFrame({"cell_type": src.obs["bulk_labels"].astype(str).to_numpy()}, index=src.obs_names.astype(str))
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=src.raw.var_names.astype(str)))


@demo_builder
def build_annotation_demo(path: str | os.PathLike) -> Path:
    """pbmc68k_reduced as is (already log-normalized, like the paper's annotation files)."""
    return _atomic_write_h5ad(pbmc68k_log_normalized(), path)


BATCH_EFFECT = {"seed": 0, "gene_log_sd": 1.0, "dropped_gene_fraction": 0.1, "depth_factor": 0.5}


def make_two_batch(
    adata: ad.AnnData,
    seed: int = 0,
    gene_log_sd: float = 1.0,
    dropped_gene_fraction: float = 0.1,
    depth_factor: float = 0.5,
) -> ad.AnnData:
    """Two batches from real cells with a known batch effect.

    Cells are assigned to batch "A" or "B" at random (stratified by cell type, half each). Counts are
    recovered as expm1 of the log-normalized values; batch B then gets (1) a per-gene multiplicative
    factor exp(N(0, gene_log_sd)) - a gene-specific capture efficiency, which changes each cell's gene
    ranks and hence its bins - (2) ``dropped_gene_fraction`` of genes not measured at all (zero), and
    (3) ``depth_factor`` x sequencing depth (rounding to counts is not applied: values stay continuous).
    Both batches keep their cell types, so a good integration mixes A and B within each cell type.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from data_modules.preprocess import stratified_split

    rng = np.random.default_rng(seed)
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    x.data = np.expm1(x.data)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    _, in_b = stratified_split(labels, 0.5, seed)
    n_genes = adata.n_vars
    factor = np.exp(rng.normal(0.0, gene_log_sd, n_genes)) * depth_factor  # (G,)
    factor[rng.random(n_genes) < dropped_gene_fraction] = 0.0
    scale = sp.diags(factor)
    is_b = np.zeros(adata.n_obs, dtype=bool)
    is_b[in_b] = True
    xb = (x[is_b] @ scale).tocsr()
    out = sp.vstack([x[~is_b], xb], format="csr").astype(np.float32)
    out.eliminate_zeros()
    obs = pd.concat([adata.obs[~is_b], adata.obs[is_b]]).copy()
    obs["batch"] = ["A"] * int((~is_b).sum()) + ["B"] * int(is_b.sum())
    return ad.AnnData(X=out, obs=obs, var=adata.var.copy())


@demo_builder
def build_integration_demo(path: str | os.PathLike) -> Path:
    """pbmc68k_reduced split into two batches with the documented batch effect (:func:`make_two_batch`)."""
    return _atomic_write_h5ad(make_two_batch(pbmc68k_log_normalized(), **BATCH_EFFECT), path)
