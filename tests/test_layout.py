"""TokenLayout: derived values, the checkpoint/data mismatch message, and every value style x
{plain, generative} through the real tokenizer and the model on real cells."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from data_modules.store.reader import CellBlock
from data_modules.tokenize import Tokenizer, TokenizerConfig
from data_modules.tokenize.layout import TokenLayout
from scgpt_train.model import ScGPT


def test_derived_values_are_computed_once_here():
    layout = TokenLayout(max_seq_len=201, n_bins=11)
    assert layout.max_genes == 200
    assert (layout.pad_category, layout.mask_category, layout.n_categories) == (11, 12, 13)
    assert layout.input_pad == -2.0 and layout.input_mask == -1.0
    cat = layout.replace(value_style="category")
    assert (cat.input_pad, cat.input_mask) == (11.0, 12.0)
    with pytest.raises(ValueError, match="value_style"):
        TokenLayout(value_style="ranks")


def test_mismatch_names_the_field_that_differs():
    model_layout = TokenLayout(n_bins=51)
    model_layout.check_compatible(model_layout.replace(max_seq_len=3001))  # length is not a model property
    with pytest.raises(ValueError, match=r"n_bins: model 51, data 21.*layout.n_bins=51"):
        model_layout.check_compatible(model_layout.replace(n_bins=21), "checkpoint x.ckpt")


@pytest.fixture(scope="module")
def pbmc_block() -> CellBlock:
    import scanpy as sc

    x = sp.csr_matrix(sc.datasets.pbmc68k_reduced().raw.X[:24], dtype=np.float32)  # (24, 765) log-normalized
    x.eliminate_zeros()
    return CellBlock(
        indptr=x.indptr.astype(np.int64),
        gene_ids=x.indices.astype(np.int32),
        counts=x.data,
        cell_index=np.arange(x.shape[0], dtype=np.int64),
    )


@pytest.mark.parametrize("style", ["continuous", "category", "scaling"])
@pytest.mark.parametrize("generative", [False, True])
def test_every_value_style_trains_plain_and_generative(pbmc_block, style, generative):
    n_genes = 765
    cls_id, pad_id = n_genes, n_genes + 1
    layout = TokenLayout(max_seq_len=65, n_bins=21, value_style=style)
    cfg = TokenizerConfig(
        layout,
        gen_ratios=(0.5,) if generative else None,
        mlm_prob=None if generative else 0.3,
    )
    batch = Tokenizer(cfg, pad_id, cls_id)(pbmc_block, np.random.default_rng(0))
    assert (batch.gen_mask is not None) == generative
    torch.manual_seed(0)
    model = ScGPT(
        vocab_size=n_genes + 2,
        pad_token_id=pad_id,
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_layers=2,
        dropout=0.0,
        layout=layout.to_dict(),
    )
    assert model.layout == layout
    out = model(**batch.model_inputs())  # category + gen_mask used to raise IndexError
    hidden = batch.gen_mask if generative else batch.mlm_mask
    loss = ((out["mlm_output"] - batch.target_values)[hidden & ~batch.pad_mask] ** 2).mean()
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if generative:  # the unknown genes' values are never read: changing them changes nothing
        model.eval()
        with torch.no_grad():
            ref = model(**batch.model_inputs())["mlm_output"]
            batch.values = batch.values.masked_fill(batch.gen_mask, 3.0)
            again = model(**batch.model_inputs())["mlm_output"]
        torch.testing.assert_close(ref, again)
