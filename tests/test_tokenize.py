"""Binning against the official fixture and numpy; tokenization layout, sampling and masks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import FIXTURES
from omegaconf import OmegaConf

from data_modules.store.reader import CellBlock
from data_modules.tokenize import Tokenizer, TokenizerConfig, TokenLayout, bin_values, pad_fraction
from data_modules.tokenize.binning import bin_edges

PAD, CLS = 1000, 1001


def test_binning_matches_official_fixture():
    raw = np.load(FIXTURES / "raw.npy")  # (4, 20) float32 counts
    official = np.load(FIXTURES / "binned.npy")
    details = np.load(FIXTURES / "binning_details.npz")
    left, right = details["left_digits"], details["right_digits"]
    csr = sp.csr_matrix(raw)
    for seed in range(5):
        bins = bin_values(csr.indptr, csr.data, 51, np.random.default_rng(seed))
        dense = sp.csr_matrix((bins, csr.indices, csr.indptr), shape=raw.shape).toarray()
        untied = (left - right <= 1) & (raw > 0)
        np.testing.assert_array_equal(dense[untied], official[untied])
        tied = (left - right > 1) & (raw > 0)
        assert tied.sum() > 10  # the fixture really has ties
        assert ((dense[tied] >= right[tied] + 1) & (dense[tied] <= left[tied])).all()
        assert (dense[raw == 0] == 0).all()
    edges = bin_edges(csr.indptr, csr.data, 51)
    np.testing.assert_array_equal(edges, details["bin_edges"][:, 1:])  # stored with a leading 0


@pytest.mark.parametrize("kind", ["uint16", "uint32", "float32", "float64", "few_values"])
def test_binning_agrees_with_numpy_on_many_cells_at_once(kind):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 300, 60)
    lengths[:3] = [1, 2, 49]
    n = int(lengths.sum())
    values = {
        "uint16": lambda: rng.geometric(0.3, n).astype(np.uint16),
        "uint32": lambda: (rng.geometric(0.01, n) * 1000).astype(np.uint32),
        "float32": lambda: rng.lognormal(0, 1, n).astype(np.float32),
        "float64": lambda: rng.lognormal(0, 1, n),  # the store's dtype for huge integer counts
        "few_values": lambda: rng.integers(1, 3, n).astype(np.uint16),
    }[kind]()
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    bins = bin_values(indptr, values, 51, rng)
    kernel_edges = bin_edges(indptr, values, 51)
    for c in range(len(lengths)):
        v, b = values[indptr[c] : indptr[c + 1]], bins[indptr[c] : indptr[c + 1]]
        edges = np.quantile(v, np.linspace(0, 1, 50))
        np.testing.assert_array_equal(kernel_edges[c], edges)  # bit-identical, histogram and sort paths
        left, right = np.digitize(v, edges), np.digitize(v, edges, right=True)
        exact = left - right <= 1
        np.testing.assert_array_equal(b[exact], left[exact])
        assert ((b[~exact] > right[~exact]) & (b[~exact] <= left[~exact])).all()


def test_ties_are_seeded_and_spread():
    indptr = np.array([0, 400])
    values = np.ones(400, dtype=np.uint16)  # every edge equals 1: bins uniform in 1..50
    a = bin_values(indptr, values, 51, np.random.default_rng(0))
    np.testing.assert_array_equal(a, bin_values(indptr, values, 51, np.random.default_rng(0)))
    assert a.min() >= 1 and a.max() <= 50 and len(np.unique(a)) > 40


def test_explicit_zeros_get_bin_zero():
    indptr = np.array([0, 4, 7])
    counts = np.array([0, 5, 1, 3, 2, 0, 9], dtype=np.uint16)
    bins = bin_values(indptr, counts, 51, np.random.default_rng(0))
    assert bins[0] == 0 and bins[5] == 0
    ref = bin_values(np.array([0, 3, 5]), counts[counts > 0], 51, np.random.default_rng(0))
    np.testing.assert_array_equal(bins[counts > 0], ref)


def _block(rng, lengths, n_genes=900) -> CellBlock:
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    genes = np.concatenate([np.sort(rng.choice(n_genes, n, replace=False)) for n in lengths]).astype(np.int32)
    counts = rng.geometric(0.3, int(indptr[-1])).astype(np.uint16)
    return CellBlock(
        indptr, genes, counts, np.arange(len(lengths)) + 100, {"dataset": np.arange(len(lengths), dtype=np.int32) % 2}
    )


def test_tokenizer_layout_sampling_and_generative_split():
    rng = np.random.default_rng(0)
    block = _block(rng, [5, 40, 200, 1])
    cfg = TokenizerConfig(TokenLayout(max_seq_len=65), gen_ratios=(0.5,))
    batch = Tokenizer(cfg, PAD, CLS)(block, np.random.default_rng(1))
    B, L = batch.gene_ids.shape
    assert (B, L) == (4, 65)  # longest cell sampled to max_seq_len - 1 genes + <cls>
    assert (batch.gene_ids[:, 0] == CLS).all() and (batch.values[:, 0] == cfg.cls_value).all()
    kept = np.minimum([5, 40, 200, 1], 64)
    np.testing.assert_array_equal((~batch.pad_mask).sum(1).numpy(), kept + 1)
    assert (batch.gene_ids[batch.pad_mask] == PAD).all() and (
        batch.values[batch.pad_mask] == cfg.layout.pad_value
    ).all()
    for c in range(4):
        genes = batch.gene_ids[c, 1 : kept[c] + 1].numpy()
        cell_genes = block.gene_ids[block.indptr[c] : block.indptr[c + 1]]
        assert len(np.unique(genes)) == kept[c] and np.isin(genes, cell_genes).all()  # a subset, no repeats
        pos = np.searchsorted(cell_genes, genes)
        targets = batch.target_values[c, 1 : kept[c] + 1].numpy()
        cell_values = block.counts[block.indptr[c] : block.indptr[c + 1]]  # binned over ALL the cell's genes
        edges = np.quantile(cell_values, np.linspace(0, 1, 50))
        left, right = np.digitize(cell_values, edges)[pos], np.digitize(cell_values, edges, right=True)[pos]
        exact = left - right <= 1
        np.testing.assert_array_equal(targets[exact], left[exact])
        assert ((targets[~exact] > right[~exact]) & (targets[~exact] <= left[~exact])).all()
    gen = batch.gen_mask.numpy()
    np.testing.assert_array_equal(gen.sum(1), np.floor(0.5 * kept))
    assert not gen[:, 0].any() and not gen[batch.pad_mask.numpy()].any()
    assert (batch.values[batch.gen_mask] == cfg.layout.mask_value).all()  # unknown genes carry no value
    known = ~batch.pad_mask & ~batch.gen_mask
    known[:, 0] = False
    assert (batch.values[known] == batch.target_values[known]).all()
    np.testing.assert_array_equal(batch.cell_index.numpy(), [100, 101, 102, 103])
    assert batch.obs["dataset"].tolist() == [0, 1, 0, 1]
    assert 0 < pad_fraction(batch) < 1


def test_sampling_is_random_per_call_and_seeded():
    rng = np.random.default_rng(0)
    block = _block(rng, [300, 300])
    tok = Tokenizer(TokenizerConfig(TokenLayout(max_seq_len=51)), PAD, CLS)
    a = tok(block, np.random.default_rng(5))
    b = tok(block, np.random.default_rng(5))
    c = tok(block, np.random.default_rng(6))
    assert (a.gene_ids == b.gene_ids).all() and (a.gen_mask == b.gen_mask).all()
    assert not (a.gene_ids == c.gene_ids).all()


def test_mlm_and_category_style():
    rng = np.random.default_rng(0)
    block = _block(rng, [100, 30, 60])
    cfg = TokenizerConfig(TokenLayout(max_seq_len=101, value_style="category"), gen_ratios=None, mlm_prob=0.3)
    batch = Tokenizer(cfg, PAD, CLS)(block, np.random.default_rng(0))
    assert batch.gen_mask is None and batch.values.dtype.is_floating_point is False
    mlm = batch.mlm_mask
    assert not mlm[:, 0].any() and not mlm[batch.pad_mask].any()
    assert 0.2 < mlm.sum().item() / (~batch.pad_mask[:, 1:]).sum().item() < 0.4
    assert (batch.values[mlm] == 52).all() and (batch.values[batch.pad_mask] == 51).all()
    assert (batch.values[:, 0] == 51).all()
    unmasked = ~mlm & ~batch.pad_mask
    unmasked[:, 0] = False
    assert (batch.values[unmasked].float() == batch.target_values[unmasked]).all()


def test_config_from_dict_and_dictconfig():
    cfg = TokenizerConfig.from_any(OmegaConf.create({"layout": {"max_seq_len": 11}, "gen_ratios": [0.5]}))
    assert cfg.layout.max_seq_len == 11 and cfg.gen_ratios == (0.5,) and cfg.cls_value == cfg.layout.pad_value
    cfg = TokenizerConfig.from_any(OmegaConf.create({"gen_ratios": None}), layout=OmegaConf.create({"n_bins": 21}))
    assert cfg.layout == TokenLayout(n_bins=21) and cfg.gen_ratios is None
    with pytest.raises(ValueError, match="give the token layout once"):
        TokenizerConfig.from_any({"layout": {"n_bins": 21}}, layout={"n_bins": 21})

    with pytest.raises(ValueError, match="unknown tokenizer option"):
        TokenizerConfig.from_any({"max_len": 3})
    with pytest.raises(ValueError, match="gen_ratios"):
        TokenizerConfig(gen_ratios=(1.5,))


def test_sampling_and_unknown_genes_exact_nested_uniform():
    """Kept genes: exactly max_seq_len - 1 per cell, uniform;
    unknown: exactly floor(ratio * kept), uniform among kept."""
    n_cells, n = 4000, 10
    indptr = np.arange(n_cells + 1, dtype=np.int64) * n
    genes = np.tile(np.arange(n, dtype=np.int32), n_cells)  # gene g at position g of every cell
    block = CellBlock(indptr, genes, np.ones(n * n_cells, np.uint16), np.arange(n_cells), {})
    cfg = TokenizerConfig(TokenLayout(max_seq_len=7), gen_ratios=(0.5,))  # keep 6 of 10, 3 of them unknown
    batch = Tokenizer(cfg, PAD, CLS)(block, np.random.default_rng(0))
    gene_ids, gen = batch.gene_ids[:, 1:].numpy(), batch.gen_mask[:, 1:].numpy()
    assert not batch.pad_mask.any() and (np.diff(gene_ids, axis=1) > 0).all()  # store order, no repeats
    kept = np.zeros((n_cells, n), bool)
    np.put_along_axis(kept, gene_ids, True, axis=1)
    unknown = np.zeros((n_cells, n), bool)
    np.put_along_axis(unknown, gene_ids, gen, axis=1)
    assert (gen.sum(1) == 3).all() and not (unknown & ~kept).any()
    assert np.abs(kept.mean(0) - 0.6).max() < 0.04  # each gene kept with probability 6/10
    assert np.abs(unknown.mean(0) - 0.3).max() < 0.04  # and unknown with probability 3/10
    pairs = np.bincount((gene_ids[:, :, None] * n + gene_ids[:, None, :]).ravel(), minlength=n * n)
    both = pairs.reshape(n, n)[~np.eye(n, dtype=bool)] / n_cells  # any two genes kept together: 6/10 * 5/9
    assert np.abs(both - 6 / 10 * 5 / 9).max() < 0.05
