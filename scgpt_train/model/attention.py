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

Packed batches (one (1, T) token stream, ``cu_seqlens``; ``PackedCells``) attend per cell, never through a
T x T or L x L mask:

* CPU (and any fallback): cells are grouped into length buckets (``bucket_ratio``: a cell joins a bucket when
  its length is at least that fraction of the bucket's longest); each bucket is gathered into a padded
  (n, H, L_b, Dh) block and runs the padded kernels above (SDPA with a key mask, generative flash + lse), and
  the outputs are put back in stream order. Everything outside attention runs on the T real tokens only.
* CUDA, bf16 / fp16, no attention dropout: ``torch.nn.attention.varlen.varlen_attn`` (flash, varlen) over the
  stream. Generative attention there uses the sink idea per cell with two extra channels: channel Dh carries
  the query's self logit against one sink key appended to each cell (its value is one-hot on channel Dh, so
  the output's channel Dh is the self weight), channel Dh + 1 is a per-key bias (0 for known keys, a large
  negative number for unknown ones) so unknown keys get no weight: no mask, no gather, no data-dependent
  shape, autograd through the kernel's own backward.

``reference_attention_mask`` + ``naive_attention`` is the one explicit-mask reference (padded (B, L, L) or
packed (1, T, T)) that every path is tested against; ``use_reference_attention(model)`` switches a model to it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_EXTRA_DIMS = 8  # sink fallback: pad the head dim by 8 (keeps kernels happy about alignment)
_NO_SELF_LOGIT = -1.0e4  # sink fallback: unscaled sink logit for known queries, exp() underflows to 0
_HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
_KEY_OFF = -1.0e4  # varlen generative: scaled logit added to unknown keys (exp() underflows to 0)
BUCKET_RATIO = 0.75  # packed CPU path: a cell joins a length bucket when >= this fraction of its longest cell

try:  # the varlen flash kernel (CUDA); torch 2.13 ships it as torch.nn.attention.varlen
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch
    _varlen_attn = None


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
    return reference_attention_mask(pad_mask, gen_mask)


def reference_attention_mask(
    pad_mask: torch.Tensor, gen_mask: torch.Tensor | None = None, token_cell: torch.Tensor | None = None
) -> torch.Tensor:
    """The explicit (B, L, L) boolean mask (True = may attend) of any attention the model runs; reference only.

    pad_mask, gen_mask (None: plain attention), token_cell (packed (1, T) layout: a query sees only its own cell's
    keys; None: padded rows, one cell each). Keys: non-pad, known tokens; an unknown query also sees itself.
    """
    keys = ~pad_mask if gen_mask is None else ~pad_mask & ~gen_mask  # (B, L)
    B, L = pad_mask.shape
    allowed = keys[:, None, :].expand(B, L, L)
    if gen_mask is not None:
        eye = torch.eye(L, dtype=torch.bool, device=pad_mask.device)
        allowed = allowed | (eye[None] & gen_mask[:, :, None])  # unknown query i -> key i
    if token_cell is not None:
        allowed = allowed & (token_cell[:, :, None] == token_cell[:, None, :])  # block diagonal: own cell only
    return allowed


def naive_attention(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """Reference attention with an explicit (B, L, L) boolean mask; q, k, v: (B, H, L, Dh)."""
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, L, L)
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


# ------------------------------------------------------------------------------------------
# packed batches: one (1, T) token stream, cells at cu_seqlens
# ------------------------------------------------------------------------------------------
class PackedCells:
    """Where the cells of a packed (1, T) token stream sit; built once per forward and shared by every layer.

    cu_seqlens (B+1,) int (cell c = tokens [cu_seqlens[c], cu_seqlens[c+1])); token_cell (T,) or (1, T) int64;
    max_seqlen: the longest cell (a host int the loader knows; None = read from cu_seqlens, a device sync).
    """

    def __init__(self, cu_seqlens: torch.Tensor, token_cell: torch.Tensor, max_seqlen: int | None = None):
        self.cu_seqlens = cu_seqlens.to(torch.int32)  # (B+1,)
        self.token_cell = token_cell.reshape(-1)  # (T,) int64
        self.n_cells = int(cu_seqlens.shape[0]) - 1
        if max_seqlen is None:
            max_seqlen = int(torch.diff(self.cu_seqlens).max()) if self.n_cells else 1
        self.max_seqlen = int(max_seqlen)
        self.cls_at = self.cu_seqlens[:-1].long()  # (B,) stream position of each cell's <cls>
        self._buckets: dict = {}

    @property
    def n_tokens(self) -> int:
        return int(self.token_cell.shape[0])

    def buckets(self, ratio: float = BUCKET_RATIO) -> tuple[list, torch.Tensor]:
        """Length buckets of the cells (computed once per ratio, on the host).

        Returns ``[(index (n, L_b) int64 stream positions (padding slots repeat the cell's <cls>), valid (n, L_b)
        bool, padded: bool), ...]`` and ``source`` (T,) int64: for every stream token, its row in the concatenation
        of the buckets' (n * L_b) slots, padding included.
        """
        if ratio not in self._buckets:
            cu = self.cu_seqlens.cpu().numpy().astype(np.int64)
            lengths = np.diff(cu)
            by_length = np.argsort(-lengths, kind="stable")  # longest first
            groups, start = [], 0
            for i in range(1, len(by_length) + 1):
                if i == len(by_length) or lengths[by_length[i]] < ratio * lengths[by_length[start]]:
                    groups.append(np.sort(by_length[start:i]))
                    start = i
            device = self.token_cell.device
            buckets, source, first_slot = [], np.zeros(int(cu[-1]), np.int64), 0
            for cells in groups:
                L_b = int(lengths[cells].max())
                offset = np.arange(L_b)[None, :]
                valid = offset < lengths[cells][:, None]  # (n, L_b)
                index = cu[cells][:, None] + np.where(valid, offset, 0)  # pads -> the cell's <cls>
                buckets.append(
                    (torch.from_numpy(index).to(device), torch.from_numpy(valid).to(device), not bool(valid.all()))
                )
                source[index[valid]] = first_slot + np.flatnonzero(valid)  # row-major: the same order as index[valid]
                first_slot += valid.size
            self._buckets[ratio] = (buckets, torch.from_numpy(source).to(device))
        return self._buckets[ratio]


