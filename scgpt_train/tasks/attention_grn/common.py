"""Constants and the error type shared by the attention-GRN modules."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scgpt_train.errors import UserInputError

SETTINGS = ("control", "perturbed", "difference")
DEFAULT_TOP_K = 20
DEFAULT_N_RANDOM = 1000
N_EXPRESSION_BINS = 10  # expression-matched random baseline: quantile bins of mean expression
CONTROL = "ctrl"
MAX_BLOCK_BYTES = 256 * 2**20  # scores.py: (heads x M x M) work per step is kept under this


class GRNError(UserInputError):
    """An input the attention-GRN analysis cannot use; the message names the gene, file or key and the fix."""


@dataclass(frozen=True)
class AttentionGRNParams:
    """The settings of :func:`~scgpt_train.tasks.attention_grn.run.run_attention_grn`, built alike by
    ``scripts/attention_grn.py`` (its options) and ``benchmark=grn_*`` (each ``attention_grn`` part's keys).

    Parameters
    ----------
    sources : "auto" or sequence of str
        Source genes (TFs) to test; ``"auto"``: every resource source in the panel with >= ``min_targets`` known
        targets among it.
    condition_key, control, perturbed
        The obs column naming each cell's condition (None: all cells are control), the control's value, and
        {source: its perturbed condition} (default: the condition perturbing the source alone).
    settings : sequence of str, optional
        Of ``control`` / ``perturbed`` / ``difference`` (None: all that the data allows).
    genes, max_genes, gene_column
        The panel: these genes (None: the most variable ``max_genes`` of the vocabulary's), read from ``gene_column``.
    top, n_random, min_targets
        Targets per source (top K), random expression-matched draws, known targets a source needs (``auto``).
    layer, softmax, rank, direction, style
        The attention map: encoder layer, softmax over keys, row-then-column rank normalization, column or row of
        the source, input style (``auto`` / ``cls`` / ``perturbation``).
    batch_size, max_cells, seed, device
        Cells per forward pass, cells per condition (seeded sample; None: all), the seed, the torch device.
    save_maps, progress
        Write the mean maps per condition; progress bar and printed notes.
    """

    sources: Sequence[str] | str = "auto"
    condition_key: str | None = None
    control: str = CONTROL
    perturbed: Mapping[str, str] | None = None
    settings: Sequence[str] | None = None
    genes: Sequence[str] | None = None
    max_genes: int = 1200
    gene_column: str | None = None
    top: int = DEFAULT_TOP_K
    n_random: int = DEFAULT_N_RANDOM
    min_targets: int = 1
    layer: int = -1
    softmax: bool = False
    rank: bool = True
    direction: str = "column"
    style: str = "auto"
    batch_size: int = 8
    max_cells: int | None = None
    seed: int = 0
    device: str = "cpu"
    save_maps: bool = False
    progress: bool = True

    @classmethod
    def of(cls, params: AttentionGRNParams | None = None, **overrides) -> AttentionGRNParams:
        """``params`` (default: the defaults) with ``overrides`` (keyword callers)."""
        return dataclasses.replace(params or cls(), **overrides)

    @classmethod
    def from_config(cls, cfg: Mapping, **fixed) -> AttentionGRNParams:
        """From a benchmark part: its keys that name a field (null ones left at the default), then ``fixed``."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**({k: cfg[k] for k in names if cfg.get(k) is not None} | fixed))
