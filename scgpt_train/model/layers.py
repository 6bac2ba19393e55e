"""Input encoders, the transformer block and domain-specific batch norm."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from scgpt_train.model.attention import PackedCells, SelfAttention


class IdEmbedding(nn.Module):
    """Embedding of integer ids -> LayerNorm: gene tokens, batch labels and modalities alike."""

    def __init__(self, vocab_size: int, d_model: int, padding_idx: int | None = None):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, ids):  # (B, L) or (B,) -> (B, L, d) or (B, d)
        return self.norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    """value -> clamp(max) -> Linear(1, d) -> ReLU -> Linear(d, d) -> LayerNorm -> Dropout."""

    def __init__(self, d_model: int, dropout: float, max_value: float = 512.0):
        super().__init__()
        self.max_value = max_value
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, values):  # (B, L) -> (B, L, d)
        x = values.unsqueeze(-1).clamp(max=self.max_value)
        return self.dropout(self.norm(self.linear2(F.relu(self.linear1(x)))))


class CategoryValueEncoder(nn.Module):
    """Integer bin -> Embedding(n_bins + 2) -> LayerNorm (bin n_bins = pad, n_bins + 1 = mask)."""

    def __init__(self, n_categories: int, d_model: int, padding_idx: int | None):
        super().__init__()
        self.embedding = nn.Embedding(n_categories, d_model, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, values):  # (B, L) -> (B, L, d)
        return self.norm(self.embedding(values.long()))


class DomainSpecificBatchNorm(nn.Module):
    """One BatchNorm1d per domain, each cell normalised with ITS domain's statistics.

    Training statistics are taken over the non-pad tokens of the cells of that domain
    (the official code normalises a whole minibatch with its first cell's domain).
    """

    def __init__(self, d_model: int, n_domains: int, eps: float = 6.1e-5, momentum: float = 0.1, affine: bool = False):
        super().__init__()
        self.bns = nn.ModuleList(
            nn.BatchNorm1d(d_model, eps=eps, momentum=momentum, affine=affine) for _ in range(n_domains)
        )

    def forward(self, x, domain_ids, pad_mask):
        """x: (B, L, d); domain_ids: (B,) int64 per cell, or (B, L) per token (packed batches: the domain of each
        token's cell); pad_mask (B, L). Pads are left as they are."""
        out = x
        token_domain = domain_ids[:, None] if domain_ids.dim() == 1 else domain_ids  # (B, 1) or (B, L)
        for k, bn in enumerate(self.bns):  # loop over domains, not cells
            token_sel = (token_domain == k) & ~pad_mask  # (B, L)
            if not bool(token_sel.any()):
                continue
            tokens = x[token_sel]  # (N_k, d)
            if self.training and tokens.shape[0] < 2:
                normed = F.batch_norm(tokens, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            else:
                normed = bn(tokens)
            out = out.masked_scatter(token_sel[..., None], normed)
        return out


class EncoderLayer(nn.Module):
    """Transformer block: SDPA self-attention + ReLU FFN; post-norm (official) or pre-norm."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        attn_dropout: float,
        norm_scheme: str = "post",
        eps: float = 1e-5,
    ):
        super().__init__()
        if norm_scheme not in ("post", "pre"):
            raise ValueError(f"norm_scheme must be 'post' or 'pre', got {norm_scheme!r}")
        self.pre_norm = norm_scheme == "pre"
        self.self_attn = SelfAttention(d_model, n_heads, attn_dropout)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)  # inside the FFN
        self.dropout1 = nn.Dropout(dropout)  # on the attention branch
        self.dropout2 = nn.Dropout(dropout)  # on the FFN branch

    def _ff(self, x):
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def _attn(self, x, pad_mask, gen_mask, packed):
        if packed is None:  # the padded call keeps its three-argument form
            return self.self_attn(x, pad_mask, gen_mask)
        return self.self_attn(x, pad_mask, gen_mask, packed=packed)

    def attention_qk(self, x):
        """q, k (B, H, L, Dh) this layer's self-attention computes from its input x (B, L, d) (pre-norm: of
        norm1(x))."""
        return self.self_attn.project_qk(self.norm1(x) if self.pre_norm else x)

    def forward(self, x, pad_mask, gen_mask=None, packed: PackedCells | None = None):  # x: (B, L, d) or (1, T, d)
        if self.pre_norm:
            x = x + self.dropout1(self._attn(self.norm1(x), pad_mask, gen_mask, packed))
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self.dropout1(self._attn(x, pad_mask, gen_mask, packed)))
        return self.norm2(x + self._ff(x))
