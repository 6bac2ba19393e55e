"""Constants and the error type shared by the attention-GRN modules."""

from __future__ import annotations

from scgpt_train.errors import UserInputError

SETTINGS = ("control", "perturbed", "difference")
DEFAULT_TOP_K = 20
DEFAULT_N_RANDOM = 1000
N_EXPRESSION_BINS = 10  # expression-matched random baseline: quantile bins of mean expression
CONTROL = "ctrl"
MAX_BLOCK_BYTES = 256 * 2**20  # scores.py: (heads x M x M) work per step is kept under this


class GRNError(UserInputError):
    """An input the attention-GRN analysis cannot use; the message names the gene, file or key and the fix."""
