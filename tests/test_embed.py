"""scripts/embed.py with an imported official checkpoint and with the official directory itself."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import FIXTURES, run_cmd


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


def test_embed_with_imported_and_directory_checkpoints(cells, tmp_path):
    ckpt = tmp_path / "tiny.pt"
    run_cmd(["scripts/import_scgpt.py", str(FIXTURES), "--out", str(ckpt)])
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
    run_cmd(
        [
            "scripts/embed.py",
            "--checkpoint",
            str(FIXTURES),
            "--input",
            str(cells),
            "--output",
            str(out2),
            "--batch-size",
            "32",
        ]
    )
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
    from scgpt_train.tasks.embedding import predict_cells

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
