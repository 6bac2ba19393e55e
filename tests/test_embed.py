"""scripts/embed.py with an imported official checkpoint and with the official directory itself."""

from __future__ import annotations

import importlib.util
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import FIXTURES, ROOT, run_cmd


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    vocab = json.loads((FIXTURES / "vocab.json").read_text())
    genes = [g for g in vocab if not g.startswith("<")][:60] + ["NOT_A_GENE_1", "NOT_A_GENE_2"]
    rng = np.random.default_rng(0)
    x = sp.csr_matrix(rng.poisson(1.0, (150, len(genes))).astype(np.float32))
    path = tmp_path_factory.mktemp("embed") / "in.h5ad"
    ad.AnnData(
        X=x,
        obs=pd.DataFrame({"group": ["a", "b", "c"] * 50}, index=[f"c{i}" for i in range(150)]),
        var=pd.DataFrame(index=genes),
    ).write_h5ad(path)
    return path


def script_main(name: str):
    """``main`` of ``scripts/<name>``: the code ``python scripts/<name> ARGS`` runs, without a new interpreter."""
    import runpy

    return runpy.run_path(str(ROOT / "scripts" / name))["main"]


def test_embed_with_imported_and_directory_checkpoints(cells, tmp_path):
    """embed.py as a program on an imported .pt (the import script's own run is tested in test_checkpoints), and
    through its main() on the official directory: the same embeddings."""
    ckpt = tmp_path / "tiny.pt"
    assert script_main("import_scgpt.py")([str(FIXTURES), "--out", str(ckpt)]) == 0
    out1, out2 = tmp_path / "a.h5ad", tmp_path / "b.h5ad"
    proc = run_cmd(
        [
            "scripts/embed.py",
            "--checkpoint",
            str(ckpt),
            "--input",
            str(cells),
            "--output",
            str(out1),
            "--batch-size",
            "32",
        ]
    )
    assert "60/62 genes in the vocabulary, 2 lost" in proc.stdout
    assert "embedding" in proc.stderr  # the progress bar
    argv = ["--checkpoint", str(FIXTURES), "--input", str(cells), "--output", str(out2), "--batch-size", "32"]
    assert script_main("embed.py")(argv) == 0
    a, b = ad.read_h5ad(out1), ad.read_h5ad(out2)
    assert a.obsm["X_scgpt"].shape == (150, 32)
    np.testing.assert_allclose(np.linalg.norm(a.obsm["X_scgpt"], axis=1), 1.0, rtol=1e-5)
    # same weights, same cells, same seeded tie-breaking: identical embeddings
    np.testing.assert_allclose(a.obsm["X_scgpt"], b.obsm["X_scgpt"], atol=1e-5)
    assert list(a.obs["group"]) == ["a", "b", "c"] * 50 and a.n_vars == 62  # the input, untouched
    assert int(a.uns["X_scgpt_gene_report"]["n_lost"]) == 2
    # different cells get different embeddings
    assert np.abs(a.obsm["X_scgpt"][0] - a.obsm["X_scgpt"][1]).max() > 1e-3


def test_embed_matches_the_official_cell_embedding(tmp_path):
    """Feeding the fixture's own batch through embed's tokenization path gives the official cell_emb."""
    import torch

    from data_modules.batch import Batch
    from scgpt_train.checkpoints import load_checkpoint
    from scgpt_train.inference import predict_cells

    inputs, expected = np.load(FIXTURES / "inputs.npz"), np.load(FIXTURES / "expected.npz")
    model, _ = load_checkpoint(FIXTURES)
    pad = torch.from_numpy(inputs["src_key_padding_mask"])
    batch = Batch(
        gene_ids=torch.from_numpy(inputs["gene_ids"]),
        values=torch.from_numpy(inputs["values"]),
        pad_mask=pad,
        target_values=torch.from_numpy(inputs["values"]),
        cell_index=torch.arange(4),
    )
    out = predict_cells(model, [batch], 4, device="cpu", progress=False)
    np.testing.assert_allclose(out["cell_emb"], expected["cell_emb"], atol=1e-5)


# ---------------------------------------------------------------------------------------
# input checks and cells outside the vocabulary (issue #17 item 6), through scripts/embed.py's main in-process


def _embed_main():
    spec = importlib.util.spec_from_file_location("embed_script", ROOT / "scripts" / "embed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _vocab_genes(n: int) -> list[str]:
    vocab = json.loads((FIXTURES / "vocab.json").read_text())
    return [g for g in vocab if not g.startswith("<")][:n]


def _write(path, X, genes, obs_names=None, var=None, raw=None):
    obs = pd.DataFrame(index=obs_names if obs_names is not None else [f"c{i}" for i in range(X.shape[0])])
    adata = ad.AnnData(X=X, obs=obs, var=var if var is not None else pd.DataFrame(index=genes))
    if raw is not None:
        adata.raw = raw
    adata.write_h5ad(path)
    return path


def _run(tmp_path, capsys, input_path, *extra) -> tuple[int, str, str, object]:
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}.h5ad"
    rc = _embed_main()(
        ["--checkpoint", str(FIXTURES), "--input", str(input_path), "--output", str(out), "--device", "cpu", *extra]
    )
    captured = capsys.readouterr()
    return rc, captured.out, captured.err, out


