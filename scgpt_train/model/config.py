"""The model's configuration: every ScGPT constructor value in one dataclass, the token layout its own node."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from data_modules.tokenize.layout import TokenLayout

CELL_EMB_STYLES = ("cls", "avg-pool", "w-pool")


@dataclass
class ScGPTConfig:
    """What builds an :class:`~scgpt_train.model.ScGPT`: sizes, the token layout, which inputs and heads exist.

    ``ScGPT(config)`` and ``ScGPT(**keywords)`` (Hydra's ``model.net``) build the same model; ``model.config()`` is
    :meth:`to_dict`, the ``model_config`` our checkpoints store (``scgpt_train.checkpoints.mapping.upgrade_config``
    brings the configs of earlier versions to these fields).

    Parameters
    ----------
    vocab_size, pad_token_id : int
        Gene vocabulary size and the ``<pad>`` id (its embedding row stays zero-initialised as padding).
    d_model, n_heads, d_ff, n_layers : int
        Embedding size, attention heads, feed-forward size, encoder layers.
    dropout : float
        Dropout of the encoder layers and the value encoder.
    layout : TokenLayout or dict
        The token layout the model reads (value style, n_bins, pad / mask values); the data's must agree.
    cell_emb_style : str
        ``cls``, ``avg-pool`` or ``w-pool``.
    norm_scheme : str
        ``post`` (official) or ``pre`` (adds a final LayerNorm).
    use_generative, use_mvc, explicit_zero_prob : bool
        The generative (unknown-gene) flag embedding, the MVC decoder, zero-probability outputs.
    n_cls, n_layers_cls : int
        Classifier classes (0: no classifier) and its layers.
    num_batch_labels : int
        Batches known to the batch embedding / DSBN / DAB.
    use_batch_labels, dsbn, do_dab, dsbn_affine : bool
        The batch embedding concatenated to the decoders' input, domain-specific batch norm (with affine
        parameters), the adversarial batch discriminator.
    ecs_threshold, dab_lambda : float
        The elastic cell similarity threshold; the gradient reversal's scale.
    n_conditions, condition_pad_id : int
        Perturbation condition ids (0: none) and their padding row.
    n_modalities, modality_pad_id : int
        Modality ids (0: none) and their padding row.
    grad_checkpointing : bool
        Recompute each encoder layer in the backward pass (less memory, more time).
    attn_dropout : float, optional
        Dropout on attention probabilities; 0.0 keeps SDPA on its fused kernels; None = ``dropout`` (official).
    max_value : float
        Continuous values are clipped here before the value encoder.
    decoder_style : str
        ``mlp`` (official) or ``affine`` (perturbation: coeff(h) * value + bias(h)).
    modality_style : str
        ``encoder`` (modality embedding added to the input) or ``concat`` (official multi-omic: modality + batch
        embedding concatenated before the decoders).
    """

    vocab_size: int
    pad_token_id: int
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 512
    n_layers: int = 12
    dropout: float = 0.2
    layout: TokenLayout = field(default_factory=TokenLayout)
    cell_emb_style: str = "cls"
    norm_scheme: str = "post"
    use_generative: bool = True
    use_mvc: bool = True
    explicit_zero_prob: bool = False
    n_cls: int = 0
    n_layers_cls: int = 3
    num_batch_labels: int = 0
    use_batch_labels: bool = False
    dsbn: bool = False
    do_dab: bool = False
    ecs_threshold: float = 0.8
    n_conditions: int = 0
    n_modalities: int = 0
    grad_checkpointing: bool = False
    attn_dropout: float | None = 0.0
    max_value: float = 512.0
    decoder_style: str = "mlp"
    modality_style: str = "encoder"
    condition_pad_id: int | None = 0
    modality_pad_id: int | None = None
    dab_lambda: float = 1.0
    dsbn_affine: bool = False

    def __post_init__(self):
        self.layout = TokenLayout.from_any(self.layout)
        if self.cell_emb_style not in CELL_EMB_STYLES:
            raise ValueError(f"cell_emb_style must be one of {CELL_EMB_STYLES}, got {self.cell_emb_style!r}")
        if self.decoder_style not in ("mlp", "affine"):
            raise ValueError(f"decoder_style must be 'mlp' or 'affine', got {self.decoder_style!r}")
        if self.modality_style not in ("encoder", "concat"):
            raise ValueError(f"modality_style must be 'encoder' or 'concat', got {self.modality_style!r}")
        if (self.use_batch_labels or self.dsbn or self.do_dab) and self.num_batch_labels < 1:
            raise ValueError("use_batch_labels / dsbn / do_dab need num_batch_labels >= 1")
        if self.decoder_style == "affine" and self.explicit_zero_prob:
            raise ValueError("decoder_style='affine' does not support explicit_zero_prob")

    @classmethod
    def of(cls, config: ScGPTConfig | dict | None = None, **keywords: Any) -> ScGPTConfig:
        """``config`` (a ScGPTConfig or its dict) with ``keywords`` on top; no config: the keywords alone."""
        if config is None:
            return cls(**keywords)
        if isinstance(config, ScGPTConfig):
            return dataclasses.replace(config, **keywords) if keywords else config
        return cls(**{**dict(config), **keywords})

    def to_dict(self) -> dict:
        """Plain values, ``layout`` as its dict: the constructor keywords, as checkpoints store them."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["layout"] = self.layout.to_dict()
        return out
