"""The perturbation model from a pretrained checkpoint, as the official perturbation tutorial builds it.

The tutorial builds a fresh ``TransformerGenerator`` (flag embedding, affine expression decoder, the data's token
layout: log1p values, pad value 0) with the pretrained model's architecture, and copies in only the pretrained
``encoder`` (gene embedding), ``value_encoder`` and ``transformer_encoder`` weights (``load_param_prefixs``); the
flag embedding and the decoder start fresh. :func:`perturbation_model` does the same with our names
(``gene_encoder.``, ``value_encoder.``, ``layers.``, and ``final_norm.`` of pre-norm models). A checkpoint that is
already a perturbation model (condition embedding + affine decoder) can be continued whole with
``load_prefixes=None``.

This is a different model from the checkpoint (new heads, the perturbation layout), which is why it is not
``scgpt_train.checkpoints.load_model`` (that one refuses architecture overrides).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from data_modules.tokenize.layout import TokenLayout
from scgpt_train.model import ScGPT

log = logging.getLogger(__name__)

OFFICIAL_LOAD_PREFIXES = ("gene_encoder.", "value_encoder.", "layers.", "final_norm.")
# the perturbation model's own parts (the tutorial's TransformerGenerator has no MVC, generative flag, classifier)
PERTURBATION_ARCH = {"use_generative": False, "use_mvc": False, "explicit_zero_prob": False, "n_cls": 0,
                     "do_dab": False, "dsbn": False, "use_batch_labels": False, "num_batch_labels": 0,
                     "n_modalities": 0, "decoder_style": "affine"}  # fmt: skip


def perturbation_model(
    path,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    n_conditions: int = 3,
    condition_pad_id: int = 0,
    layout=None,
    load_prefixes: Sequence[str] | None = OFFICIAL_LOAD_PREFIXES,
    dropout: float | None = None,
    **overrides,
) -> ScGPT:
    """A perturbation ``ScGPT`` with the architecture of the checkpoint at ``path`` (official directory, imported
    ``.pt`` or Lightning ``.ckpt``) and its weights under ``load_prefixes`` (None: every weight whose shape fits).

    ``vocab_size`` / ``pad_token_id`` (from the data) must be the checkpoint's; ``layout`` is the data's token
    layout; ``dropout`` and other ``overrides`` set the remaining fine-tuning options."""
    from scgpt_train.checkpoints import load_checkpoint

    if path in (None, "", "None"):
        raise ValueError("perturbation fine-tuning from a checkpoint needs pretrained=PATH (the whole-human model)")
    source, _ = load_checkpoint(Path(path))
    cfg = source.config()
    n_ckpt_tokens = int(cfg["vocab_size"])
    for name, given in (("vocab_size", vocab_size), ("pad_token_id", pad_token_id)):
        grows = name == "vocab_size" and given is not None and int(given) > n_ckpt_tokens  # unknown_genes=new
        if given is not None and int(given) != int(cfg[name]) and not grows:
            raise ValueError(
                f"{path}: the checkpoint has {name}={cfg[name]} but the data gives {given}; build the data with the "
                f"checkpoint's vocabulary (data.vocab={path})"
            )
    if vocab_size is not None:
        cfg["vocab_size"] = int(vocab_size)
    cfg.update(PERTURBATION_ARCH)
    cfg.update(n_conditions=int(n_conditions), condition_pad_id=int(condition_pad_id))
    if layout is not None:
        cfg["layout"] = TokenLayout.from_any(layout).to_dict()
    if dropout is not None:
        cfg["dropout"] = float(dropout)
    cfg.update(overrides)
    model = ScGPT(**cfg)
    own = model.state_dict()
    state = source.state_dict()
    take = {
        k: v
        for k, v in state.items()
        if k in own
        and tuple(own[k].shape) == tuple(v.shape)
        and (load_prefixes is None or any(k.startswith(p) for p in load_prefixes))
    }
    emb = "gene_encoder.embedding.weight"
    n_new = model.gene_encoder.embedding.weight.shape[0] - n_ckpt_tokens
    if n_new > 0 and emb not in take and (load_prefixes is None or any(emb.startswith(p) for p in load_prefixes)):
        # the data appended new gene tokens: the checkpoint's rows are kept bit for bit, the new rows (the model's
        # uniform init) are learned
        rows = model.state_dict()[emb].clone()
        rows[:n_ckpt_tokens] = state[emb]
        take[emb] = rows
        log.info("gene embedding: %d rows from %s, %d new token rows (learned)", n_ckpt_tokens, path, n_new)
    model.load_state_dict(take, strict=False)
    fresh = sorted(k for k in own if k not in take)
    log.info("perturbation model from %s: %d weights loaded, %d fresh (%s)", path, len(take), len(fresh),
             ", ".join(sorted({k.split(".")[0] for k in fresh})))  # fmt: skip
    model.load_report = {"loaded": sorted(take), "fresh": fresh}
    return model
