"""Start a model from a pretrained checkpoint, checked against the data it will see."""

from __future__ import annotations

import logging

from scgpt_train.checkpoints import load_checkpoint
from scgpt_train.model import ScGPT

log = logging.getLogger(__name__)


def from_pretrained(path: str, vocab_size: int, pad_token_id: int, **overrides) -> ScGPT:
    """Load ``path`` (official directory, imported ``.pt`` or Lightning ``.ckpt``) for fine-tuning.

    ``vocab_size`` / ``pad_token_id`` come from the data module and must match the checkpoint: gene
    ids mean nothing across vocabularies. Other ``overrides`` (e.g. ``n_cls``, ``dropout``,
    ``num_batch_labels``) change the architecture where the checkpoint allows; new heads start fresh.
    """
    model, vocab = load_checkpoint(path, **overrides)
    cfg = model.config()
    if cfg["vocab_size"] != vocab_size or cfg["pad_token_id"] != pad_token_id:
        raise ValueError(
            f"checkpoint {path} has a {cfg['vocab_size']}-token vocabulary (<pad>={cfg['pad_token_id']}) but the "
            f"data uses {vocab_size} tokens (<pad>={pad_token_id}); build the data with the checkpoint's vocabulary "
            f"(scripts/build_corpus.py ... --vocab <checkpoint>/vocab.json, or data.vocab={path} for AnnData)"
        )
    report = getattr(model, "load_report", None)
    if report is not None and (report.missing or report.ignored):
        log.info("from_pretrained(%s): %s", path, report.summary())
    return model
