"""Small real-format stand-ins of downloadable files, for download tests that run from a local mirror."""

from __future__ import annotations

import gzip
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp


def write_gzipped_h5ad(path: Path) -> Path:
    """A gzipped 3 x 3 h5ad (the GEO ``.h5ad.gz`` kind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = path.with_name(path.name + ".plain.h5ad")
    ad.AnnData(sp.csr_matrix(np.eye(3, dtype=np.float32))).write_h5ad(plain)
    with gzip.open(path, "wb") as f:
        f.write(plain.read_bytes())
    plain.unlink()
    return path


def write_10x_arc_h5(path: Path) -> Path:
    """A minimal Cell Ranger ARC matrix: 2 genes + 2 peaks, 3 cells (the 10x Multiome ``.h5`` kind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    m = sp.csc_matrix(np.array([[1, 0, 2], [0, 3, 0], [1, 1, 0], [0, 1, 1]], dtype=np.int32))  # features x cells
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        for k, v in (("data", m.data), ("indices", m.indices), ("indptr", m.indptr), ("shape", m.shape)):
            g.create_dataset(k, data=v)
        g.create_dataset("barcodes", data=np.array([b"A-1", b"B-1", b"C-1"]))
        feats = g.create_group("features")
        feats.create_dataset("id", data=np.array([b"ENSG1", b"ENSG2", b"chr1:10-50", b"chr2:5-90"]))
        feats.create_dataset("name", data=np.array([b"CD3E", b"LYZ", b"chr1:10-50", b"chr2:5-90"]))
        feats.create_dataset("feature_type", data=np.array([b"Gene Expression"] * 2 + [b"Peaks"] * 2))
        feats.create_dataset("genome", data=np.array([b"GRCh38"] * 4))
    return path
