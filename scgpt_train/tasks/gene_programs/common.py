"""Constants and the error type shared by the gene-program modules."""

from __future__ import annotations

from scgpt_train.errors import UserInputError

DEFAULT_RESOLUTIONS = (1.0, 5.0, 10.0, 20.0, 40.0)
OFFICIAL_RESOLUTION = 40.0  # the GRN tutorial's Leiden resolution
MIN_PROGRAM_GENES = 5
MIN_TERM_GENES = 3
ALPHA = 0.05
DEFAULT_FAMILY = r"^(HLA-|CD3[DEG]$)"
COEXPR_PCS = 50


class GeneProgramError(UserInputError):
    """An input gene-program analysis cannot use; the message names the file, gene or key and the fix."""
