"""Constants and the error type shared by the reference-mapping modules."""

from __future__ import annotations

from scgpt_train.tasks.embedding import EmbedInputError

DEFAULT_K = 10
FLAT_MAX_CELLS = 100_000  # "auto": exact flat index up to this many reference cells, IVF-PQ above
IVF_TRAIN_MAX = 200_000  # embeddings sampled to train the IVF-PQ quantizers
DEFAULT_CHUNK_CELLS = 16_384  # atlas mode: cells per journalled chunk of embeddings
READ_BLOCK_CELLS = 2_048  # atlas mode: cells read from the corpus at once
BASELINE_MAX_CELLS = 20_000
BASELINES = ("hvg_pca_knn", "l1_lr")
UNASSIGNED = "unassigned"  # prediction of a query cell the model cannot read (no gene of the vocabulary)
CORPUS_UNKNOWN = "unknown"  # a corpus' label of a cell whose dataset lacks the column (store/format.py)
METHOD_NAMES = {"scgpt_knn": "scGPT zero-shot kNN", "hvg_pca_knn": "HVG + PCA kNN", "l1_lr": "L1 logistic regression"}


class ReferenceMapError(EmbedInputError):
    """A reference / query / option that reference mapping cannot use; the message names the file and key."""
