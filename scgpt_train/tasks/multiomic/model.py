"""The multi-omic model: a ScGPT with modality ids, optionally starting from a checkpoint's gene embeddings only.

``build_multiomic_model`` is the ``net`` target of ``configs/model/multiomic.yaml``. With ``pretrained_genes`` (an
official checkpoint directory, an imported .pt or a Lightning .ckpt of this project) the gene-embedding rows of
the checkpoint's tokens are copied bit for bit into the first rows of the (extended) vocabulary's embedding, and
its LayerNorm with them; nothing else is loaded (the paper's setting: "pretrained gene embeddings only").
Appended tokens (proteins, peaks, genes unknown to the checkpoint) are initialized by ``new_token_init``:
``random`` (the model's uniform(-0.1, 0.1) init) or ``mean`` (the mean of the checkpoint's gene rows, special
tokens excluded). The data module builds the vocabulary by extending the same checkpoint's (``data.vocab``), so
its first rows are the checkpoint's tokens in the checkpoint's order.
"""

from __future__ import annotations

import logging

import torch

from scgpt_train.model import ScGPT

log = logging.getLogger(__name__)
SPECIAL = ("<pad>", "<cls>", "<eoc>")


def load_gene_rows(model: ScGPT, path, new_token_init: str = "mean") -> dict:
    """Copy the checkpoint's gene embedding rows (and the gene encoder's LayerNorm) into ``model``; returns a
    report {n_loaded, n_new, init}."""
    from scgpt_train.checkpoints import load_checkpoint

    if new_token_init not in ("mean", "random"):
        raise ValueError(f"new_token_init must be mean or random, got {new_token_init!r}")
    src, vocab = load_checkpoint(path)
    w_src = src.gene_encoder.embedding.weight.detach()
    w = model.gene_encoder.embedding.weight
    n, d = w_src.shape
    if d != w.shape[1]:
        raise ValueError(
            f"{path}: gene embeddings have d_model={d} but the model has d_model={w.shape[1]}; "
            f"set model.net.d_model={d}"
        )
    if n > w.shape[0]:
        raise ValueError(
            f"{path}: the checkpoint has {n} tokens but the data's vocabulary only {w.shape[0]}; build the data with "
            f"data.vocab={path} (its tokens first, new ones appended)"
        )
    if vocab is not None and vocab.get("<pad>") != model.pad_token_id:
        raise ValueError(
            f"{path}: <pad> is token {vocab.get('<pad>')} in the checkpoint but {model.pad_token_id} in the data; "
            f"build the data with data.vocab={path}"
        )
    with torch.no_grad():
        w[:n] = w_src
        if n < w.shape[0] and new_token_init == "mean":
            special = {vocab[t] for t in SPECIAL if vocab and t in vocab}
            rows = [i for i in range(n) if i not in special]
            w[n:] = w_src[rows].mean(0)
        model.gene_encoder.norm.load_state_dict(src.gene_encoder.norm.state_dict())
    return {"n_loaded": n, "n_new": int(w.shape[0] - n), "init": new_token_init, "source": str(path)}


def build_multiomic_model(
    vocab_size: int,
    pad_token_id: int,
    pretrained_genes: str | None = None,
    new_token_init: str = "mean",
    **net,
) -> ScGPT:
    """ScGPT(vocab_size, pad_token_id, **net); gene rows from ``pretrained_genes`` when given (see the module)."""
    model = ScGPT(vocab_size=vocab_size, pad_token_id=pad_token_id, **net)
    model.gene_rows_report = None
    if pretrained_genes:
        model.gene_rows_report = load_gene_rows(model, pretrained_genes, new_token_init)
        log.info("gene embeddings: %s", model.gene_rows_report)
    return model
