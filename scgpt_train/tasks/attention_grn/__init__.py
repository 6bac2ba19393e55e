"""Attention-based gene regulatory networks (the scGPT paper's GRN analysis from attention maps, Fig. 6).

One module per job: :mod:`.scores` (last-layer q.k^T per head, rank normalization, head mean, per-condition
means with every cell counted), :mod:`.inputs` (TF-target resource, gene panel, token batches), :mod:`.targets`
(top-K targets of a source gene, hypergeometric test, expression-matched random / co-expression / DE baselines),
:mod:`.run` (:func:`run_attention_grn`: tables, report, figures). ``benchmark=grn_<dataset>``:
scgpt_train/benchmarks/grn.py.
"""

from scgpt_train.tasks.attention_grn.common import (
    DEFAULT_N_RANDOM,
    DEFAULT_TOP_K,
    SETTINGS,
    AttentionGRNParams,
    GRNError,
)
from scgpt_train.tasks.attention_grn.inputs import Panel, build_panel, read_tf_targets, token_batches
from scgpt_train.tasks.attention_grn.run import load_grn_model, perturbed_condition_of, run_attention_grn
from scgpt_train.tasks.attention_grn.scores import (
    ConditionMeans,
    cell_maps,
    condition_attention,
    head_scores,
    rank_normalize,
)
from scgpt_train.tasks.attention_grn.targets import (
    attention_scores,
    coexpression_scores,
    de_scores,
    hypergeom_p,
    overlap_stats,
    random_matched_overlaps,
    top_k,
)

__all__ = [
    "DEFAULT_N_RANDOM",
    "DEFAULT_TOP_K",
    "SETTINGS",
    "AttentionGRNParams",
    "ConditionMeans",
    "GRNError",
    "Panel",
    "attention_scores",
    "build_panel",
    "cell_maps",
    "coexpression_scores",
    "condition_attention",
    "de_scores",
    "head_scores",
    "hypergeom_p",
    "load_grn_model",
    "overlap_stats",
    "perturbed_condition_of",
    "random_matched_overlaps",
    "rank_normalize",
    "read_tf_targets",
    "run_attention_grn",
    "token_batches",
    "top_k",
]
