"""Row-chunk readers over conversion inputs: h5ad files (h5py, bounded memory) and AnnData objects.

Every reader exposes ``n_rows``, ``genes`` (one name per column of X), ``obs_columns`` and
``read_chunk(lo, hi) -> RawChunk``; the converter (``convert.py``) knows nothing else about
where cells come from. The Census reader (``census.py``) has the same shape.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_modules.store.format import UNKNOWN_LABEL, CorpusFormatError


@dataclass
class RawChunk:
    """Rows ``lo:hi`` of one input, still over the input's own genes."""

    X: sp.csr_matrix  # (n, n_input_genes) values as stored in the input
    obs: dict[str, np.ndarray]  # corpus obs column -> (n,) str labels
    dataset: np.ndarray  # (n,) str dataset label per cell
    source_row: np.ndarray  # (n,) int64 row in the input (h5ad row, Census soma_joinid)
    cell_names: np.ndarray  # (n,) str, for error messages


def _labels(values: np.ndarray) -> np.ndarray:
    """Any obs values -> str labels, with NaN / None as ``UNKNOWN_LABEL``."""
    s = pd.Series(values)
    out = s.astype(str).to_numpy(dtype=object)
    out[s.isna().to_numpy()] = UNKNOWN_LABEL
    return out.astype(str)


def _h5_error(path: Path, e: Exception) -> CorpusFormatError:
    return CorpusFormatError(
        f"{path}: cannot read it as h5ad ({type(e).__name__}: {e}). The file is truncated or corrupt: "
        "re-download it or re-export it with `adata.write_h5ad(...)`"
    )