def packed_attention_buckets(qkv, packed: PackedCells, gen_mask=None, dropout_p: float = 0.0, ratio=None):
    """Per-cell attention over a packed stream by length buckets (any device, dropout allowed).

    qkv: (T, 3, H, Dh) (q; k; v of each token); gen_mask: (T,) bool True = unknown token, or None (plain
    attention). Returns (T, H, Dh). Tokens move as whole rows: one row gather of qkv and one permuting copy into
    each bucket's (3, n, H, L_b, Dh) block (the padded path's layout), one row gather of the outputs back into
    stream order.
    """
    T, _, H, Dh = qkv.shape
    buckets, source = packed.buckets(BUCKET_RATIO if ratio is None else ratio)
    rows = qkv.reshape(T, 3 * H * Dh)  # (T, 3d)
    whole_stream = len(buckets) == 1 and not buckets[0][2]  # every cell equally long: the slots are the stream
    outs = []
    for index, valid, padded in buckets:
        n, L_b = index.shape
        block = rows if whole_stream else rows.index_select(0, index.reshape(-1))  # (n L_b, 3d)
        qb, kb, vb = block.view(n, L_b, 3, H, Dh).permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # (n, H, L_b, Dh)
        if gen_mask is None:
            mask = valid[:, None, None, :] if padded else None
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p)
        else:
            unknown = gen_mask[index] & valid  # (n, L_b)
            ob = generative_sdpa(qb, kb, vb, valid & ~unknown, unknown, dropout_p)
        outs.append(ob.transpose(1, 2).reshape(n * L_b, H, Dh))  # the bucket's slots, padding included
    return outs[0] if whole_stream else torch.cat(outs).index_select(0, source)  # (T, H, Dh)


def _cuda_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    return _varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale)


def packed_attention_varlen(qkv, packed: PackedCells, gen_mask=None, kernel=None):
    """Per-cell attention over a packed stream with a varlen kernel (default: the CUDA flash varlen kernel).

    qkv: (T, 3, H, Dh); gen_mask (T,) bool or None. ``kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale)`` is
    swappable so the stream arithmetic is tested on CPU against the reference. Returns (T, H, Dh).
    """
    kernel = _cuda_varlen_kernel if kernel is None else kernel
    T, _, H, Dh = qkv.shape
    scale = Dh**-0.5
    cu, max_len = packed.cu_seqlens, packed.max_seqlen
    q, k, v = (t.contiguous() for t in qkv.unbind(1))
    if gen_mask is None:
        return kernel(q, k, v, cu, cu, max_len, max_len, scale)
    # generative: per cell, keys = its tokens + one sink; two extra channels (module doc), padded to Dh + 8
    unknown = gen_mask[:, None, None]  # (T, 1, 1)
    self_logit = (q * k).sum(-1, keepdim=True)  # (T, H, 1) unscaled: the kernel applies the scale
    q_sink = torch.where(unknown, self_logit, torch.full_like(self_logit, _NO_SELF_LOGIT))
    ones = torch.ones_like(self_logit)
    zeros = q.new_zeros(T, H, _EXTRA_DIMS - 2)
    q_ext = torch.cat([q, q_sink, ones, zeros], dim=-1)  # (T, H, Dh + 8)
    key_bias = torch.where(unknown, torch.full_like(self_logit, _KEY_OFF / scale), torch.zeros_like(self_logit))
    k_tok = torch.cat([k, torch.zeros_like(self_logit), key_bias, zeros], dim=-1)  # (T, H, Dh + 8)
    v_tok = torch.cat([v, q.new_zeros(T, H, _EXTRA_DIMS)], dim=-1)
    B = packed.n_cells
    sink = q.new_zeros(B, H, Dh + _EXTRA_DIMS)
    sink[..., Dh] = 1.0  # sink key == sink value == one-hot on channel Dh
    token_at = torch.arange(T, device=q.device) + packed.token_cell  # (T,) slot of each token: cell c shifts by c
    sink_at = packed.cu_seqlens[1:].long() + torch.arange(B, device=q.device)  # (B,) after each cell's tokens
    slots = torch.cat([token_at, sink_at])  # (T + B,)
    k_ext = q.new_zeros(T + B, H, Dh + _EXTRA_DIMS).index_copy(0, slots, torch.cat([k_tok, sink]))
    v_ext = q.new_zeros(T + B, H, Dh + _EXTRA_DIMS).index_copy(0, slots, torch.cat([v_tok, sink]))
    cu_k = cu + torch.arange(B + 1, device=cu.device, dtype=cu.dtype)  # (B+1,) one more key per cell
    out = kernel(q_ext, k_ext, v_ext, cu, cu_k, max_len, max_len + 1, scale)  # (T, H, Dh + 8)
    return out[..., :Dh] + out[..., Dh : Dh + 1] * v


