"""SDPA attention: key padding vs nn.MultiheadAttention; generative mask vs a full boolean-mask reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scgpt_train.model import ScGPT, generative_attention_mask, generative_sdpa, naive_attention
from scgpt_train.model.attention import SelfAttention, generative_sdpa_sink, known_key_layout


def _masks(B=3, L=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    pad_mask = torch.zeros(B, L, dtype=torch.bool)
    pad_mask[1, 8:] = True
    pad_mask[2, 5:] = True
    gen_mask = (torch.rand(B, L, generator=g) < 0.5) & ~pad_mask
    gen_mask[:, 0] = False  # <cls> is always known
    gen_mask[0, 1:] = True  # a cell where every gene is unknown
    return pad_mask, gen_mask


def _check_against_reference(attn_fn, q, k, v, pad_mask, gen_mask, tol):
    upstream = torch.randn(q.shape, dtype=q.dtype)
    ours = attn_fn(q, k, v, ~pad_mask & ~gen_mask, gen_mask)
    grads_ours = torch.autograd.grad((ours * upstream).sum(), (q, k, v))
    allowed = generative_attention_mask(pad_mask, gen_mask)
    ref = naive_attention(q, k, v, allowed)
    grads_ref = torch.autograd.grad((ref * upstream).sum(), (q, k, v))
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)
    for a, b in zip(grads_ours, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=tol)


@pytest.mark.parametrize("attn_fn", [generative_sdpa, generative_sdpa_sink], ids=["flash_lse", "sink"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_generative_sdpa_equals_full_mask_reference(attn_fn, dtype, tol):
    torch.manual_seed(0)
    B, H, L, Dh = 3, 4, 11, 16
    pad_mask, gen_mask = _masks(B, L)
    q, k, v = (torch.randn(B, H, L, Dh, dtype=dtype, requires_grad=True) for _ in range(3))
    _check_against_reference(attn_fn, q, k, v, pad_mask, gen_mask, tol)


def test_generative_sdpa_long_cells_equal_reference():
    """L spanning several blocks of the flash kernel, ragged lengths and known counts."""
    torch.manual_seed(1)
    B, H, L, Dh = 3, 2, 700, 8
    pad_mask = torch.arange(L)[None] >= torch.tensor([[L], [233], [650]])
    gen_mask = (torch.rand(B, L) < torch.tensor([[0.5], [0.1], [0.9]])) & ~pad_mask
    gen_mask[:, 0] = False
    q, k, v = (torch.randn(B, H, L, Dh, dtype=torch.float64, requires_grad=True) for _ in range(3))
    _check_against_reference(generative_sdpa, q, k, v, pad_mask, gen_mask, 1e-10)


def test_cpu_without_dropout_takes_the_flash_lse_path():
    pad_mask, gen_mask = _masks()
    q, k, v = (torch.randn(3, 2, 11, 8, requires_grad=True) for _ in range(3))
    out = generative_sdpa(q, k, v, ~pad_mask & ~gen_mask, gen_mask)
    assert type(out.grad_fn).__name__ == "_GenerativeFlashCPUBackward"
    out = generative_sdpa(q, k, v, ~pad_mask & ~gen_mask, gen_mask, dropout_p=0.1)
    assert type(out.grad_fn).__name__ != "_GenerativeFlashCPUBackward"


def test_known_key_layout_puts_known_tokens_first():
    known = torch.tensor([[False, True, False, True, True], [True, False, False, False, False]])
    key_idx, key_valid = known_key_layout(known)
    assert key_idx.shape == (2, 3)
    assert key_idx[0].tolist() == [1, 3, 4] and key_idx[1, 0] == 0
    assert key_valid.tolist() == [[True, True, True], [True, False, False]]


def test_generative_sdpa_cell_without_known_tokens():
    """Every token unknown: an unknown token attends only to itself (output v_i), no NaN anywhere."""
    torch.manual_seed(0)
    B, H, L, Dh = 2, 2, 6, 4
    pad_mask = torch.zeros(B, L, dtype=torch.bool)
    pad_mask[1, 4:] = True
    gen_mask = ~pad_mask
    q, k, v = (torch.randn(B, H, L, Dh, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = generative_sdpa(q, k, v, ~pad_mask & ~gen_mask, gen_mask)
    real = ~pad_mask
    torch.testing.assert_close(out.transpose(1, 2)[real], v.transpose(1, 2)[real], rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(grads[0], torch.zeros_like(q), rtol=0, atol=1e-12)  # a lone self term has no q grad


def test_generative_attention_dropout_does_not_leak_unknown_tokens():
    """With attention dropout (sink path) a query still never sees another unknown token."""
    B, H, L, Dh = 3, 2, 11, 8
    pad_mask, gen_mask = _masks(B, L)
    q, k, v = (torch.randn(B, H, L, Dh) for _ in range(3))
    b, j = 1, int(torch.nonzero(gen_mask[1])[0])
    v2, k2 = v.clone(), k.clone()
    v2[b, :, j] += 5.0
    k2[b, :, j] -= 3.0

    def run(k_, v_):
        torch.manual_seed(7)
        return generative_sdpa(q, k_, v_, ~pad_mask & ~gen_mask, gen_mask, dropout_p=0.5)

    base, changed = run(k, v), run(k2, v2)
    others = torch.ones(L, dtype=torch.bool)
    others[j] = False
    torch.testing.assert_close(changed[b][:, others], base[b][:, others])
    assert not torch.allclose(changed[b, :, j], base[b, :, j])


def test_reference_mask_semantics():
    pad_mask, gen_mask = _masks()
    allowed = generative_attention_mask(pad_mask, gen_mask)  # (B, L, L)
    b = 2
    known = ~pad_mask[b] & ~gen_mask[b]
    for i in range(pad_mask.shape[1]):
        expect = known.clone()
        if gen_mask[b, i]:
            expect[i] = True
        assert torch.equal(allowed[b, i], expect)


def test_plain_attention_matches_multihead_attention():
    torch.manual_seed(0)
    d, H = 32, 4
    ours = SelfAttention(d, H).eval()
    ref = nn.MultiheadAttention(d, H, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(3, 11, d)
    pad_mask, _ = _masks()
    expected, _ = ref(x, x, x, key_padding_mask=pad_mask, need_weights=False)
    torch.testing.assert_close(ours(x, pad_mask), expected, rtol=0, atol=1e-5)


def _naive_forward(self, x, pad_mask, gen_mask=None):
    """SelfAttention.forward with an explicit (B, L, L) mask: the reference for the whole model."""
    B, L, d = x.shape
    q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
    allowed = (
        (~pad_mask)[:, None, :].expand(B, L, L) if gen_mask is None else generative_attention_mask(pad_mask, gen_mask)
    )
    return self.out_proj(naive_attention(q, k, v, allowed).transpose(1, 2).reshape(B, L, d))


def test_model_generative_forward_and_gradients_equal_naive(monkeypatch):
    torch.manual_seed(0)
    model = ScGPT(vocab_size=40, pad_token_id=0, d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout=0.0).double()
    pad_mask, gen_mask = _masks()
    gene_ids = torch.randint(1, 40, pad_mask.shape).masked_fill(pad_mask, 0)
    values = torch.randint(0, 51, pad_mask.shape).double().masked_fill(pad_mask, -2.0)

    def run():
        model.zero_grad()
        out = model(gene_ids, values, pad_mask, gen_mask=gen_mask)
        (out["mlm_output"].masked_fill(pad_mask, 0).pow(2).sum() + out["mvc_output"].sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out_fast, grads_fast = run()
    monkeypatch.setattr(SelfAttention, "forward", _naive_forward)
    out_ref, grads_ref = run()
    real = ~pad_mask
    torch.testing.assert_close(out_fast["encoder_output"][real], out_ref["encoder_output"][real], rtol=0, atol=1e-10)
    torch.testing.assert_close(out_fast["cell_emb"], out_ref["cell_emb"], rtol=0, atol=1e-10)
    assert grads_fast.keys() == grads_ref.keys()
    for name in grads_fast:
        torch.testing.assert_close(grads_fast[name], grads_ref[name], rtol=0, atol=1e-9, msg=name)


def test_unknown_genes_cannot_leak():
    """Known tokens never see unknown ones; unknown tokens only see known ones and themselves."""
    torch.manual_seed(0)
    model = ScGPT(vocab_size=40, pad_token_id=0, d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout=0.0).eval()
    pad_mask, gen_mask = _masks()
    gene_ids = torch.randint(1, 40, pad_mask.shape).masked_fill(pad_mask, 0)
    values = torch.randint(0, 51, pad_mask.shape).float()
    base = model(gene_ids, values, pad_mask, gen_mask=gen_mask)
    b, i = 1, int(torch.nonzero(gen_mask[1])[0])
    changed_ids = gene_ids.clone()
    changed_ids[b, i] = (gene_ids[b, i] % 39) + 1
    changed = model(gene_ids=changed_ids, values=values, pad_mask=pad_mask, gen_mask=gen_mask)
    others = ~pad_mask[b].clone()
    others[i] = False
    torch.testing.assert_close(changed["encoder_output"][b, others], base["encoder_output"][b, others])
    torch.testing.assert_close(changed["cell_emb"], base["cell_emb"])
    assert not torch.allclose(changed["encoder_output"][b, i], base["encoder_output"][b, i])
    # the values at unknown positions are never read
    noisy = values.masked_fill(gen_mask, 999.0)
    torch.testing.assert_close(model(gene_ids, noisy, pad_mask, gen_mask=gen_mask)["mlm_output"], base["mlm_output"])


def test_generative_attention_under_bf16_autocast():
    """bf16 autocast (the kernel returns float32 lse): close to float32, finite gradients."""
    torch.manual_seed(0)
    attn = SelfAttention(32, 4)
    x = torch.randn(3, 11, 32, requires_grad=True)
    pad_mask, gen_mask = _masks()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = attn(x, pad_mask, gen_mask)
    out_bf16.float().sum().backward()
    assert out_bf16.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out_bf16.float(), attn(x, pad_mask, gen_mask), rtol=0, atol=3e-2)