class H5adReader:
    """Reads an .h5ad file through h5py in row slices; memory grows with the slice, not the file."""

    def __init__(
        self,
        path: str | os.PathLike,
        name: str,
        gene_column: str | None = None,
        use_raw: bool = False,
        layer: str | None = None,
        obs_map: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.name = name
        self.source = str(self.path)
        if not self.path.exists():
            raise CorpusFormatError(f"{self.path}: no such file")
        try:
            self.f = h5py.File(self.path, "r")
            self._open_elements(use_raw, layer)
            var = ad.io.read_elem(self._var_group)
            obs_index_key = self.f["obs"].attrs.get("_index", "_index")
            self._obs_names = self.f["obs"][obs_index_key]
            self.obs_columns = [k for k in self.f["obs"].keys() if k != obs_index_key and not k.startswith("__")]
        except CorpusFormatError:
            raise
        except Exception as e:  # truncated / corrupt files surface as many h5py error types
            raise _h5_error(self.path, e) from None
        self.genes = _gene_names(var, gene_column, self.path, "raw.var" if use_raw else "var")
        self.gene_source = _gene_source(gene_column, use_raw and layer is None)
        self.var = var  # the var table the genes come from (gene id detection: its symbol / Ensembl id columns)
        self.obs_map = dict(obs_map or {})
        self._categories: dict[str, np.ndarray] = {}

    def _open_elements(self, use_raw: bool, layer: str | None) -> None:
        f = self.f
        if layer is not None:
            if "layers" not in f or layer not in f["layers"]:
                have = list(f["layers"].keys()) if "layers" in f else []
                raise CorpusFormatError(
                    f"{self.path}: has no layer {layer!r} (layers: {have}); pick one of them or drop --layer"
                )
            self._X = f["layers"][layer]
        elif use_raw:
            if "raw" not in f:
                raise CorpusFormatError(f"{self.path}: has no .raw; drop --use-raw to read X")
            self._X = f["raw"]["X"]
        else:
            self._X = f["X"]
        self._var_group = f["raw"]["var"] if use_raw and layer is None else f["var"]
        if isinstance(self._X, h5py.Group):
            enc = self._X.attrs.get("encoding-type", "")
            if enc == "csc_matrix":
                raise CorpusFormatError(
                    f"{self.path}: X is stored column-major (CSC), which cannot be read in row chunks; "
                    "re-save it as CSR: `adata.X = adata.X.tocsr(); adata.write_h5ad(...)`"
                )
            if enc != "csr_matrix":
                raise CorpusFormatError(
                    f"{self.path}: X has unsupported encoding {enc!r}; re-save it with a recent anndata"
                )
            self.n_rows, self._n_cols = (int(x) for x in self._X.attrs["shape"])
        else:
            self.n_rows, self._n_cols = self._X.shape

    def cell_names(self, lo: int, hi: int) -> np.ndarray:
        """Obs names of rows ``lo:hi``."""
        try:
            return np.asarray(_plain(self._obs_names, lo, hi)).astype(str)
        except (OSError, ValueError, KeyError) as e:
            raise _h5_error(self.path, e) from None

    def fingerprint(self) -> dict:
        st = self.path.stat()
        return {"path": str(self.path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}

    def _read_X(self, lo: int, hi: int) -> sp.csr_matrix:
        X = self._X
        if isinstance(X, h5py.Group):
            indptr = X["indptr"][lo : hi + 1].astype(np.int64)
            a, b = int(indptr[0]), int(indptr[-1])
            return sp.csr_matrix((X["data"][a:b], X["indices"][a:b], indptr - a), shape=(hi - lo, self._n_cols))
        return sp.csr_matrix(X[lo:hi])

    def _read_obs(self, column: str, lo: int, hi: int) -> np.ndarray | None:
        src = self.obs_map.get(column, column)
        if src not in self.obs_columns:
            return None
        elem = self.f["obs"][src]
        if isinstance(elem, h5py.Group):
            enc = elem.attrs.get("encoding-type", "")
            if enc == "categorical":
                if src not in self._categories:
                    self._categories[src] = _labels(ad.io.read_elem(elem["categories"]))
                codes = elem["codes"][lo:hi].astype(np.int64)
                cats = self._categories[src]
                out = cats[np.clip(codes, 0, None)] if len(cats) else np.full(len(codes), UNKNOWN_LABEL)
                return np.where(codes < 0, UNKNOWN_LABEL, out).astype(str)
            if "values" in elem:  # nullable-integer / -boolean / -string-array
                vals = _labels(_plain(elem["values"], lo, hi))
                if "mask" in elem:
                    vals[elem["mask"][lo:hi].astype(bool)] = UNKNOWN_LABEL
                return vals
            raise CorpusFormatError(f"{self.path}: obs column {src!r} has unsupported encoding {enc!r}")
        return _labels(_plain(elem, lo, hi))

    def read_chunk(self, lo: int, hi: int, obs_columns: list[str]) -> RawChunk:
        try:
            X = self._read_X(lo, hi)
            obs = {c: self._read_obs(c, lo, hi) for c in obs_columns}
            names = _plain(self._obs_names, lo, hi).astype(str)
        except CorpusFormatError:
            raise
        except Exception as e:
            raise _h5_error(self.path, e) from None
        n = hi - lo
        return RawChunk(
            X=X,
            obs={c: (v if v is not None else np.full(n, UNKNOWN_LABEL)) for c, v in obs.items()},
            dataset=np.full(n, self.name),
            source_row=np.arange(lo, hi, dtype=np.int64),
            cell_names=names,
        )

    def has_obs(self, column: str) -> bool:
        return self.obs_map.get(column, column) in self.obs_columns

    def close(self) -> None:
        self.f.close()


def _plain(ds: h5py.Dataset, lo: int, hi: int) -> np.ndarray:
    if h5py.check_string_dtype(ds.dtype) is not None:
        return np.asarray(ds.asstr()[lo:hi], dtype=object)
    return ds[lo:hi]


class AnnDataReader:
    """Row chunks of an in-memory (or backed) AnnData object."""

    def __init__(
        self,
        adata: ad.AnnData,
        name: str,
        gene_column: str | None = None,
        use_raw: bool = False,
        layer: str | None = None,
        obs_map: dict[str, str] | None = None,
    ):
        self.adata = adata
        self.name = name
        self.source = "<in-memory AnnData>"
        self.path = Path(f"<AnnData {name}>")
        if layer is not None:
            if layer not in adata.layers:
                raise CorpusFormatError(f"AnnData {name!r}: has no layer {layer!r} (layers: {list(adata.layers)})")
            self._X, var = adata.layers[layer], adata.var
        elif use_raw:
            if adata.raw is None:
                raise CorpusFormatError(f"AnnData {name!r}: has no .raw; drop use_raw to read X")
            self._X, var = adata.raw.X, adata.raw.var
        else:
            self._X, var = adata.X, adata.var
        self.n_rows = adata.n_obs
        self.genes = _gene_names(var, gene_column, self.path, "raw.var" if use_raw else "var")
        self.gene_source = _gene_source(gene_column, use_raw and layer is None)
        self.var = var  # the var table the genes come from (gene id detection: its symbol / Ensembl id columns)
        self.obs_columns = list(adata.obs.columns)
        self.obs_map = dict(obs_map or {})

    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        X = self._X
        if sp.issparse(X):
            for a in (X.data, X.indices, X.indptr):
                h.update(np.ascontiguousarray(a).tobytes())
        elif isinstance(X, np.ndarray):
            h.update(np.ascontiguousarray(X).tobytes())
        h.update(pd.util.hash_pandas_object(self.adata.obs, index=True).to_numpy().tobytes())
        return {"anndata": self.name, "shape": list(self.adata.shape), "sha256": h.hexdigest()}

    def has_obs(self, column: str) -> bool:
        return self.obs_map.get(column, column) in self.obs_columns

    def cell_names(self, lo: int, hi: int) -> np.ndarray:
        """Obs names of rows ``lo:hi``."""
        return np.asarray(self.adata.obs_names[lo:hi]).astype(str)

    def read_chunk(self, lo: int, hi: int, obs_columns: list[str]) -> RawChunk:
        n = hi - lo
        obs = {}
        for c in obs_columns:
            src = self.obs_map.get(c, c)
            obs[c] = (
                _labels(self.adata.obs[src].to_numpy()[lo:hi]) if src in self.obs_columns else np.full(n, UNKNOWN_LABEL)
            )
        return RawChunk(
            X=sp.csr_matrix(self._X[lo:hi]),
            obs=obs,
            dataset=np.full(n, self.name),
            source_row=np.arange(lo, hi, dtype=np.int64),
            cell_names=np.asarray(self.adata.obs_names[lo:hi]).astype(str),
        )

    def close(self) -> None:
        pass


def _gene_source(gene_column: str | None, use_raw: bool) -> str:
    var = "raw.var" if use_raw else "var"
    return f"{var}[{gene_column!r}]" if gene_column else f"{var}_names" if not use_raw else "raw.var_names"


def _gene_names(var: pd.DataFrame, gene_column: str | None, path: Path, where: str) -> list[str]:
    if gene_column is None:
        return [str(g) for g in var.index]
    if gene_column not in var.columns:
        raise CorpusFormatError(
            f"{path}: {where} has no column {gene_column!r} (columns: {list(var.columns)}; index holds "
            f"e.g. {list(var.index[:3])}); pass --gene-column with one of them, or omit it to use var_names"
        )
    return [str(g) for g in var[gene_column].astype(str)]
