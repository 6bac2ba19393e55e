"""Multi-head self-attention on top of ``F.scaled_dot_product_attention``.

Two masks are supported without building an (L, L) mask:

* key padding: a (B, 1, 1, L) boolean key mask broadcast over heads and queries;
* the generative mask (known tokens attend to known tokens; every unknown token
  attends to the known tokens and to itself).

Generative attention, fast path (CPU, no attention dropout): the known keys of each cell
are gathered to the front (cells are gene sets, order is irrelevant), every query attends to
these Lk <= L keys with the fused flash kernel, which also returns the log-sum-exp ``lse``
of each query's logits. An unknown query's self term is merged analytically:
``lse' = logaddexp(lse, s_ii)``, self weight ``w_i = exp(s_ii - lse')``,
``out_i = (1 - w_i) out_known_i + w_i v_i``. The backward pass calls the flash kernel's own
backward with the merged output and ``lse'`` (that gives the exact gradient of the known-key
part of the softmax over {known keys, self}) and adds the O(L Dh) self-term gradient.

Fallback (attention dropout > 0 or another device): the self term of each query is folded
into ONE shared extra "sink" key whose logit equals the query's self logit, so one SDPA call
over L + 1 keys gives the exact softmax over {known keys, self}, dropout included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_EXTRA_DIMS = 8  # sink fallback: pad the head dim by 8 (keeps kernels happy about alignment)
_NO_SELF_LOGIT = -1.0e4  # sink fallback: unscaled sink logit for known queries, exp() underflows to 0
_HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def known_key_layout(known_key_mask: torch.Tensor):
    """Known positions of each cell moved to the front.

    known_key_mask: (B, L) bool. Returns ``key_idx`` (B, Lk) int64, the positions of the known
    tokens first (Lk = the largest known count in the batch; the tail of shorter cells points at
    other tokens), and ``key_valid`` (B, Lk) bool, True where ``key_idx`` is a known token.
    """
    counts = known_key_mask.sum(1)  # (B,)
    n_keys = max(int(counts.max()), 1)
    order = torch.argsort((~known_key_mask).to(torch.int8), dim=1, stable=True)  # known first
    key_idx = order[:, :n_keys]  # (B, Lk)
    key_valid = torch.arange(n_keys, device=counts.device)[None] < counts[:, None]  # (B, Lk)
    return key_idx, key_valid


class _GenerativeFlashCPU(torch.autograd.Function):
    """Flash attention of all queries over the gathered known keys + analytic self term (see module doc)."""

    @staticmethod
    def forward(ctx, q, k, v, key_idx, key_bias, unknown_query_mask, scale):
        B, H, L, Dh = q.shape
        gather_idx = key_idx[:, None, :, None].expand(B, H, key_idx.shape[1], Dh)  # (B, H, Lk, Dh)
        k_known, v_known = k.gather(2, gather_idx), v.gather(2, gather_idx)
        out_known, lse_known = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k_known, v_known, 0.0, False, attn_mask=key_bias, scale=scale
        )  # (B, H, L, Dh), (B, H, L)
        # a query whose keys are all masked gets lse 0 from the kernel; make it "no mass" instead
        no_keys = torch.isinf(key_bias).all(-1)  # (B, 1, 1)
        lse_known = lse_known.masked_fill(no_keys, torch.finfo(q.dtype).min / 4)
        # lse comes in the kernel's accumulation dtype (float32 for bf16 inputs): merge in that dtype
        self_logit = ((q * k).sum(-1, dtype=lse_known.dtype) * scale).masked_fill(
            ~unknown_query_mask[:, None, :], float("-inf")
        )  # (B, H, L)
        lse = torch.empty_like(lse_known)  # keeps the kernel's (B, L, H) memory layout for its backward
        torch.logaddexp(lse_known, self_logit, out=lse)  # (B, H, L)
        self_weight = torch.exp(self_logit - lse).unsqueeze(-1).to(q.dtype)  # (B, H, L, 1), 0 for known queries
        out = torch.lerp(out_known, v, self_weight)  # (1 - w) out_known + w v
        ctx.save_for_backward(q, k_known, v_known, k, v, gather_idx, key_bias, out, lse, self_weight)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k_known, v_known, k, v, gather_idx, key_bias, out, lse, self_weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        # known-key part: the kernel recomputes P = exp(s - lse) with the MERGED lse and uses D = rowsum(dO * out)
        dq, dk_known, dv_known = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k_known, v_known, out, lse, 0.0, False, attn_mask=key_bias, scale=ctx.scale
        )
        # self term: P_ii = w_i, dS_ii = w_i (dO_i . v_i - dO_i . out_i)
        d_self = self_weight * (grad_out * (v - out)).sum(-1, keepdim=True)  # (B, H, L, 1)
        dq = dq + ctx.scale * d_self * k
        dk = (ctx.scale * d_self * q).scatter_add_(2, gather_idx, dk_known)
        dv = (self_weight * grad_out).scatter_add_(2, gather_idx, dv_known)
        return dq, dk, dv, None, None, None, None


def generative_sdpa(q, k, v, known_key_mask, unknown_query_mask, dropout_p: float = 0.0):
    """Attention where queries see known keys, and unknown queries also see themselves.

    q, k, v: (B, H, L, Dh); known_key_mask: (B, L) bool, True = a non-pad known token;
    unknown_query_mask: (B, L) bool, True = unknown token. Returns (B, H, L, Dh).
    ``dropout_p`` drops attention probabilities over {known keys, self} (sink fallback).
    """
    if dropout_p == 0.0 and q.device.type == "cpu" and _HAS_CPU_FLASH:
        key_idx, key_valid = known_key_layout(known_key_mask)
        key_bias = torch.zeros(key_valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~key_valid, float("-inf"))[
            :, None, None, :
        ]  # (B, 1, 1, Lk) additive
        return _GenerativeFlashCPU.apply(
            q.contiguous(), k.contiguous(), v.contiguous(), key_idx, key_bias, unknown_query_mask, q.shape[-1] ** -0.5
        )
    return generative_sdpa_sink(q, k, v, known_key_mask, unknown_query_mask, dropout_p)


def generative_sdpa_sink(q, k, v, known_key_mask, unknown_query_mask, dropout_p: float = 0.0):
    """Generative attention as ONE SDPA call over L + 1 keys (the shared self "sink" key); any device, dropout."""
    B, H, L, Dh = q.shape
    scale = Dh**-0.5
    self_logit = (q * k).sum(-1, keepdim=True)  # (B, H, L, 1), unscaled: SDPA applies the scale
    sink_logit = torch.where(
        unknown_query_mask[:, None, :, None], self_logit, torch.full_like(self_logit, _NO_SELF_LOGIT)
    )
    zeros = q.new_zeros(B, H, L, _EXTRA_DIMS - 1)
    q_ext = torch.cat([q, sink_logit, zeros], dim=-1)  # (B, H, L, Dh + 8)
    sink = q.new_zeros(B, H, 1, Dh + _EXTRA_DIMS)
    sink[..., Dh] = 1.0  # sink key == sink value == one-hot on channel Dh
    k_ext = torch.cat([torch.cat([k, zeros.new_zeros(B, H, L, _EXTRA_DIMS)], dim=-1), sink], dim=2)
    v_ext = torch.cat([torch.cat([v, zeros.new_zeros(B, H, L, _EXTRA_DIMS)], dim=-1), sink], dim=2)
    key_mask = torch.cat([known_key_mask, known_key_mask.new_ones(B, 1)], dim=1)[:, None, None, :]
    out_ext = F.scaled_dot_product_attention(
        q_ext, k_ext, v_ext, attn_mask=key_mask, dropout_p=dropout_p, scale=scale
    )  # (B, H, L, Dh + 8)
    self_weight = out_ext[..., Dh : Dh + 1]  # (B, H, L, 1) attention weight of the self term
    return out_ext[..., :Dh] + self_weight * v


def generative_attention_mask(pad_mask: torch.Tensor, gen_mask: torch.Tensor) -> torch.Tensor:
    """The full (B, L, L) boolean mask (True = may attend) of generative attention; reference only."""
    known_keys = ~pad_mask & ~gen_mask  # (B, L)
    L = pad_mask.shape[1]
    eye = torch.eye(L, dtype=torch.bool, device=pad_mask.device)
    self_allowed = eye[None] & gen_mask[:, :, None]  # (B, L, L): unknown query i -> key i
    return known_keys[:, None, :] | self_allowed


def naive_attention(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """Reference attention with an explicit (B, L, L) boolean mask; q, k, v: (B, H, L, Dh)."""
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, L, L)
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


class SelfAttention(nn.Module):
    """Fused-QKV multi-head self-attention (rows of ``qkv`` are q; k; v like PyTorch's in_proj)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x, pad_mask, gen_mask=None):
        """x: (B, L, d); pad_mask (B, L) True = pad; gen_mask (B, L) True = unknown token or None."""
        B, L, d = x.shape
        # one copy into (3, B, H, L, Dh): SDPA's CPU math kernel is many times slower on strided q/k/v
        q, k, v = (
            self.qkv(x).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        )
        p = self.dropout if self.training else 0.0
        if gen_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~pad_mask[:, None, None, :], dropout_p=p)
        else:
            out = generative_sdpa(q, k, v, ~pad_mask & ~gen_mask, gen_mask, dropout_p=p)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, d))
