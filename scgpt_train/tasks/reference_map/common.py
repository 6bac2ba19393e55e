"""Constants and the error type shared by the reference-mapping modules."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ReferenceMapParams:
    """The settings of :func:`~scgpt_train.tasks.reference_map.run.run_reference_map`, built alike by
    ``scripts/reference_map.py`` (its options), ``scgpt_train.api.reference_map`` and ``benchmark=zeroshot_*``.

    Parameters
    ----------
    k : int
        Neighbours per vote.
    index_kind, knn_backend : str
        ``auto`` / ``flat`` / ``ivfpq``; ``auto`` / ``faiss`` / ``sklearn``.
    flat_max : int
        The largest reference searched with a flat (exact) index under ``index_kind="auto"``.
    batch_size : int, optional
        The most cells per embedding batch beside the token budget (None: no cap; batches are sorted by length and
        packed, :func:`~scgpt_train.inference.embed_cells`).
    chunk_cells : int
        Atlas mode: cells per journalled chunk (whole groups of 64 cells).
    max_seq_len : int, optional
        Genes per cell + ``<cls>`` (None: the checkpoint's).
    gene_column, gene_table, use_raw, prefer_gene_column
        How both files' genes are read: the var column with the names, an Ensembl id -> symbol table, ``.raw``,
        and whether the column's names win over Ensembl ids in the index (``resolve_gene_names(prefer_column=)``).
    cls_value : float, optional
        The input value at ``<cls>`` (None: the layout's pad value).
    seed : int
        Binning ties, gene sampling, index training, baseline subsampling.
    device : str, optional
        None: CUDA when available.
    precision : str
        ``auto`` / ``fp32`` / ``bf16`` (:func:`~scgpt_train.precision.resolve_precision`; the choice is printed).
    baselines : tuple of str
        Of :data:`BASELINES`; () for none.
    n_hvg, n_pcs, l1_c_grid, baseline_max_cells
        The baselines' HVGs, PCs, L1-LR C grid (None: the paper's) and reference-cell cap.
    overwrite : bool
        Atlas mode: replace embeddings in the index directory made with other settings.
    progress : bool
        Progress bars and printed notes.
    """

    k: int = DEFAULT_K
    index_kind: str = "auto"
    knn_backend: str = "auto"
    flat_max: int = FLAT_MAX_CELLS
    batch_size: int | None = None
    chunk_cells: int = DEFAULT_CHUNK_CELLS
    max_seq_len: int | None = None
    gene_column: str | None = None
    gene_table: str | None = None
    use_raw: bool = False
    prefer_gene_column: bool = False
    cls_value: float | None = None
    seed: int = 0
    device: str | None = None
    precision: str = "auto"
    baselines: tuple[str, ...] = BASELINES
    n_hvg: int = 2000
    n_pcs: int = 50
    l1_c_grid: tuple[float, ...] | None = None
    baseline_max_cells: int = BASELINE_MAX_CELLS
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.k < 1:
            raise ReferenceMapError(f"--k must be >= 1, got {self.k}")
        object.__setattr__(self, "baselines", tuple(self.baselines or ()))
        if self.l1_c_grid is not None:
            object.__setattr__(self, "l1_c_grid", tuple(float(c) for c in self.l1_c_grid))

    @classmethod
    def of(cls, params: ReferenceMapParams | None = None, **overrides) -> ReferenceMapParams:
        """``params`` (default: the defaults) with ``overrides`` (keyword callers: tests, the Python API)."""
        return dataclasses.replace(params or cls(), **overrides)


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
