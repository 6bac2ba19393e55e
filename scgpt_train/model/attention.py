"""Multi-head self-attention on top of ``F.scaled_dot_product_attention``.

Two masks are supported without building an (L, L) mask:

* key padding: a (B, 1, 1, L) boolean key mask broadcast over heads and queries;
* the generative mask (known tokens attend to known tokens; every unknown token
  attends to the known tokens and to itself): the self term of each query is folded
  into ONE shared extra "sink" key. Each query gets one extra feature that makes its
  logit against the sink equal to its own self logit ``q_i . k_i`` (unknown queries)
  or a huge negative number (known queries); the sink's value is a one-hot channel,
  so the attention weight of the self term comes out as an extra output channel and
  is multiplied with ``v_i`` afterwards. The softmax over {known keys, self} is then
  exact, differentiable through SDPA's own backward, and costs one SDPA call over
  L + 1 keys with head dim + 8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_EXTRA_DIMS = 8  # pad the head dim by 8 (keeps kernels happy about alignment)
_NO_SELF_LOGIT = -1.0e4  # unscaled sink logit for known queries: exp() underflows to 0


def generative_sdpa(q, k, v, known_key_mask, unknown_query_mask, dropout_p: float = 0.0):
    """Attention where queries see known keys, and unknown queries also see themselves.

    q, k, v: (B, H, L, Dh); known_key_mask: (B, L) bool, True = a non-pad known token;
    unknown_query_mask: (B, L) bool, True = unknown token. Returns (B, H, L, Dh).
    """
    B, H, L, Dh = q.shape
    scale = Dh**-0.5
    self_logit = (q * k).sum(-1, keepdim=True)  # (B, H, L, 1), unscaled: SDPA applies the scale
    sink_logit = torch.where(unknown_query_mask[:, None, :, None], self_logit,
                             torch.full_like(self_logit, _NO_SELF_LOGIT))
    zeros = q.new_zeros(B, H, L, _EXTRA_DIMS - 1)
    q_ext = torch.cat([q, sink_logit, zeros], dim=-1)  # (B, H, L, Dh + 8)
    sink = q.new_zeros(B, H, 1, Dh + _EXTRA_DIMS)
    sink[..., Dh] = 1.0  # sink key == sink value == one-hot on channel Dh
    k_ext = torch.cat([torch.cat([k, zeros.new_zeros(B, H, L, _EXTRA_DIMS)], dim=-1), sink], dim=2)
    v_ext = torch.cat([torch.cat([v, zeros.new_zeros(B, H, L, _EXTRA_DIMS)], dim=-1), sink], dim=2)
    key_mask = torch.cat([known_key_mask, known_key_mask.new_ones(B, 1)], dim=1)[:, None, None, :]
    out_ext = F.scaled_dot_product_attention(q_ext, k_ext, v_ext, attn_mask=key_mask,
                                             dropout_p=dropout_p, scale=scale)  # (B, H, L, Dh + 8)
    self_weight = out_ext[..., Dh:Dh + 1]  # (B, H, L, 1) attention weight of the self term
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
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4) \
            .contiguous().unbind(0)
        p = self.dropout if self.training else 0.0
        if gen_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~pad_mask[:, None, None, :], dropout_p=p)
        else:
            out = generative_sdpa(q, k, v, ~pad_mask & ~gen_mask, gen_mask, dropout_p=p)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, d))
