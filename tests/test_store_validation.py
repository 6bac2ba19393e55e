"""Every bad input gets an error naming file, column/gene and the fix, and leaves nothing behind."""

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_modules.store.cli import build_main
from data_modules.store.convert import Source, convert_sources
from data_modules.store.inspect import to_anndata
from data_modules.vocab import GeneVocab


def _write(path: Path, X, genes=None, var=None, obs=None) -> Path:
    X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    var = var if var is not None else pd.DataFrame(index=genes or [f"G{i}" for i in range(X.shape[1])])
    obs = obs if obs is not None else pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])])
    ad.AnnData(X, obs=obs, var=var).write_h5ad(path)
    return path


def _counts(n=40, g=6, seed=0):
    return np.random.default_rng(seed).poisson(2.0, size=(n, g)).astype(np.float32) + np.eye(n, g, dtype=np.float32)


def _fails(tmp_path, capsys, args, *expected) -> str:
    out = tmp_path / "out"
    rc = build_main(["h5ad", *map(str, args), "--out", str(out), "--quiet", "--chunk-size", "8", "--shard-size", "10"])
    err = capsys.readouterr().err
    assert rc == 2, err
    for text in expected:
        assert text in err, err
    assert not out.exists(), f"partial output left: {list(out.rglob('*'))}"
    return err


@pytest.mark.parametrize(
    "value, what",
    [(0.5, "non-integer value"), (-1.0, "negative value"), (np.nan, "NaN or infinite"), (np.inf, "NaN or infinite")],
)
def test_bad_values_name_file_cell_gene_and_fix(tmp_path, capsys, value, what):
    X = _counts()
    X[33, 4] = value  # late in the file: shards were already written when it is found
    path = _write(tmp_path / "bad.h5ad", X)
    err = _fails(tmp_path, capsys, [path], str(path), what, "'c33'", "'G4'")
    assert "--use-raw" in err or "fix the matrix upstream" in err


def test_allow_normalized_accepts_floats_as_float32(tmp_path, capsys):
    X = np.log1p(_counts())
    path = _write(tmp_path / "norm.h5ad", X)
    _fails(tmp_path, capsys, [path], "--allow-normalized")
    assert build_main(["h5ad", str(path), "--out", str(tmp_path / "ok"), "--allow-normalized", "--quiet"]) == 0
    back = to_anndata(tmp_path / "ok")
    np.testing.assert_array_equal(back[:, [f"G{i}" for i in range(6)]].X.toarray(), X.astype(np.float32))


def test_duplicate_gene_names(tmp_path, capsys):
    path = _write(tmp_path / "dup.h5ad", _counts(), genes=["A", "B", "C", "A", "D", "C"])
    _fails(
        tmp_path, capsys, [path], str(path), "duplicate gene names ['A', 'C']", "var_names_make_unique", "--gene-column"
    )
    assert (
        build_main(["h5ad", str(path), "--out", str(tmp_path / "first"), "--duplicate-genes", "first", "--quiet"]) == 0
    )


def test_missing_gene_column(tmp_path, capsys):
    path = _write(tmp_path / "g.h5ad", _counts(), var=pd.DataFrame({"symbol": list("ABCDEF")}, index=list("abcdef")))
    _fails(tmp_path, capsys, [path, "--gene-column", "feature_name"], str(path), "no column 'feature_name'", "'symbol'")


def test_no_gene_known_to_vocab(tmp_path, capsys):
    path = _write(tmp_path / "g.h5ad", _counts(), genes=[f"ENSG{i:011d}" for i in range(6)])
    GeneVocab.from_genes(["ACTB", "GAPDH"]).to_json(tmp_path / "vocab.json")
    _fails(
        tmp_path,
        capsys,
        [path, "--vocab", tmp_path / "vocab.json"],
        str(path),
        "none of its 6 genes",
        "--gene-table",
        "--gene-column",
    )


def test_missing_obs_column_when_requested(tmp_path, capsys):
    path = _write(tmp_path / "o.h5ad", _counts())
    _fails(tmp_path, capsys, [path, "--obs-columns", "cell_typo"], "'cell_typo'", "--obs-columns")


@pytest.mark.parametrize("damage", ["truncated", "not_hdf5", "missing"])
def test_truncated_or_corrupt_h5ad(tmp_path, capsys, damage):
    good = _write(tmp_path / "good.h5ad", _counts())
    bad = tmp_path / "bad.h5ad"
    if damage == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "not_hdf5":
        bad.write_bytes(b"\x00garbage" * 1000)
    hint = "no such file" if damage == "missing" else "re-download it or re-export it"
    _fails(tmp_path, capsys, [good, bad], str(bad), hint)


def test_empty_cells_dropped_and_counted_with_min_genes(tmp_path):
    X = _counts(30, 6)
    X[[2, 11, 12]] = 0  # empty
    X[5] = [1, 0, 0, 0, 0, 0]  # one gene only
    X[7] = [0, 0, 0, 0, 0, 4]  # only an unknown gene: empty after mapping
    path = _write(tmp_path / "e.h5ad", X)
    vocab = GeneVocab.from_genes([f"G{i}" for i in range(5)])  # G5 unknown
    m = convert_sources([Source("e", str(path))], tmp_path / "c1", vocab=vocab)
    ds = m["datasets"][0]
    assert (m["n_cells"], ds["n_cells_dropped"]) == (26, 4)
    assert ds["counts_lost_unknown_genes"] == float(X[:, 5].sum())
    m2 = convert_sources([Source("e", str(path))], tmp_path / "c2", vocab=vocab, min_genes=2)
    n_genes = (X[:, :5] > 0).sum(axis=1)
    assert m2["n_cells"] == int((n_genes >= 2).sum()) and m2["datasets"][0]["n_cells_dropped"] == int(
        (n_genes < 2).sum()
    )
    back = to_anndata(tmp_path / "c2")
    np.testing.assert_array_equal(back.obs["source_row"], np.flatnonzero(n_genes >= 2))


def test_csc_matrix_is_rejected_with_fix(tmp_path, capsys):
    adata = ad.AnnData(sp.csc_matrix(_counts()), var=pd.DataFrame(index=list("ABCDEF")))
    adata.write_h5ad(tmp_path / "csc.h5ad")
    _fails(tmp_path, capsys, [tmp_path / "csc.h5ad"], "CSC", "tocsr()")
