"""Model inputs of perturbation-response prediction: (control cell, perturbation) -> ``Batch``.

The official scGPT perturbation model (``TransformerGenerator``, GEARS-style batches) reads, per cell:

- every gene of the data as a token (``include_zero_genes="all"``: zero-expressed genes too), in the data's gene
  order, with NO ``<cls>`` token (the model has no positional encoding; position 0 is an ordinary gene);
- the control cell's log1p-normalized expression as the input value (not binned);
- a perturbation flag per gene as the condition id: ``FLAG_NOT_PERTURBED`` (0) or ``FLAG_PERTURBED`` (1); the
  official ``pert_encoder`` has 3 rows with ``padding_idx = pert_pad_id = 0`` (the tutorial's value), so
  padding positions carry flag 0 too (``flag_pad``);
- and is trained to output the paired perturbed cell's expression of every gene (``target_values``).

Genes absent from the vocabulary (``unknown_genes``): ``"pad"`` (official) gives them the ``<pad>`` token id
and keeps them in the sequence, attended like every other token (``src_key_padding_mask`` is all False in the
tutorial), so they get predictions from the ``<pad>`` embedding; ``"mask"`` gives them the ``<pad>`` id and
masks them out (``pad_mask`` True: not attended, not in the loss, predicted as unchanged); ``"error"`` refuses.

Longer gene lists than ``max_genes`` (training only; the tutorial's ``max_seq_len`` 1,536): one random subset of
``max_genes`` genes per batch, shared by its cells. The tutorial draws it uniformly (``randperm``), which drops a
cell's perturbed gene with probability ``1 - max_genes / n_genes`` (~70% of singles on 5,000 genes) and hides
the perturbation from the model; ``keep_perturbed_genes=True`` (our default) always keeps every flagged gene of
the batch and fills the remaining slots at random. Evaluation and prediction read all genes, as the tutorial's
``pred_perturb`` does.

``include_zero_genes="batch-wise"`` (the tutorial's other option) uses only the genes that are non-zero in some
control cell of the batch; with ``keep_perturbed_genes`` the flagged genes are kept even when their control
expression is zero (the tutorial drops them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from data_modules.batch import Batch
from data_modules.errors import UserInputError
from data_modules.perturbation.conditions import condition_genes

FLAG_NOT_PERTURBED = 0
FLAG_PERTURBED = 1
N_FLAGS = 3  # rows of the official pert_encoder
OFFICIAL_FLAG_PAD = 0  # the tutorial's pert_pad_id (padding_idx of pert_encoder)
UNKNOWN_GENE_MODES = ("pad", "mask", "new", "error")
ZERO_GENE_MODES = ("all", "batch-wise")


class PerturbationInputError(UserInputError):
    """Perturbation inputs that cannot be built (names the gene / condition / source)."""


@dataclass(frozen=True)
class GeneTokens:
    """How the data's gene columns become tokens: ``ids[j]`` is the vocab id of column ``j`` (``<pad>`` for a
    gene outside the vocabulary), ``masked[j]`` whether the column is masked out of attention and loss."""

    gene_names: np.ndarray
    ids: np.ndarray
    known: np.ndarray
    masked: np.ndarray
    mode: str
    pad_id: int

    @property
    def n_unknown(self) -> int:
        return int((~self.known).sum())

    @property
    def unknown_genes(self) -> list[str]:
        return self.gene_names[~self.known].tolist()

    def report(self, n_examples: int = 10) -> dict:
        return {
            "n_genes": int(len(self.ids)),
            "n_in_vocab": int(self.known.sum()),
            "n_not_in_vocab": self.n_unknown,
            "not_in_vocab_examples": self.unknown_genes[:n_examples],
            "unknown_genes": self.mode,
        }


def map_data_genes(
    gene_names: Sequence[str], vocab, unknown_genes: str = "pad", source: str = "the data"
) -> GeneTokens:
    """Vocab ids of the data's genes (``vocab``: a ``GeneVocab``) under the ``unknown_genes`` policy."""
    if unknown_genes not in UNKNOWN_GENE_MODES:
        raise ValueError(f"unknown_genes must be one of {UNKNOWN_GENE_MODES}, got {unknown_genes!r}")
    names = np.asarray(gene_names).astype(str)
    mapping = vocab.map_genes(list(names))
    known = mapping.known
    if unknown_genes == "error" and not known.all():
        missing = names[~known]
        raise PerturbationInputError(
            f"{source}: {len(missing)} of {len(names)} genes are not in the vocabulary (e.g. {missing[:5].tolist()}); "
            "set unknown_genes to 'pad' (official: <pad> token) or 'mask' (left out of attention and loss)"
        )
    if not known.any():
        raise PerturbationInputError(
            f"{source}: none of the {len(names)} genes is in the vocabulary (e.g. {names[:5].tolist()}); the data "
            "must use the vocabulary's gene names (var['gene_name'])"
        )
    if unknown_genes == "new":  # ids in the vocabulary extended by extend_vocab: learned new tokens
        ids = extend_vocab(vocab, names)[0].map_genes(list(names)).ids.astype(np.int64)
        return GeneTokens(names, ids, known, np.zeros(len(names), dtype=bool), unknown_genes, int(vocab.pad_id))
    ids = np.where(known, mapping.ids, vocab.pad_id).astype(np.int64)
    masked = ~known if unknown_genes == "mask" else np.zeros(len(names), dtype=bool)
    return GeneTokens(names, ids, known, masked, unknown_genes, int(vocab.pad_id))


