"""Constants and the error type shared by the gene-program modules."""

from __future__ import annotations

from dataclasses import dataclass

from scgpt_train.errors import UserInputError

DEFAULT_RESOLUTIONS = (1.0, 5.0, 10.0, 20.0, 40.0)
OFFICIAL_RESOLUTION = 40.0  # the GRN tutorial's Leiden resolution
MIN_PROGRAM_GENES = 5
MIN_TERM_GENES = 3
ALPHA = 0.05
DEFAULT_FAMILY = r"^(HLA-|CD3[DEG]$)"
COEXPR_PCS = 50
# why a checkpoint is refused (its gene embeddings are read without batch labels)
NO_BATCH_LABELS = "needs batch labels (DSBN / batch embedding); use a checkpoint without them"


@dataclass(frozen=True)
class GeneProgramParams:
    """The analysis settings of :func:`~scgpt_train.tasks.gene_programs.run.run_gene_programs`, built alike by
    ``scripts/gene_programs.py`` (its options) and ``benchmark=grn_*`` (the config's ``gene_programs`` block).

    n_hvg: HVGs of the AnnData tested; resolutions: Leiden resolutions run; resolution: the one tabulated and
    scored; n_neighbors / metric: the gene kNN graph; min_genes: smallest program; min_term_genes: smallest gene
    set (tested genes); alpha: Bonferroni level; family: regex of the gene family drawn as a network;
    network_threshold: cosine of its edges; seed: Leiden / UMAP / co-expression seed."""

    n_hvg: int = 1200
    resolutions: tuple[float, ...] = DEFAULT_RESOLUTIONS
    resolution: float = OFFICIAL_RESOLUTION
    n_neighbors: int = 15
    metric: str = "euclidean"
    min_genes: int = MIN_PROGRAM_GENES
    min_term_genes: int = MIN_TERM_GENES
    alpha: float = ALPHA
    family: str = DEFAULT_FAMILY
    network_threshold: float = 0.3
    seed: int = 0


class GeneProgramError(UserInputError):
    """An input gene-program analysis cannot use; the message names the file, gene or key and the fix."""
