"""Reading paired and mosaic multi-omic data into one cell table with one matrix per modality.

Three file layouts:

- MuData ``.h5mu`` (the ``mudata`` package): one AnnData per modality under ``mod[key]``; a modality's cells are
  a subset of the MuData's cells (mosaic data: a cell missing from ``mod["prot"]`` has no protein measurement).
- paired AnnData, the scvi-tools layout: RNA in ``X`` (or a layer), proteins in ``obsm["protein_expression"]``
  with their names in ``uns["protein_names"]`` (or the DataFrame's columns).
- AnnData whose ``var["feature_types"]`` says each column's modality (10x Cell Ranger ARC / NeurIPS 2021:
  ``Gene Expression`` / ``GEX``, ``Antibody Capture`` / ``ADT``, ``Peaks`` / ``ATAC``).

Which cells have which modality: an obs column ``has_<modality>`` (bool) wins when present; otherwise
membership in the modality's AnnData (``.h5mu``), an all-zero protein row in the scvi-tools layout (totalVI's
convention for "not measured"), and every cell elsewhere. Errors name the file and the modality.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_modules.errors import UserInputError

# default keys of each modality kind per layout (a recipe's ``key`` replaces them)
MUDATA_KEYS = {"rna": ("rna", "RNA", "gex", "GEX"), "protein": ("prot", "protein", "adt", "ADT"), "atac": ("atac",)}
FEATURE_TYPES = {
    "rna": ("Gene Expression", "GEX", "RNA"),
    "protein": ("Antibody Capture", "ADT", "Protein"),
    "atac": ("Peaks", "ATAC"),
}
PROTEIN_OBSM = "protein_expression"


class MultiomicInputError(UserInputError):
    """An input that cannot be read as declared; the message names the file and the modality."""


@dataclass
class ModalityMatrix:
    """One modality of every cell: rows of cells without it are empty and ``present`` is False there."""

    name: str  # modality name (RNA, Protein, ATAC)
    x: sp.csr_matrix  # (n_cells, n_features) float32
    features: list[str]  # feature names as stored
    present: np.ndarray  # (n_cells,) bool
    source: str  # "cite.h5mu: mod['prot']" (for reports and errors)


@dataclass
class MultiomicInput:
    obs: pd.DataFrame
    modalities: dict[str, ModalityMatrix]  # in the declared order
    path: str


def _csr(x) -> sp.csr_matrix:
    m = sp.csr_matrix(np.asarray(x) if not sp.issparse(x) else x, dtype=np.float32, copy=True)
    m.sort_indices()
    return m


def _matrix(adata, layer: str | None, where: str):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise MultiomicInputError(f"{where}: layer {layer!r} not found (layers: {list(adata.layers)})")
    return adata.layers[layer]


def _presence(obs: pd.DataFrame, name: str, default: np.ndarray, where: str) -> np.ndarray:
    col = f"has_{name}"
    if col not in obs.columns:
        return default
    values = obs[col]
    if values.isna().any():
        raise MultiomicInputError(f"{where}: obs[{col!r}] has missing values; it must say True/False for each cell")
    return values.astype(bool).to_numpy()


def read_multiomic(path: str | Path, recipes: dict) -> MultiomicInput:
    """Every declared modality (``recipes``: name -> object with ``kind``, ``key``, ``layer``) of ``path``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"multi-omic input {path} does not exist")
    if path.suffix == ".h5mu":
        return _read_h5mu(path, recipes)
    if path.suffix == ".h5ad":
        import anndata as ad

        return from_anndata(ad.read_h5ad(path), recipes, path.name)
    raise MultiomicInputError(f"{path}: expected a .h5mu (MuData) or .h5ad (paired AnnData) file")


