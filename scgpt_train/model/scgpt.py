"""The scGPT transformer: a cell is a set of (gene, value) tokens with <cls> at position 0."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from data_modules.tokenize.layout import TokenLayout
from scgpt_train.model.attention import PackedCells
from scgpt_train.model.heads import AdversarialDiscriminator, AffineExprDecoder, ExprDecoder, MLPClassifier, MVCDecoder
from scgpt_train.model.layers import (
    CategoryValueEncoder,
    ContinuousValueEncoder,
    DomainSpecificBatchNorm,
    EncoderLayer,
    IdEmbedding,
)

CELL_EMB_STYLES = ("cls", "avg-pool", "w-pool")


class ScGPT(nn.Module):
    """scGPT encoder + heads. All constructor arguments are plain values (Hydra-instantiable).

    Reads padded (B, L) batches or packed ones (one (1, T) token stream with ``cu_seqlens`` / ``token_cell``;
    ``data_modules.batch``): attention then runs per cell without a mask over the stream, and the cell-level
    outputs (cell_emb by every style, MVC, classifier, DAB, DSBN, batch labels) are computed per cell.

    ``layout``: the token layout the model reads (``data_modules.tokenize.layout.TokenLayout`` or its dict:
    value style, n_bins, pad / mask values); the pipeline refuses data whose layout differs.

    Extra arguments beyond the official ones:
      attn_dropout: dropout on attention probabilities. Default 0.0 keeps SDPA on its fused kernels (on CPU
        any attention dropout forces the math kernel: ~2.4x slower step, ~3.4x more activation memory);
        None = ``dropout``, exactly the official model's attention dropout.
      decoder_style: "mlp" (official) or "affine" (perturbation: coeff(h) * value + bias(h)).
      modality_style: "encoder" (modality embedding added to the token input) or "concat"
        (official multi-omic model: modality + batch embedding concatenated before the decoders).
      condition_pad_id: padding row of the condition (perturbation flag) embedding.
    """

    def __init__(
        self,
        vocab_size: int,
        pad_token_id: int,
        d_model: int = 512,
        n_heads: int = 8,
        d_ff: int = 512,
        n_layers: int = 12,
        dropout: float = 0.2,
        layout: TokenLayout | dict | None = None,
        cell_emb_style: str = "cls",
        norm_scheme: str = "post",
        use_generative: bool = True,
        use_mvc: bool = True,
        explicit_zero_prob: bool = False,
        n_cls: int = 0,
        n_layers_cls: int = 3,
        num_batch_labels: int = 0,
        use_batch_labels: bool = False,
        dsbn: bool = False,
        do_dab: bool = False,
        ecs_threshold: float = 0.8,
        n_conditions: int = 0,
        n_modalities: int = 0,
        grad_checkpointing: bool = False,
        attn_dropout: float | None = 0.0,
        max_value: float = 512.0,
        decoder_style: str = "mlp",
        modality_style: str = "encoder",
        condition_pad_id: int | None = 0,
        modality_pad_id: int | None = None,
        dab_lambda: float = 1.0,
        dsbn_affine: bool = False,
    ):
        super().__init__()
        # the token layout this model reads (value style, bins, pad / mask values); the data's must agree
        self.layout = TokenLayout.from_any(layout)
        self._config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self._config["layout"] = self.layout.to_dict()
        if cell_emb_style not in CELL_EMB_STYLES:
            raise ValueError(f"cell_emb_style must be one of {CELL_EMB_STYLES}, got {cell_emb_style!r}")
        if decoder_style not in ("mlp", "affine"):
            raise ValueError(f"decoder_style must be 'mlp' or 'affine', got {decoder_style!r}")
        if modality_style not in ("encoder", "concat"):
            raise ValueError(f"modality_style must be 'encoder' or 'concat', got {modality_style!r}")
        if (use_batch_labels or dsbn or do_dab) and num_batch_labels < 1:
            raise ValueError("use_batch_labels / dsbn / do_dab need num_batch_labels >= 1")
        if decoder_style == "affine" and explicit_zero_prob:
            raise ValueError("decoder_style='affine' does not support explicit_zero_prob")
        self.d_model = d_model
        self.pad_token_id = pad_token_id
        self.cell_emb_style = cell_emb_style
        self.use_batch_labels = use_batch_labels
        self.modality_concat = n_modalities > 0 and modality_style == "concat"
        self.ecs_threshold = ecs_threshold
        self.explicit_zero_prob = explicit_zero_prob
        self.grad_checkpointing = grad_checkpointing

        # ---- inputs
        self.gene_encoder = IdEmbedding(vocab_size, d_model, padding_idx=pad_token_id)
        if self.layout.value_style == "continuous":
            self.value_encoder = ContinuousValueEncoder(d_model, dropout, max_value)
        elif self.layout.value_style == "category":
            self.value_encoder = CategoryValueEncoder(
                self.layout.n_categories, d_model, padding_idx=self.layout.pad_category
            )
        else:
            self.value_encoder = None
        self.flag_encoder = nn.Embedding(2, d_model) if use_generative else None  # row 1 = "unknown"
        self.condition_encoder = (
            nn.Embedding(n_conditions, d_model, padding_idx=condition_pad_id) if n_conditions > 0 else None
        )
        self.modality_encoder = IdEmbedding(n_modalities, d_model, modality_pad_id) if n_modalities > 0 else None
        self.batch_encoder = IdEmbedding(num_batch_labels, d_model) if use_batch_labels else None
        self.dsbn = DomainSpecificBatchNorm(d_model, num_batch_labels, affine=dsbn_affine) if dsbn else None

        # ---- encoder
        attn_p = dropout if attn_dropout is None else attn_dropout
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, n_heads, d_ff, dropout, attn_p, norm_scheme) for _ in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(d_model) if norm_scheme == "pre" else None

        # ---- heads
        extra = self.modality_concat or use_batch_labels  # something concatenated to each token / the cell
        d_token = 2 * d_model if extra else d_model
        if decoder_style == "affine":
            self.expr_decoder = AffineExprDecoder(d_token, d_model)
        else:
            self.expr_decoder = ExprDecoder(d_token, d_model, explicit_zero_prob)
        d_gene = 2 * d_model if self.modality_concat else d_model
        self.mvc_decoder = MVCDecoder(d_gene, d_token, explicit_zero_prob) if use_mvc else None
        self.cls_decoder = MLPClassifier(d_model, n_cls, n_layers_cls) if n_cls > 0 else None
        self.dab_decoder = AdversarialDiscriminator(d_model, num_batch_labels, 3, dab_lambda) if do_dab else None
        self._init_weights()

    def config(self) -> dict:
        """The constructor kwargs (plain values)."""
        return dict(self._config)

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
