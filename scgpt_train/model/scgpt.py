"""The scGPT transformer: a cell is a set of (gene, value) tokens with <cls> at position 0."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from scgpt_train.model.attention import PackedCells
from scgpt_train.model.config import ScGPTConfig
from scgpt_train.model.heads import AdversarialDiscriminator, AffineExprDecoder, ExprDecoder, MLPClassifier, MVCDecoder
from scgpt_train.model.layers import (
    CategoryValueEncoder,
    ContinuousValueEncoder,
    DomainSpecificBatchNorm,
    EncoderLayer,
    IdEmbedding,
)


class ScGPT(nn.Module):
    """scGPT encoder + heads, built from a :class:`~scgpt_train.model.config.ScGPTConfig` (Hydra-instantiable
    with its fields as keywords).

    Reads padded (B, L) batches or packed ones (one (1, T) token stream with ``cu_seqlens`` / ``token_cell``;
    ``data_modules.batch``): attention then runs per cell without a mask over the stream, and the cell-level
    outputs (cell_emb by every style, MVC, classifier, DAB, DSBN, batch labels) are computed per cell.

    Parameters
    ----------
    *args : ScGPTConfig or dict, or its fields
        One config: sizes, the token layout (``layout``: value style, n_bins, pad / mask values; the pipeline
        refuses data whose layout differs), which inputs and heads exist. See
        :class:`~scgpt_train.model.config.ScGPTConfig` for every field, including the ones beyond the official model
        (``attn_dropout``, ``decoder_style``, ``modality_style``, ``condition_pad_id``). Or the config's fields,
        positional in its field order: ``ScGPT(vocab_size, pad_token_id, d_model=...)``.
    **keywords
        ScGPTConfig fields, on top of the config (or of the positional fields).
    """

    def __init__(self, *args, **keywords):
        """``ScGPT(config, **keywords)`` with a :class:`~scgpt_train.model.config.ScGPTConfig` (or its dict), or
        ``ScGPT(vocab_size, pad_token_id, ..., **keywords)``: the config's fields, positional in its field order
        (as Hydra instantiates ``model.net``)."""
        super().__init__()
        if len(args) == 1 and isinstance(args[0], ScGPTConfig | dict):
            c = ScGPTConfig.of(args[0], **keywords)
        else:
            c = ScGPTConfig(*args, **keywords)
        self.model_config = c
        # the token layout this model reads (value style, bins, pad / mask values); the data's must agree
        self.layout = c.layout
        d_model, dropout, num_batch_labels = c.d_model, c.dropout, c.num_batch_labels
        self.d_model = d_model
        self.pad_token_id = c.pad_token_id
        self.cell_emb_style = c.cell_emb_style
        self.use_batch_labels = c.use_batch_labels
        self.modality_concat = c.n_modalities > 0 and c.modality_style == "concat"
        self.ecs_threshold = c.ecs_threshold
        self.explicit_zero_prob = c.explicit_zero_prob
        self.grad_checkpointing = c.grad_checkpointing

        # ---- inputs
        self.gene_encoder = IdEmbedding(c.vocab_size, d_model, padding_idx=c.pad_token_id)
        if self.layout.value_style == "continuous":
            self.value_encoder = ContinuousValueEncoder(d_model, dropout, c.max_value)
        elif self.layout.value_style == "category":
            self.value_encoder = CategoryValueEncoder(
                self.layout.n_categories, d_model, padding_idx=self.layout.pad_category
            )
        else:
            self.value_encoder = None
        self.flag_encoder = nn.Embedding(2, d_model) if c.use_generative else None  # row 1 = "unknown"
        self.condition_encoder = (
            nn.Embedding(c.n_conditions, d_model, padding_idx=c.condition_pad_id) if c.n_conditions > 0 else None
        )
        self.modality_encoder = IdEmbedding(c.n_modalities, d_model, c.modality_pad_id) if c.n_modalities > 0 else None
        self.batch_encoder = IdEmbedding(num_batch_labels, d_model) if c.use_batch_labels else None
        self.dsbn = DomainSpecificBatchNorm(d_model, num_batch_labels, affine=c.dsbn_affine) if c.dsbn else None

        # ---- encoder
        attn_p = dropout if c.attn_dropout is None else c.attn_dropout
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, c.n_heads, c.d_ff, dropout, attn_p, c.norm_scheme) for _ in range(c.n_layers)
        )
        self.final_norm = nn.LayerNorm(d_model) if c.norm_scheme == "pre" else None

        # ---- heads
        extra = self.modality_concat or c.use_batch_labels  # something concatenated to each token / the cell
        d_token = 2 * d_model if extra else d_model
        if c.decoder_style == "affine":
            self.expr_decoder = AffineExprDecoder(d_token, d_model)
        else:
            self.expr_decoder = ExprDecoder(d_token, d_model, c.explicit_zero_prob)
        d_gene = 2 * d_model if self.modality_concat else d_model
        self.mvc_decoder = MVCDecoder(d_gene, d_token, c.explicit_zero_prob) if c.use_mvc else None
        self.cls_decoder = MLPClassifier(d_model, c.n_cls, c.n_layers_cls) if c.n_cls > 0 else None
        self.dab_decoder = AdversarialDiscriminator(d_model, num_batch_labels, 3, c.dab_lambda) if c.do_dab else None
        self._init_weights()

    def config(self) -> dict:
        """The constructor kwargs (plain values; ``layout`` as its dict): ``ScGPTConfig.to_dict()``."""
        return self.model_config.to_dict()

    def _init_weights(self):
        nn.init.uniform_(self.gene_encoder.embedding.weight, -0.1, 0.1)  # pad row too, like the official init
        for layer in self.layers:
            nn.init.xavier_uniform_(layer.self_attn.qkv.weight)
            nn.init.zeros_(layer.self_attn.qkv.bias)
            nn.init.zeros_(layer.self_attn.out_proj.bias)

    # ------------------------------------------------------------------ pieces
    def embed(
        self,
        gene_ids,
        values,
        pad_mask,
        gen_mask=None,
        batch_labels=None,
        condition_ids=None,
        modality_ids=None,
        cell_prompt=None,
        packed: PackedCells | None = None,
    ):
        """Token input (B, L, d) and the gene embeddings (B, L, d) used by the MVC decoder.

        ``packed``: the inputs are one (1, T) stream of cells (batch_labels and cell_prompt stay per cell)."""
        gene_embs = self.gene_encoder(gene_ids)  # (B, L, d)
        if gen_mask is not None:  # unknown values are never read: make them a valid input (a category id too)
            values = values.masked_fill(gen_mask, self.layout.input_pad)
        if self.layout.value_style == "scaling":
            x = gene_embs * values.unsqueeze(-1)
        else:
            x = gene_embs + self.value_encoder(values)
        if gen_mask is not None:
            if self.flag_encoder is None:
                raise ValueError("gen_mask given but the model was built with use_generative=False")
            unknown_x = gene_embs + self.flag_encoder.weight[1]  # gene + "unknown" flag, no value
            x = torch.where(gen_mask.unsqueeze(-1), unknown_x, x)
        if self.condition_encoder is not None and condition_ids is not None:
            x = x + self.condition_encoder(condition_ids)
        if self.modality_encoder is not None and not self.modality_concat and modality_ids is not None:
            x = x + self.modality_encoder(modality_ids)
        if cell_prompt is not None:  # (B, d) replaces the <cls> input
            if packed is None:
                x = torch.cat([cell_prompt.unsqueeze(1).to(x.dtype), x[:, 1:]], dim=1)
            else:
                is_cls = torch.zeros_like(pad_mask).index_fill_(1, packed.cls_at, True)  # (1, T)
                x = torch.where(is_cls.unsqueeze(-1), cell_prompt.to(x.dtype)[packed.token_cell][None], x)
        if self.dsbn is not None:
            if batch_labels is None:
                raise ValueError("this model uses domain-specific batch norm: pass batch_labels")
            x = self.dsbn(x, batch_labels if packed is None else batch_labels[packed.token_cell][None], pad_mask)
        return x, gene_embs

    def encode(self, x, pad_mask, gen_mask=None, packed: PackedCells | None = None):
        """Run the transformer layers on the token input x (B, L, d) (packed: (1, T, d))."""
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_ckpt:
                x = checkpoint(layer, x, pad_mask, gen_mask, packed, use_reentrant=False)
            else:
                x = layer(x, pad_mask, gen_mask, packed)
        return self.final_norm(x) if self.final_norm is not None else x

    def cell_embedding(self, h, values, pad_mask, gen_mask=None, packed: PackedCells | None = None):
        """(B, L, d) -> (B, d) by cell_emb_style. Pools ignore pads (and unknown tokens).

        Packed: h (1, T, d) -> (B, d), each cell pooled over its own tokens."""
        if self.cell_emb_style == "cls":
            return h[:, 0] if packed is None else h[0, packed.cls_at]
        keep = ~pad_mask if gen_mask is None else ~pad_mask & ~gen_mask  # (B, L)
        if self.cell_emb_style == "avg-pool":
            w = keep.to(h.dtype)
            if packed is not None:
                total = _per_cell_sum(h[0] * w[0, :, None], packed)  # (B, d)
                return total / _per_cell_sum(w[0, :, None], packed).clamp(min=1)
            return (h * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
        w = torch.where(keep, values.clamp(min=0), torch.zeros_like(values)).to(h.dtype)  # w-pool: value weights
        if packed is not None:
            return F.normalize(_per_cell_sum(h[0] * w[0, :, None], packed), p=2, dim=1)
        return F.normalize((h * w.unsqueeze(-1)).sum(1), p=2, dim=1)

    def attention_qk(
        self, gene_ids, values, pad_mask, *, layer: int = -1, batch_labels=None, condition_ids=None, modality_ids=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k (B, H, L, Dh) of encoder layer ``layer``'s self-attention (default the last) for a padded
        batch (no generative split): the inputs are embedded and run through the layers before it only, so no
        attention map of any layer is formed here. Attention logits of that layer are q k^T * Dh^-0.5."""
        n = len(self.layers)
        if not -n <= layer < n:
            raise ValueError(f"layer {layer} out of range for a model of {n} layers")
        x, _ = self.embed(gene_ids, values, pad_mask, None, batch_labels, condition_ids, modality_ids)
        for block in self.layers[: layer % n]:
            x = block(x, pad_mask)
        return self.layers[layer % n].attention_qk(x)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        gene_ids,
        values,
        pad_mask,
        *,
        gen_mask=None,
        batch_labels=None,
        condition_ids=None,
        modality_ids=None,
        cell_prompt=None,
        cu_seqlens=None,
        token_cell=None,
        max_seqlen=None,
    ) -> dict[str, torch.Tensor]:
        """gene_ids (B, L) int64, values (B, L) float, pad_mask (B, L) True = pad,
        gen_mask (B, L) True = unknown gene (generative attention). Returns a dict of outputs.

        Packed batches (``Batch.model_inputs()`` adds these): the token inputs are (1, T), ``cu_seqlens`` (B+1,)
        int32, ``token_cell`` (1, T) int64, ``max_seqlen`` int; per-token outputs are then (1, T), per-cell
        outputs (B, ...)."""
        if self.use_batch_labels and batch_labels is None:
            raise ValueError("this model uses batch labels: pass batch_labels (B,) int64")
        packed = None
        if cu_seqlens is not None:
            if token_cell is None or gene_ids.shape[0] != 1:
                raise ValueError("a packed batch is one (1, T) token stream with cu_seqlens and token_cell")
            packed = PackedCells(cu_seqlens, token_cell, max_seqlen)
        if gen_mask is not None:
            gen_mask = gen_mask & ~pad_mask
        x, gene_embs = self.embed(
            gene_ids, values, pad_mask, gen_mask, batch_labels, condition_ids, modality_ids, cell_prompt, packed
        )
        h = self.encode(x, pad_mask, gen_mask, packed)  # (B, L, d)
        out: dict[str, torch.Tensor] = {"encoder_output": h}

        token_extra = cell_extra = None  # what the official models concatenate before the decoders
        if self.use_batch_labels:
            batch_emb = self.batch_encoder(batch_labels)  # (B, d)
            token_extra = batch_emb.unsqueeze(1).expand_as(h) if packed is None else batch_emb[packed.token_cell][None]
            cell_extra = batch_emb
        if self.modality_concat:
            if modality_ids is None:
                raise ValueError("modality_style='concat' needs modality_ids")
            mod_emb = self.modality_encoder(modality_ids)  # (B, L, d)
            mod_cls = mod_emb[:, 0] if packed is None else mod_emb[0, packed.cls_at]  # (B, d) at each <cls>
            token_extra = mod_emb if token_extra is None else token_extra + mod_emb
            cell_extra = mod_cls if cell_extra is None else cell_extra + mod_cls
            gene_embs = torch.cat([gene_embs, token_extra], dim=-1)
        h_dec = h if token_extra is None else torch.cat([h, token_extra], dim=-1)

        if isinstance(self.expr_decoder, AffineExprDecoder):
            expr = self.expr_decoder(h_dec, values)
            out["coeff"], out["bias"] = expr["coeff"], expr["bias"]
        else:
            expr = self.expr_decoder(h_dec)
        out["mlm_output"] = expr["pred"]
        if "zero_probs" in expr:
            out["mlm_zero_probs"] = expr["zero_probs"]

        cell_emb = self.cell_embedding(h, values, pad_mask, gen_mask, packed)
        out["cell_emb"] = cell_emb
        if self.mvc_decoder is not None:
            mvc = self.mvc_decoder(
                cell_emb if cell_extra is None else torch.cat([cell_emb, cell_extra], dim=1),
                gene_embs,
                None if packed is None else packed.token_cell,
            )
            out["mvc_output"] = mvc["pred"]
            if "zero_probs" in mvc:
                out["mvc_zero_probs"] = mvc["zero_probs"]
        if self.cls_decoder is not None:
            out["cls_output"] = self.cls_decoder(cell_emb)
        if self.dab_decoder is not None:
            out["dab_output"] = self.dab_decoder(cell_emb)
        return out


def _per_cell_sum(x: torch.Tensor, packed: PackedCells) -> torch.Tensor:
    """(T, d) per-token rows -> (B, d) sums over each cell's tokens of a packed stream."""
    return x.new_zeros(packed.n_cells, x.shape[-1]).index_add(0, packed.token_cell, x)