def _read_h5mu(path: Path, recipes: dict) -> MultiomicInput:
    import mudata

    mdata = mudata.read_h5mu(path)
    cells = pd.Index(mdata.obs_names.astype(str))
    obs = mdata.obs.copy()
    obs.index = cells
    mods: dict[str, ModalityMatrix] = {}
    for name, rec in recipes.items():
        keys = (rec.key,) if rec.key else MUDATA_KEYS.get(rec.kind, ())
        key = next((k for k in keys if k in mdata.mod), None)
        if key is None:
            raise MultiomicInputError(
                f"{path.name}: the declared modality {name!r} (kind {rec.kind}, mod key "
                f"{' / '.join(map(repr, keys))}) is not in the .h5mu, which holds {sorted(mdata.mod)}; set "
                f"data.modalities.{name}.key to one of them or drop the modality from data.modalities"
            )
        sub = mdata.mod[key]
        where = f"{path.name}: mod[{key!r}] (modality {name})"
        x = _csr(_matrix(sub, rec.layer, where))
        rows = cells.get_indexer(pd.Index(sub.obs_names.astype(str)))
        if (rows < 0).any():
            raise MultiomicInputError(f"{where}: {int((rows < 0).sum())} cells are not in the MuData's obs")
        full = sp.csr_matrix((x.data, x.indices, x.indptr), shape=x.shape)
        placed = sp.csr_matrix(
            (np.ones(len(rows), dtype=np.float32), (rows, np.arange(len(rows)))), shape=(len(cells), len(rows))
        )
        x_all = _csr(placed @ full)
        present = np.zeros(len(cells), dtype=bool)
        present[rows] = True
        present = _presence(obs, name, present, where) & present
        mods[name] = ModalityMatrix(name, x_all, list(map(str, sub.var_names)), present, where)
    return MultiomicInput(obs, mods, str(path))


def from_anndata(adata, recipes: dict, where: str = "the AnnData") -> MultiomicInput:
    """Split a paired AnnData (scvi-tools layout or ``var["feature_types"]``) into the declared modalities."""
    obs = adata.obs.copy()
    obs.index = obs.index.astype(str)
    n = adata.n_obs
    types = adata.var["feature_types"].astype(str).to_numpy() if "feature_types" in adata.var.columns else None
    mods: dict[str, ModalityMatrix] = {}
    for name, rec in recipes.items():
        if types is not None:
            wanted = (rec.key,) if rec.key else FEATURE_TYPES.get(rec.kind, ())
            cols = np.flatnonzero(np.isin(types, wanted))
            if len(cols) == 0:
                raise MultiomicInputError(
                    f"{where}: the declared modality {name!r} has no column with var['feature_types'] in "
                    f"{list(wanted)} (the file has {sorted(set(types))}); set data.modalities.{name}.key"
                )
            src = f"{where}: var['feature_types'] in {list(wanted)} (modality {name})"
            x = _csr(_matrix(adata, rec.layer, src))[:, cols]
            feats = list(map(str, adata.var_names[cols]))
            present = np.ones(n, dtype=bool)
        elif rec.kind == "protein":
            key = rec.key or PROTEIN_OBSM
            src = f"{where}: obsm[{key!r}] (modality {name})"
            if key not in adata.obsm:
                raise MultiomicInputError(
                    f"{where}: the declared modality {name!r} needs obsm[{key!r}] with uns['protein_names'] "
                    f"(scvi-tools layout); the file has obsm {list(adata.obsm)}"
                )
            prot = adata.obsm[key]
            if isinstance(prot, pd.DataFrame):
                feats, x = list(map(str, prot.columns)), _csr(prot.to_numpy(dtype=np.float64))
            else:
                x = _csr(prot)
                names = adata.uns.get("protein_names")
                if names is None or len(names) != x.shape[1]:
                    raise MultiomicInputError(f"{src}: uns['protein_names'] must name its {x.shape[1]} columns")
                feats = list(map(str, names))
            present = np.asarray(x.getnnz(axis=1) > 0)  # totalVI: an all-zero protein row = not measured
        else:
            if rec.kind != "rna":
                raise MultiomicInputError(
                    f"{where}: modality {name!r} ({rec.kind}) needs var['feature_types'] or a .h5mu file"
                )
            src = f"{where}: X (modality {name})" if rec.layer is None else f"{where}: layers[{rec.layer!r}]"
            x = _csr(_matrix(adata, rec.layer, src))
            feats = list(map(str, adata.var_names))
            present = np.ones(n, dtype=bool)
        present = _presence(obs, name, present, src)
        x = _csr(sp.diags(present.astype(np.float32)) @ x)  # a missing modality holds no values
        mods[name] = ModalityMatrix(name, x, feats, present, src)
    return MultiomicInput(obs, mods, where)