def extend_vocab(vocab, gene_names: Sequence[str]):
    """``vocab`` (a ``GeneVocab``) with the genes it lacks appended in data order (their rows are new, learned
    tokens); ids of the existing tokens do not change. Returns (vocab, appended gene names)."""
    from data_modules.vocab import GeneVocab

    mapping = dict(vocab.token_to_id)
    appended = []
    for g in np.asarray(gene_names).astype(str):
        if g not in mapping:
            mapping[g] = len(mapping)
            appended.append(g)
    return (GeneVocab(mapping) if appended else vocab), appended


def gene_positions(gene_names: Sequence[str]) -> dict[str, int]:
    """Gene name -> column; a name occurring twice is refused (flags would be ambiguous)."""
    out: dict[str, int] = {}
    for j, g in enumerate(np.asarray(gene_names).astype(str)):
        if g in out:
            raise PerturbationInputError(f"gene {g!r} occurs twice in the data's genes (columns {out[g]} and {j})")
        out[g] = j
    return out


def flag_columns(condition: str, index: dict[str, int], source: str = "the data") -> np.ndarray:
    """Columns of the perturbed genes of ``condition`` (empty for ``ctrl``); an absent gene is named."""
    cols = []
    for g in condition_genes(condition):
        if g not in index:
            raise PerturbationInputError(
                f"gene {g!r} of condition {condition!r} is not among the genes of {source}; a perturbed gene must "
                "be one of the measured genes (var['gene_name'])"
            )
        cols.append(index[g])
    return np.asarray(cols, dtype=np.int64)


def select_columns(
    n_genes: int,
    max_genes: int | None,
    flagged: np.ndarray,
    rng: np.random.Generator,
    keep_perturbed_genes: bool = True,
    candidates: np.ndarray | None = None,
) -> np.ndarray:
    """Sorted gene columns of one batch: ``candidates`` (default all columns; ``batch-wise``: the non-zero ones),
    with the ``flagged`` columns added when ``keep_perturbed_genes``, then at most ``max_genes`` of them: a
    uniform random subset (official), or every flagged column plus a random subset of the others."""
    cols = np.arange(n_genes, dtype=np.int64) if candidates is None else np.asarray(candidates, dtype=np.int64)
    flagged = np.unique(np.asarray(flagged, dtype=np.int64))
    if keep_perturbed_genes and flagged.size:
        cols = np.union1d(cols, flagged)
    if max_genes is None or len(cols) <= max_genes:
        return np.sort(cols)
    if not keep_perturbed_genes:
        return np.sort(rng.permutation(cols)[:max_genes])
    if flagged.size > max_genes:
        raise PerturbationInputError(
            f"the batch perturbs {flagged.size} different genes, more than max_genes={max_genes}; use a smaller "
            "batch size or a longer layout.max_seq_len"
        )
    others = np.setdiff1d(cols, flagged, assume_unique=True)
    chosen = rng.permutation(others)[: max_genes - flagged.size]
    return np.sort(np.concatenate([flagged, chosen]))


def make_batch(
    ctrl_x: np.ndarray,
    flags: Sequence[np.ndarray],
    tokens: GeneTokens,
    columns: np.ndarray | None = None,
    target_x: np.ndarray | None = None,
    flag_pad: int = OFFICIAL_FLAG_PAD,
) -> Batch:
    """A ``Batch`` over the gene ``columns`` (default all): ``values`` the control cells ``ctrl_x`` (B, G),
    ``target_values`` the perturbed cells ``target_x`` (or the inputs when None), ``condition_ids`` the flags
    (``flags[i]``: flagged columns of cell i), ``pad_mask`` True at masked (unknown, ``"mask"``) genes."""
    ctrl_x = np.asarray(ctrl_x, dtype=np.float32)
    b, g = ctrl_x.shape
    if len(flags) != b:
        raise ValueError(f"{len(flags)} flag sets for {b} cells")
    cols = np.arange(g, dtype=np.int64) if columns is None else np.asarray(columns, dtype=np.int64)
    flag_matrix = np.zeros((b, g), dtype=np.int64)
    for i, f in enumerate(flags):
        flag_matrix[i, np.asarray(f, dtype=np.int64)] = FLAG_PERTURBED
    pad = np.broadcast_to(tokens.masked[cols], (b, len(cols))).copy()
    cond = flag_matrix[:, cols]
    cond[pad] = flag_pad
    target = ctrl_x if target_x is None else np.asarray(target_x, dtype=np.float32)
    return Batch(
        gene_ids=torch.from_numpy(np.broadcast_to(tokens.ids[cols], (b, len(cols))).copy()),
        values=torch.from_numpy(np.ascontiguousarray(ctrl_x[:, cols])),
        pad_mask=torch.from_numpy(pad),
        target_values=torch.from_numpy(np.ascontiguousarray(target[:, cols])),
        condition_ids=torch.from_numpy(cond),
    )


def scatter_predictions(
    outputs: np.ndarray, ctrl_x: np.ndarray, columns: np.ndarray | None, pad_mask: np.ndarray | None = None
) -> np.ndarray:
    """Predicted expression over all genes (B, G): the model output at the batch's ``columns``; genes not in the
    batch or masked (``pad_mask``) keep their control value (no change predicted)."""
    pred = np.array(ctrl_x, dtype=np.float32, copy=True)
    cols = np.arange(pred.shape[1]) if columns is None else np.asarray(columns, dtype=np.int64)
    out = np.asarray(outputs, dtype=np.float32)
    if pad_mask is not None:
        out = np.where(pad_mask, pred[:, cols], out)
    pred[:, cols] = out
    return pred
