"""Value-type detection (data_modules/value_types.py) on real cells in the forms users bring them, and what the
fine-tuning data module does with each: raw counts, log1p-normalized, TPM-like, a chosen layer, scaled, NaN."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from test_own_data import log_normalized, pbmc_counts, write

from data_modules.anndata_module import AnnDataModule
from data_modules.value_types import (
    ValueTypeError,
    apply_steps,
    declared_value_type,
    detect_value_type,
    preprocessing_steps,
)


@pytest.fixture(scope="module")
def counts() -> ad.AnnData:
    return pbmc_counts()


def scaled_rows(adata: ad.AnnData, target: float) -> ad.AnnData:
    """Counts scaled so every cell sums to ``target`` (CPM / TPM-like, non-integer)."""
    out = adata.copy()
    x = out.X.copy()
    x.data *= np.repeat(target / np.asarray(x.sum(1)).ravel(), np.diff(x.indptr)).astype(np.float32)
    out.X = x
    return out


def scanpy_log_normalized(adata: ad.AnnData) -> sp.csr_matrix:
    """The reference: scanpy's normalize_total(1e4) + log1p of the counts."""
    import scanpy as sc

    a = adata.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return sp.csr_matrix(a.X)


def test_counts_log1p_and_tpm_like_values_are_told_apart(counts):
    rep = detect_value_type(counts.X, "counts.h5ad: X")
    assert rep.value_type == "counts" and rep.integer_fraction == 1.0
    assert preprocessing_steps(rep, 1e4, True) == ["normalize_total 10000", "log1p"]

    rep = detect_value_type(log_normalized(counts).X)
    assert rep.value_type == "log1p" and rep.normalized_to == 1e4 and rep.max_value <= 30
    assert preprocessing_steps(rep, 1e4, True) == []  # already what the annotation recipe wants
    cpm_log = detect_value_type(log_normalized(counts, 1e6).X)
    assert cpm_log.value_type == "log1p" and cpm_log.normalized_to == 1e6
    assert preprocessing_steps(cpm_log, 1e4, True) == ["expm1", "normalize_total 10000", "log1p"]

    for target in (1e5, 1e6, 1.0):
        rep = detect_value_type(scaled_rows(counts, target).X)
        assert rep.value_type == "normalized" and rep.normalized_to == pytest.approx(target), target
        assert preprocessing_steps(rep, 1e4, True) == ["normalize_total 10000", "log1p"]


def test_scanpy_pbmc68k_raw_is_log1p_and_its_scaled_x_is_refused():
    """pbmc68k_reduced's .raw holds log-normalized values of a gene subset (cells' expm1 sums vary);
    its X holds scaled values (sc.pp.scale: negatives), which no recipe can use."""
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    rep = detect_value_type(src.raw.X)
    assert rep.value_type == "log1p" and rep.normalized_to is None and rep.expm1_row_sum_spread > 0.1
    scaled = detect_value_type(src.X, "pbmc68k.h5ad: X")
    assert scaled.value_type == "scaled"
    with pytest.raises(ValueTypeError, match="scaled values.*data.layer=counts.*use_raw"):
        preprocessing_steps(scaled, 1e4, True)


def test_nan_is_refused_naming_cell_and_gene(counts):
    x = counts.X.copy()
    x.data[x.indptr[5] + 2] = np.nan
    gene = counts.var_names[x.indices[x.indptr[5] + 2]]
    with pytest.raises(ValueTypeError, match=f"cell '{counts.obs_names[5]}' \\(row 5\\), gene '{gene}'"):
        detect_value_type(x, "a.h5ad: X", counts.obs_names, counts.var_names)


def test_a_declared_type_the_values_contradict_is_refused(counts):
    with pytest.raises(ValueTypeError, match="value_type=counts but the values say otherwise"):
        declared_value_type(log_normalized(counts).X, "counts")
    assert declared_value_type(counts.X, "counts").declared


def test_apply_steps_matches_scanpy(counts):
    x = sp.csr_matrix(counts.X, dtype=np.float32, copy=True)
    apply_steps(x, ["normalize_total 10000", "log1p"])
    np.testing.assert_allclose(x.toarray(), scanpy_log_normalized(counts).toarray(), rtol=1e-5, atol=1e-6)


def test_every_input_form_reaches_the_model_as_the_same_log_normalized_values(counts, tmp_path):
    """Counts, TPM-like values, log1p of CPM, and log-normalized X with counts in a layer (data.layer=counts):
    the annotation recipe's data module holds the same matrix for all, scanpy's normalize_total 1e4 + log1p."""
    expected = scanpy_log_normalized(counts).toarray()
    lognorm_with_layer = log_normalized(counts)
    lognorm_with_layer.layers["counts"] = counts.X.copy()
    forms = {
        "counts": (counts, None, "counts"),
        "tpm": (scaled_rows(counts, 1e5), None, "normalized"),
        "cpm_log": (log_normalized(counts, 1e6), None, "log1p"),
        "lognorm": (log_normalized(counts), None, "log1p"),
        "layer": (lognorm_with_layer, "counts", "counts"),
    }
    for name, (adata, layer, kind) in forms.items():
        path = write(adata, tmp_path / f"{name}.h5ad")
        dm = AnnDataModule(
            str(path),
            label_key="cell_type",
            layer=layer,
            preprocess={"normalize_total": 1e4, "log1p": True},
            report_path=str(tmp_path / f"{name}.json"),
        )
        dm.setup()
        values = json.loads((tmp_path / f"{name}.json").read_text())["values"]
        assert [v["value_type"] for v in values] == [kind], name
        assert values[0]["source"] == f"{name}.h5ad: " + ("layers['counts']" if layer else "X")
        order = [list(counts.var_names).index(g) for g in dm.adata.var_names]  # model genes, in vocab order
        np.testing.assert_allclose(dm.expression("all").toarray(), expected[:, order], rtol=1e-4, atol=1e-5)


def test_backed_mode_refuses_values_the_recipe_would_change(counts, tmp_path):
    path = write(counts, tmp_path / "c.h5ad")
    dm = AnnDataModule(str(path), backed=True, preprocess={"normalize_total": 1e4, "log1p": True})
    with pytest.raises(ValueError, match="backed=true reads X as stored.*counts values.*data.backed=false"):
        dm.setup()
    ok = AnnDataModule(str(write(log_normalized(counts), tmp_path / "l.h5ad")), backed=True,
                       preprocess={"normalize_total": 1e4, "log1p": True})  # fmt: skip
    ok.setup()
    assert ok.value_reports[0]["value_type"] == "log1p"
