"""Zero-shot reference mapping: embed a labelled reference and a query with one checkpoint, label every query
cell by a k-nearest-neighbour vote over the reference, and score it next to two simple baselines.

One module per job:

- :mod:`.embed`: embeddings of an h5ad through ``scripts/embed.py``'s code path (seeded, L2-normalized);
- :mod:`.index`: the k-NN index (faiss flat / IVF-PQ or scikit-learn), save / reload, the vote;
- :mod:`.atlas`: atlas mode, a corpus reference embedded streaming and resumably (journalled chunks);
- :mod:`.baselines`: HVG+PCA kNN and L1 logistic regression on the same split;
- :mod:`.run`: the whole run (:func:`run_reference_map`) and its metrics table;

Everything public is re-exported here (``from scgpt_train.tasks.reference_map import ...``).
"""

from scgpt_train.evaluation.baselines import log_normalized
from scgpt_train.inference import l2_normalize, read_h5ad_checked
from scgpt_train.tasks.reference_map.atlas import CorpusEmbedder, check_corpus_label, checkpoint_digest, is_corpus
from scgpt_train.tasks.reference_map.baselines import align_genes, hvg_mask, run_baselines
from scgpt_train.tasks.reference_map.common import (
    BASELINE_MAX_CELLS,
    BASELINES,
    CORPUS_UNKNOWN,
    DEFAULT_CHUNK_CELLS,
    DEFAULT_K,
    FLAT_MAX_CELLS,
    IVF_TRAIN_MAX,
    METHOD_NAMES,
    READ_BLOCK_CELLS,
    UNASSIGNED,
    ReferenceMapError,
    ReferenceMapParams,
    peak_rss_mib,
)
from scgpt_train.tasks.reference_map.embed import (
    EmbeddedCells,
    embed_adata,
    load_model,
    obs_labels,
)
from scgpt_train.tasks.reference_map.index import (
    IndexSpec,
    KnnIndex,
    build_index,
    choose_index,
    faiss_available,
    knn_vote,
    pq_subquantizers,
)
from scgpt_train.tasks.reference_map.run import default_index_dir, results_table, run_reference_map

__all__ = [
    "BASELINES",
    "BASELINE_MAX_CELLS",
    "CORPUS_UNKNOWN",
    "DEFAULT_CHUNK_CELLS",
    "DEFAULT_K",
    "FLAT_MAX_CELLS",
    "IVF_TRAIN_MAX",
    "METHOD_NAMES",
    "READ_BLOCK_CELLS",
    "UNASSIGNED",
    "CorpusEmbedder",
    "EmbeddedCells",
    "IndexSpec",
    "KnnIndex",
    "ReferenceMapError",
    "ReferenceMapParams",
    "align_genes",
    "build_index",
    "check_corpus_label",
    "checkpoint_digest",
    "choose_index",
    "default_index_dir",
    "embed_adata",
    "faiss_available",
    "hvg_mask",
    "is_corpus",
    "knn_vote",
    "l2_normalize",
    "load_model",
    "log_normalized",
    "obs_labels",
    "peak_rss_mib",
    "pq_subquantizers",
    "read_h5ad_checked",
    "results_table",
    "run_baselines",
    "run_reference_map",
]
