"""Every objective: a few optimizer steps on real cells (pbmc68k_reduced) reduce its loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from data_modules.batch import Batch
from scgpt_train.model import ScGPT
from scgpt_train.objectives import (
    CLSObjective,
    DARObjective,
    ECSObjective,
    ExpressionMSEObjective,
    GenerativeObjective,
    MLMObjective,
    ZeroProbObjective,
    masked_bernoulli_nll,
    masked_mse,
    total_loss,
)

N_BINS, PAD_VALUE, MASK_VALUE = 51, -2.0, -1.0


def _rank_bins(x: np.ndarray, n_bins: int) -> np.ndarray:
    """Per-cell rank binning: zeros -> 0, non-zeros -> 1..n_bins-1 by their rank within the cell."""
    nonzero = x > 0
    ranks = rankdata(np.where(nonzero, x, np.nan), axis=1, nan_policy="omit")
    n = np.maximum(nonzero.sum(1, keepdims=True), 1)
    return np.where(nonzero, np.ceil(ranks / n * (n_bins - 1)), 0).astype(np.float32)


@pytest.fixture(scope="module")
def pbmc():
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    return adata.raw.X.toarray().astype(np.float32), adata.obs


def _batch(pbmc, n_cells=32, L=40, seed=0) -> tuple[Batch, int, int]:
    x, obs = pbmc
    rng = np.random.default_rng(seed)
    cells = rng.choice(x.shape[0], n_cells, replace=False)
    n_genes = x.shape[1]
    cls_id, pad_id = n_genes, n_genes + 1
    bins = _rank_bins(x[cells], N_BINS)  # (B, G)
    genes = rng.permuted(np.tile(np.arange(n_genes), (n_cells, 1)), axis=1)[:, : L - 1]  # zeros included
    gene_ids = np.concatenate([np.full((n_cells, 1), cls_id), genes], axis=1)
    target = np.concatenate([np.zeros((n_cells, 1), np.float32), np.take_along_axis(bins, genes, 1)], axis=1)
    lengths = rng.integers(L // 2, L + 1, n_cells)
    pad_mask = np.arange(L)[None] >= lengths[:, None]
    gene_ids[pad_mask] = pad_id
    target[pad_mask] = PAD_VALUE
    body = ~pad_mask
    body[:, 0] = False
    gen_mask = body & (rng.random((n_cells, L)) < 0.5)
    mlm_mask = body & (rng.random((n_cells, L)) < 0.4)
    values = np.where(mlm_mask, MASK_VALUE, target)
    t = torch.from_numpy
    batch = Batch(
        gene_ids=t(gene_ids).long(),
        values=t(values).float(),
        pad_mask=t(pad_mask),
        target_values=t(target).float(),
        gen_mask=t(gen_mask),
        mlm_mask=t(mlm_mask),
        batch_labels=t((obs["bulk_labels"].to_numpy()[cells] == "Dendritic").astype(np.int64)),
        labels=t(obs["bulk_labels"].cat.codes.to_numpy()[cells].astype(np.int64)),
    )
    return batch, n_genes + 2, pad_id


def _model(vocab_size, pad_id, **kw) -> ScGPT:
    torch.manual_seed(0)
    return ScGPT(
        vocab_size=vocab_size, pad_token_id=pad_id, d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout=0.0, **kw
    )


def _forward(model, batch):
    return model(**batch.model_inputs())


def _train(model, objectives, batch, steps=12, lr=3e-3, step0=0, params=None):
    """Loss before and after ``steps`` Adam steps (the lead module's weighted sum)."""
    opt = torch.optim.Adam(model.parameters() if params is None else params, lr=lr)
    losses = []
    for i in range(steps + 1):
        terms = total_loss({o.name: o for o in objectives}, model, batch, _forward(model, batch), step0 + i)
        loss = terms["loss"]
        losses.append(float(loss.detach()))
        if i < steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return losses[0], losses[-1], {k.split("/")[-1]: v for k, v in terms.items() if k != "loss"}


def test_generative_objective_reduces_loss(pbmc):
    batch, vocab_size, pad_id = _batch(pbmc)
    model = _model(vocab_size, pad_id)
    objective = GenerativeObjective(cell_prompt_after_steps=5)
    with torch.no_grad():
        early = objective(model, batch, _forward(model, batch), step=4)
        late = objective(model, batch, _forward(model, batch), step=5)
    assert set(early) == {"gep", "gepc"} and set(late) == {"gep", "gepc", "cell_prompt"}
    first, last, terms = _train(model, [objective], batch, step0=5)
    assert last < 0.8 * first, (first, last)
    assert set(terms) == {"gep", "gepc", "cell_prompt"}


def test_generative_loss_only_reads_unknown_genes(pbmc):
    batch, vocab_size, pad_id = _batch(pbmc)
    model = _model(vocab_size, pad_id).eval()
    out = _forward(model, batch)
    terms = GenerativeObjective(cell_prompt_after_steps=None)(model, batch, out, 0)
    unknown = batch.gen_mask & ~batch.pad_mask
    expected = ((out["mlm_output"] - batch.target_values)[unknown] ** 2).mean()
    torch.testing.assert_close(terms["gep"], expected)


def test_mlm_objective_reduces_loss(pbmc):
    batch, vocab_size, pad_id = _batch(pbmc)
    batch.gen_mask = None
    first, last, terms = _train(_model(vocab_size, pad_id), [MLMObjective(use_gepc=True)], batch)
    assert last < 0.8 * first and set(terms) == {"mlm", "gepc"}


def test_cls_objective_reduces_loss(pbmc):
    batch, vocab_size, pad_id = _batch(pbmc)
    batch.gen_mask = None
    model = _model(vocab_size, pad_id, n_cls=10, use_mvc=False, use_generative=False)
    first, last, _ = _train(model, [CLSObjective()], batch)
    assert last < 0.8 * first, (first, last)


def test_ecs_objective_reduces_loss(pbmc):
    batch, vocab_size, pad_id = _batch(pbmc)
    batch.gen_mask = None
    first, last, _ = _train(_model(vocab_size, pad_id, ecs_threshold=0.8), [ECSObjective(weight=10.0)], batch)
    assert last < first - 0.01, (first, last)


def test_dar_objective_reduces_loss(pbmc):
    batch, vocab_size, pad_id = _batch(pbmc)
    batch.gen_mask = None
    model = _model(vocab_size, pad_id, do_dab=True, num_batch_labels=2)
    # the discriminator descends the batch cross-entropy ...
    first, last, _ = _train(model, [DARObjective()], batch, steps=20, lr=1e-2, params=model.dab_decoder.parameters())
    assert last < 0.9 * first, (first, last)
    # ... while the encoder, behind the gradient reversal, ascends it (the adversarial game)
    enc_params = [p for n, p in model.named_parameters() if not n.startswith("dab_decoder.")]
    first, last, _ = _train(model, [DARObjective()], batch, steps=5, params=enc_params)
    assert last > first, (first, last)


def test_zero_prob_objective_reduces_loss(pbmc):
    batch, vocab_size, pad_id = _batch(pbmc)
    batch.gen_mask = None
    assert bool((batch.target_values[batch.mlm_mask] == 0).any()), "the batch must contain zero-expression genes"
    model = _model(vocab_size, pad_id, explicit_zero_prob=True)
    first, last, terms = _train(model, [ZeroProbObjective()], batch)
    assert last < 0.9 * first and set(terms) == {"zero_prob", "mvc_zero_prob"}


def test_expression_mse_objective_reduces_loss(pbmc):
    batch, vocab_size, pad_id = _batch(pbmc)
    batch.gen_mask = None
    batch.condition_ids = (torch.rand(batch.gene_ids.shape) < 0.1).long() + 1  # perturbation flags 1/2
    model = _model(vocab_size, pad_id, n_conditions=3, decoder_style="affine", use_mvc=False, use_generative=False)
    first, last, _ = _train(model, [ExpressionMSEObjective()], batch)
    assert last < 0.8 * first, (first, last)


def test_objectives_compose_with_weights(pbmc):
    batch, vocab_size, pad_id = _batch(pbmc)
    model = _model(
        vocab_size,
        pad_id,
        n_cls=10,
        explicit_zero_prob=True,
        do_dab=True,
        num_batch_labels=2,
        use_batch_labels=True,
        dsbn=True,
    )
    objectives = [
        GenerativeObjective(cell_prompt_after_steps=0),
        ZeroProbObjective(weight=0.5),
        ECSObjective(weight=10.0),
        DARObjective(weight=2.0),
        CLSObjective(weight=0.1),
    ]
    out = _forward(model, batch)
    terms = total_loss({o.name: o for o in objectives}, model, batch, out, step=0)
    expected = sum(o.weight * sum(o(model, batch, out, 0).values()) for o in objectives)
    torch.testing.assert_close(terms["loss"], expected)
    assert {"gep", "gepc", "cell_prompt", "zero_prob", "ecs", "dar", "cls"} <= {k.split("/")[-1] for k in terms}
    first, last, _ = _train(model, objectives, batch, steps=10)
    assert last < first


def test_missing_heads_and_fields_fail_clearly(pbmc):
    batch, vocab_size, pad_id = _batch(pbmc)
    model = _model(vocab_size, pad_id, use_mvc=False)
    out = _forward(model, batch)
    with pytest.raises(KeyError, match="use_mvc=True"):
        GenerativeObjective()(model, batch, out, 0)
    with pytest.raises(KeyError, match="n_cls"):
        CLSObjective()(model, batch, out, 0)
    batch.mlm_mask = None
    with pytest.raises(ValueError, match="batch.mlm_mask"):
        MLMObjective()(model, batch, out, 0)


def test_loss_helpers():
    pred = torch.tensor([[1.0, 2.0, 3.0]])
    target = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    assert float(masked_mse(pred, target, mask)) == pytest.approx(2.0)
    p = torch.tensor([[0.9, 0.2, 0.5]])
    assert float(masked_bernoulli_nll(p, target, mask)) == pytest.approx(-(np.log(0.9) + np.log(0.8)) / 2, rel=1e-5)


def test_adam_is_fused_on_cuda_unless_the_config_chose():
    """The configured optimizer gets ``fused=True`` when the parameters are on CUDA (one kernel per step instead
    of a loop over tensors); on CPU, with a config that set ``fused``, or an optimizer without it, nothing."""
    import functools

    from scgpt_train.module import fused_optimizer_kwargs

    adam = functools.partial(torch.optim.Adam, lr=1e-4)
    assert fused_optimizer_kwargs(adam, "cuda") == {"fused": True}
    assert fused_optimizer_kwargs(functools.partial(torch.optim.AdamW, lr=1e-4), "cuda") == {"fused": True}
    assert fused_optimizer_kwargs(adam, "cpu") == {}
    assert fused_optimizer_kwargs(functools.partial(torch.optim.Adam, fused=False), "cuda") == {}
    assert fused_optimizer_kwargs(functools.partial(torch.optim.LBFGS), "cuda") == {}
    assert fused_optimizer_kwargs(lambda params: torch.optim.Adam(params), "cuda") == {}
