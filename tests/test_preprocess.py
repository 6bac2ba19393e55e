"""AnnData fine-tuning data path: preprocessing, vocab mapping, labels, batches, splits, batches of tokens."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from data_modules.anndata_module import AnnDataModule
from data_modules.demo import make_two_batch
from data_modules.preprocess import normalize_log1p, stratified_split
from data_modules.tokenize import TokenizerConfig, TokenLayout, tokenize_with_zeros
from data_modules.vocab import GeneVocab


def toy_adata(n_cells=60, genes=None, seed=0, labels=None, batches=None) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    genes = genes or [f"G{i}" for i in range(30)]
    x = sp.csr_matrix(rng.poisson(0.8, (n_cells, len(genes))).astype(np.float32))
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    obs["cell_type"] = labels if labels is not None else np.array(["T", "B", "NK"])[np.arange(n_cells) % 3]
    if batches is not None:
        obs["batch"] = batches
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))


def write(adata, path):
    adata.write_h5ad(path)
    return str(path)


def test_genes_missing_from_the_vocab_are_dropped_and_reported(tmp_path):
    vocab = GeneVocab.from_genes([f"G{i}" for i in range(20)])  # G20..G29 are unknown
    vocab.to_json(tmp_path / "vocab.json")
    path = write(toy_adata(), tmp_path / "a.h5ad")
    dm = AnnDataModule(
        path, label_key="cell_type", vocab=str(tmp_path / "vocab.json"), report_path=str(tmp_path / "report.json")
    )
    dm.setup()
    rep = dm.gene_report
    assert (rep.n_genes, rep.n_in_vocab, rep.n_lost) == (30, 20, 10)
    assert rep.lost_examples == [f"G{i}" for i in range(20, 30)]
    x = sp.csr_matrix(ad.read_h5ad(path).X)
    expected = float(x[:, 20:].sum() / x.sum())
    assert rep.lost_expression_fraction == pytest.approx(expected, rel=1e-5)
    assert len(dm.gene_ids) == 20 and (dm.gene_ids < 20).all()
    batch = next(iter(dm.loader("all", masked=False)))
    real = batch.gene_ids[~batch.pad_mask]
    assert set(real.tolist()) <= set(range(20)) | {vocab.cls_id}
    assert '"n_lost": 10' in (tmp_path / "report.json").read_text()


def test_no_gene_in_the_vocab_is_a_clear_error(tmp_path):
    vocab = GeneVocab.from_genes(["X1", "X2"])
    vocab.to_json(tmp_path / "vocab.json")
    dm = AnnDataModule(write(toy_adata(), tmp_path / "a.h5ad"), vocab=str(tmp_path / "vocab.json"))
    with pytest.raises(ValueError, match="none of the genes"):
        dm.setup()


def test_labels_only_in_the_query_get_minus_one_and_are_reported(tmp_path):
    ref = toy_adata(60, labels=np.array(["T", "B"])[np.arange(60) % 2])
    query = toy_adata(30, seed=1, labels=np.array(["T", "B", "Mono"])[np.arange(30) % 3])
    query.obs_names = [f"q{i}" for i in range(30)]
    dm = AnnDataModule(
        write(ref, tmp_path / "ref.h5ad"), query_path=write(query, tmp_path / "q.h5ad"), label_key="cell_type"
    )
    dm.setup()
    assert dm.label_names == ["B", "T"] and dm.n_cls == 2 and dm.model_kwargs == {"n_cls": 2}
    assert dm.query_only_labels == ["Mono"]
    q = dm.indices("query")
    assert len(q) == 30 and set(dm.split[q]) == {"query"}
    assert (dm.labels[q][np.arange(30) % 3 == 2] == -1).all()
    assert (dm.labels[dm.indices("reference")] >= 0).all()
    batch = next(iter(dm.loader("query", masked=False, batch_size=30)))
    assert int((batch.labels == -1).sum()) == 10


def test_a_batch_with_a_single_cell_trains_with_dsbn(tmp_path):
    batches = np.array(["A"] * 40 + ["B"] * 19 + ["C"])  # batch C has one cell
    path = write(toy_adata(60, batches=batches), tmp_path / "a.h5ad")
    dm = AnnDataModule(
        path,
        label_key="cell_type",
        batch_key="batch",
        train_on="all",
        include_zero_genes=True,
        layout={"max_seq_len": 31},
        tokenizer={"mlm_prob": 0.4},
        model_outputs=["num_batch_labels"],
    )
    dm.setup()
    assert dm.batch_names == ["A", "B", "C"] and dm.model_kwargs == {"num_batch_labels": 3}
    single = np.flatnonzero(dm.batch_labels == 2)
    assert len(single) == 1 and dm.split[single[0]] in ("train", "val")
    from scgpt_train.model import ScGPT
    from scgpt_train.objectives import DARObjective, MLMObjective

    model = ScGPT(
        vocab_size=dm.vocab_size,
        pad_token_id=dm.pad_id,
        d_model=16,
        n_heads=2,
        d_ff=32,
        n_layers=1,
        use_generative=False,
        num_batch_labels=3,
        dsbn=True,
        do_dab=True,
    )
    batch = dm.store and next(iter(dm.loader("all", batch_size=60)))  # all cells: C's single cell included
    assert int((batch.batch_labels == 2).sum()) == 1
    out = model(**batch.model_inputs())
    loss = sum(MLMObjective()(model, batch, out, 0).values()) + sum(DARObjective()(model, batch, out, 0).values())
    loss.backward()
    assert torch.isfinite(loss)


def test_stratified_split_keeps_every_class_in_training():
    labels = np.array([0] * 50 + [1] * 10 + [2] * 1 + [3] * 2)
    tr, va = stratified_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(labels)
    assert np.bincount(labels[va], minlength=4).tolist() == [5, 1, 0, 0]
    assert set(labels[tr]) == {0, 1, 2, 3}
    tr2, va2 = stratified_split(labels, 0.1, seed=3)
    assert (va2 == va).all()


def test_query_fraction_is_a_stratified_holdout_and_train_val_is_90_10(tmp_path):
    dm = AnnDataModule(write(toy_adata(90), tmp_path / "a.h5ad"), label_key="cell_type", query_fraction=0.3)
    dm.setup()
    counts = pd.Series(dm.split).value_counts()
    assert counts["query"] == 27 and counts["val"] == 6 and counts["train"] == 57
    q = dm.indices("query")
    assert np.bincount(dm.labels[q]).tolist() == [9, 9, 9]


def test_normalize_log1p_matches_scanpy():
    import scanpy as sc

    a = toy_adata()
    b = a.copy()
    normalize_log1p(a, 1e4, True)
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    np.testing.assert_allclose(a.X.toarray(), b.X.toarray(), rtol=1e-5, atol=1e-6)


def test_tokenize_with_zeros_keeps_zero_genes_as_bin_zero():
    x = sp.csr_matrix(np.array([[0, 3, 0, 1, 2], [5, 0, 0, 0, 0]], dtype=np.float32))
    gene_ids = np.array([10, 11, 12, 13, 14])
    cfg = TokenizerConfig(TokenLayout(max_seq_len=6, n_bins=5), gen_ratios=None)
    batch = tokenize_with_zeros(x, gene_ids, cfg, pad_id=0, cls_id=1, rng=np.random.default_rng(0))
    assert batch.gene_ids.tolist() == [[1, 10, 11, 12, 13, 14]] * 2
    t = batch.target_values
    assert t[:, 0].tolist() == [cfg.cls_value] * 2
    assert (t[0, [1, 3]] == 0).all() and (t[0, [2, 4, 5]] > 0).all()  # zeros -> 0, non-zeros -> 1..4
    assert t[0, 2] > t[0, 5] > t[0, 4]  # ranks within the cell: 3 > 2 > 1
    assert t[1, 1] > 0 and (t[1, 2:] == 0).all()
    short = tokenize_with_zeros(
        x,
        gene_ids,
        TokenizerConfig(TokenLayout(max_seq_len=3, n_bins=5), gen_ratios=None),
        0,
        1,
        np.random.default_rng(0),
    )
    assert short.gene_ids.shape == (2, 3) and not short.pad_mask.any()


def test_backed_mode_yields_the_same_batches_as_in_memory(tmp_path):
    path = write(toy_adata(), tmp_path / "a.h5ad")
    kw = dict(label_key="cell_type", layout={"max_seq_len": 16})
    mem, backed = AnnDataModule(path, **kw), AnnDataModule(path, backed=True, **kw)
    b1 = next(iter(mem.loader("all", masked=False)))
    b2 = next(iter(backed.loader("all", masked=False)))
    for f in ("gene_ids", "values", "pad_mask", "labels", "cell_index"):
        assert torch.equal(getattr(b1, f), getattr(b2, f)), f
    with pytest.raises(ValueError, match="backed=true"):
        AnnDataModule(path, backed=True, preprocess={"n_hvg": 10}).setup()


def test_two_batch_demo_has_the_documented_batch_effect():
    from data_modules.demo import pbmc68k_log_normalized

    src = pbmc68k_log_normalized()
    two = make_two_batch(src, seed=0)
    assert two.n_obs == src.n_obs and set(two.obs["batch"]) == {"A", "B"}
    per_type = pd.crosstab(two.obs["cell_type"], two.obs["batch"])
    assert ((per_type["A"] - per_type["B"]).abs() <= 1).all()  # stratified halves
    b = two[two.obs["batch"] == "B"]
    a = two[two.obs["batch"] == "A"]
    dropped = np.asarray(b.X.sum(0)).ravel() == 0
    assert 0.05 < dropped.mean() < 0.2 and (np.asarray(a.X.sum(0)).ravel()[dropped] > 0).any()
