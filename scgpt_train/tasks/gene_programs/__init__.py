"""Gene programs from a checkpoint's gene embeddings (the scGPT paper's GRN analysis), checked against gene sets
and against a co-expression network built through the same pipeline.

Pipeline (the official GRN tutorial's, made a function):

1. gene embeddings: ``model.gene_encoder(ids)``, the token embedding followed by its LayerNorm (what the
   transformer reads), for the tested genes: a list (``genes``), the ``n_hvg`` most variable genes of an AnnData
   among those in the vocabulary (seurat_v3 on counts, else seurat on log values), or the whole vocabulary;
2. a kNN graph over genes with scanpy's defaults as the tutorial calls them (``sc.pp.neighbors(use_rep="X")``:
   k = 15, Euclidean, UMAP connectivities; ``metric="cosine"`` as an option);
3. Leiden (``sc.tl.leiden``, leidenalg, seeded) at each of several resolutions (the tutorial uses 40); a
   program is a cluster of >= ``min_genes`` (5) genes; programs are named ``r<resolution>_<k>`` by size;
4. per program: the within-program cosine network (every gene pair's cosine similarity of embeddings), and,
   with an AnnData, a per-cell score (``sc.tl.score_genes`` on log-normalized values, seeded) in ``obs``;
5. enrichment against GMT gene sets: one-sided hypergeometric test of each program x term, the background being
   the tested genes (recorded; terms with < ``min_term_genes`` background genes are not tested), Bonferroni over
   all programs x tested terms (scipy; gseapy is not used);
6. the co-expression baseline through steps 2-5: each gene's z-scored log-expression profile over the AnnData's
   cells (Euclidean distance between z-scores is a monotone function of Pearson correlation), reduced to 50
   principal components, then the same graph, Leiden, programs and enrichment on the same genes and background;
7. a report: per-resolution counts, a program table (genes, top enriched term, best co-expression match by
   Jaccard), the terms enriched in both / only one of the two, and figures (program scores over cell types, the
   cosine network of a gene family such as HLA-* / CD3D-E-G).

One module per job: :mod:`.inputs` (1, GMT / gene-list reading), :mod:`.graph` (2-4), :mod:`.enrichment` (5),
:mod:`.coexpression` (6, scores), :mod:`.figures`, :mod:`.run` (:func:`run_gene_programs`, 7). Everything public
is re-exported here.
"""

from scgpt_train.tasks.gene_programs.coexpression import coexpression_features, program_scores
from scgpt_train.tasks.gene_programs.common import (
    ALPHA,
    COEXPR_PCS,
    DEFAULT_FAMILY,
    DEFAULT_RESOLUTIONS,
    MIN_PROGRAM_GENES,
    MIN_TERM_GENES,
    OFFICIAL_RESOLUTION,
    GeneProgramError,
    GeneProgramParams,
)
from scgpt_train.tasks.gene_programs.enrichment import EnrichmentResult, check_gene_sets, enrichment
from scgpt_train.tasks.gene_programs.figures import plot_family_network, plot_program_heatmap
from scgpt_train.tasks.gene_programs.graph import (
    cosine_network,
    knn_connectivities,
    leiden_labels,
    leiden_programs,
    programs_from_labels,
)
from scgpt_train.tasks.gene_programs.inputs import (
    GeneEmbeddings,
    adata_gene_names,
    gene_embeddings,
    log_expression,
    read_gene_list,
    read_gmt,
    select_hvgs,
)
from scgpt_train.tasks.gene_programs.run import run_gene_programs

__all__ = [
    "ALPHA",
    "COEXPR_PCS",
    "DEFAULT_FAMILY",
    "DEFAULT_RESOLUTIONS",
    "MIN_PROGRAM_GENES",
    "MIN_TERM_GENES",
    "OFFICIAL_RESOLUTION",
    "EnrichmentResult",
    "GeneEmbeddings",
    "GeneProgramError",
    "GeneProgramParams",
    "adata_gene_names",
    "check_gene_sets",
    "coexpression_features",
    "cosine_network",
    "enrichment",
    "gene_embeddings",
    "knn_connectivities",
    "leiden_labels",
    "leiden_programs",
    "log_expression",
    "plot_family_network",
    "plot_program_heatmap",
    "program_scores",
    "programs_from_labels",
    "read_gene_list",
    "read_gmt",
    "run_gene_programs",
    "select_hvgs",
]
