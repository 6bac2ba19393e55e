"""Constants and the error type shared by the gene-program modules."""

from __future__ import annotations

DEFAULT_RESOLUTIONS = (1.0, 5.0, 10.0, 20.0, 40.0)
OFFICIAL_RESOLUTION = 40.0  # the GRN tutorial's Leiden resolution
MIN_PROGRAM_GENES = 5
MIN_TERM_GENES = 3
ALPHA = 0.05
DEFAULT_FAMILY = r"^(HLA-|CD3[DEG]$)"
COEXPR_PCS = 50
# why a checkpoint is refused (its gene embeddings are read without batch labels)
NO_BATCH_LABELS = "needs batch labels (DSBN / batch embedding); use a checkpoint without them"


class GeneProgramError(ValueError):
    """An input gene-program analysis cannot use; the message names the file, gene or key and the fix."""
