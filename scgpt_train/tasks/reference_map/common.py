"""Constants and the error type shared by the reference-mapping modules."""

from __future__ import annotations

from scgpt_train.inference import EmbedInputError

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

# why load_model refuses a checkpoint whose embeddings need batch labels
ZERO_SHOT_ONLY = (
    "uses batch labels (DSBN / batch embedding), so its embeddings depend on a batch id the reference and query do "
    "not share; map with a pretrained (zero-shot) checkpoint instead"
)


class ReferenceMapError(EmbedInputError):
    """A reference / query / option that reference mapping cannot use; the message names the file and key."""


def peak_rss_mib() -> float:
    """This process's own peak resident set size in MiB: ``VmHWM`` of ``/proc/self/status`` (Linux).

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the parent's high-water mark across fork / vfork +
    exec into it, so a script started from a large process (a long pytest session) reports the parent's peak.
    Falls back to ``ru_maxrss`` where ``/proc`` is missing (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