@pytest.mark.parametrize("value, dense", [(np.nan, False), (np.inf, False), (-np.inf, True)])
def test_nan_or_inf_is_refused_naming_file_cell_and_gene(tmp_path, capsys, value, dense):
    genes = _vocab_genes(30)
    X = np.random.default_rng(0).poisson(1.0, (80, 30)).astype(np.float32)
    X[57, 12] = value  # late, past the first cells
    path = _write(tmp_path / "bad.h5ad", X if dense else sp.csr_matrix(X), genes, [f"cell-{i}" for i in range(80)])
    rc, _, err, out = _run(tmp_path, capsys, path)
    assert rc == 2, err
    assert str(path) in err and "NaN or infinite value" in err and "'cell-57'" in err and repr(genes[12]) in err, err
    assert not out.exists()


def test_zero_cell_input_says_it_has_no_cells(tmp_path, capsys):
    genes = _vocab_genes(10)
    path = _write(tmp_path / "empty.h5ad", sp.csr_matrix((0, 10), dtype=np.float32), genes, [])
    rc, _, err, out = _run(tmp_path, capsys, path)
    assert rc == 2 and "the input has no cells" in err and str(path) in err, err
    assert not out.exists()


def test_cells_outside_the_vocabulary_get_nan_or_are_dropped(tmp_path, capsys):
    genes = _vocab_genes(40) + ["NOT_A_GENE_1", "NOT_A_GENE_2"]
    rng = np.random.default_rng(1)
    X = rng.poisson(1.5, (50, len(genes))).astype(np.float32)
    X[:, :40] += np.eye(50, 40, dtype=np.float32)  # every other cell expresses a vocabulary gene
    unmapped = [3, 17, 18, 44]
    X[unmapped, :40] = 0.0
    X[44] = 0.0  # an all-zero cell is unmapped too
    names = [f"donor1_{i}" for i in range(50)]
    path = _write(tmp_path / "in.h5ad", sp.csr_matrix(X), genes, names)

    rc, stdout, err, out_nan = _run(tmp_path, capsys, path, "--batch-size", "16")
    assert rc == 0, err
    assert "4 of 50 cells" in stdout and "'donor1_3'" in stdout and "--drop-unmapped-cells" in stdout, stdout
    a = ad.read_h5ad(out_nan)
    assert list(a.obs_names) == names and a.n_vars == len(genes)
    emb = a.obsm["X_scgpt"]
    np.testing.assert_array_equal(np.flatnonzero(np.isnan(emb).all(1)), unmapped)  # not one shared vector
    mapped = np.setdiff1d(np.arange(50), unmapped)
    assert np.isfinite(emb[mapped]).all()
    np.testing.assert_allclose(np.linalg.norm(emb[mapped], axis=1), 1.0, rtol=1e-5)
    assert int(a.uns["X_scgpt_unmapped_cells"]["n_cells"]) == 4 and a.uns["X_scgpt_unmapped_cells"]["handling"] == "nan"

    rc, stdout, err, out_drop = _run(tmp_path, capsys, path, "--batch-size", "16", "--drop-unmapped-cells")
    assert rc == 0, err
    assert "4 of 50 cells" in stdout and "left out of the output" in stdout, stdout
    b = ad.read_h5ad(out_drop)
    assert list(b.obs_names) == [names[i] for i in mapped]
    np.testing.assert_allclose(b.obsm["X_scgpt"], emb[mapped], atol=1e-6)  # the flag changes no other cell
    assert b.uns["X_scgpt_unmapped_cells"]["handling"] == "dropped"


def test_no_cell_in_the_vocabulary_is_refused(tmp_path, capsys):
    genes = _vocab_genes(5) + ["NOT_A_GENE_1"]
    X = np.zeros((6, 6), dtype=np.float32)
    X[:, 5] = 3.0
    path = _write(tmp_path / "none.h5ad", sp.csr_matrix(X), genes)
    rc, _, err, _ = _run(tmp_path, capsys, path)
    assert rc == 2 and "none of its 6 cells" in err and "--gene-column" in err, err


def test_hints_name_the_cli_options(tmp_path, capsys):
    genes = _vocab_genes(20)
    X = sp.csr_matrix(np.random.default_rng(2).poisson(1.0, (12, 20)).astype(np.float32))
    var = pd.DataFrame({"symbol": genes}, index=[f"ENSG{i:011d}" for i in range(20)])
    ens = _write(tmp_path / "ensembl.h5ad", X, None, var=var)
    cases = [
        ((ens,), ["none of its 20 genes", "--gene-column", "'symbol'"]),
        ((ens, "--gene-column", "feature_name"), ["--gene-column 'feature_name' is not a column of var", "'symbol'"]),
        ((ens, "--use-raw"), ["--use-raw was given but the file has no .raw"]),
        ((ens, "--gene-column", "symbol", "--batch-key", "batch"), ["--batch-key 'batch' is not an obs column"]),
        ((tmp_path / "missing.h5ad",), ["--input", "does not exist"]),
    ]
    for args, expected in cases:
        rc, _, err, _ = _run(tmp_path, capsys, *args)
        assert rc == 2, (args, err)
        assert all(text in err for text in expected), (args, err)
        assert "data." not in err and "preprocess." not in err, err  # no Hydra keys in a CLI's hints
    rc, _, err, _ = _run(tmp_path, capsys, ens, "--gene-column", "symbol")  # the fix the hint names works
    assert rc == 0, err