def packed_attention(qkv, packed: PackedCells, gen_mask=None, dropout_p: float = 0.0):
    """Per-cell attention over a packed stream (qkv (T, 3, H, Dh) -> (T, H, Dh)): the CUDA varlen kernel where it
    applies, else length buckets."""
    varlen_ok = (
        _varlen_attn is not None
        and qkv.is_cuda
        and qkv.dtype in (torch.float16, torch.bfloat16)
        and dropout_p == 0.0
        and qkv.shape[-1] % 8 == 0
        and qkv.shape[-1] + _EXTRA_DIMS <= 256
    )
    if varlen_ok:
        return packed_attention_varlen(qkv, packed, gen_mask)
    return packed_attention_buckets(qkv, packed, gen_mask, dropout_p)


class SelfAttention(nn.Module):
    """Fused-QKV multi-head self-attention (rows of ``qkv`` are q; k; v like PyTorch's in_proj).

    ``reference = True`` (``use_reference_attention``) runs the explicit-mask reference instead of the fast paths.
    """

    reference = False

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x, pad_mask, gen_mask=None, packed: PackedCells | None = None):
        """x: (B, L, d); pad_mask (B, L) True = pad; gen_mask (B, L) True = unknown token or None.

        ``packed``: x is a packed (1, T, d) stream whose cells ``packed`` describes (pad_mask / gen_mask (1, T)).
        """
        B, L, d = x.shape
        p = self.dropout if self.training else 0.0
        if self.reference:
            return self._reference(x, pad_mask, gen_mask, packed)
        if packed is not None:
            if B != 1:
                raise ValueError(f"a packed batch is one (1, T) stream, got x of shape {tuple(x.shape)}")
            qkv = self.qkv(x).view(L, 3, self.n_heads, d // self.n_heads)  # (T, 3, H, Dh)
            out = packed_attention(qkv, packed, None if gen_mask is None else gen_mask[0], p)
            return self.out_proj(out.reshape(1, L, d))
        # one copy into (3, B, H, L, Dh): SDPA's CPU math kernel is many times slower on strided q/k/v
        q, k, v = (
            self.qkv(x).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        )
        if gen_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~pad_mask[:, None, None, :], dropout_p=p)
        else:
            out = generative_sdpa(q, k, v, ~pad_mask & ~gen_mask, gen_mask, dropout_p=p)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, d))

    def project_qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k (B, H, L, Dh) of the padded input x (B, L, d): what the attention logits are made of
        (logits = q k^T * Dh^-0.5). For reading attention scores (attention GRNs) without running attention."""
        B, L, d = x.shape
        q, k, _ = self.qkv(x).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k

    def _reference(self, x, pad_mask, gen_mask, packed):
        """The explicit-mask reference (no attention dropout): naive softmax over ``reference_attention_mask``."""
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4).unbind(0)
        allowed = reference_attention_mask(pad_mask, gen_mask, None if packed is None else packed.token_cell[None])
        return self.out_proj(naive_attention(q, k, v, allowed).transpose(1, 2).reshape(B, L, d))


def use_reference_attention(model: nn.Module, on: bool = True) -> nn.Module:
    """Switch every SelfAttention of ``model`` to the explicit-mask reference (``on``) or back to the fast paths."""
    for module in model.modules():
        if isinstance(module, SelfAttention):
            module.reference = bool(on)
    return model
