"""The whole mapping run: query and reference embedded, index, vote, baselines, output AnnData."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from scgpt_train.evaluation.baselines import log_normalized
from scgpt_train.inference import read_h5ad_checked
from scgpt_train.tasks.reference_map.atlas import CorpusEmbedder, check_corpus_label, is_corpus
from scgpt_train.tasks.reference_map.baselines import align_genes, run_baselines
from scgpt_train.tasks.reference_map.common import (
    BASELINE_MAX_CELLS,
    BASELINES,
    DEFAULT_CHUNK_CELLS,
    DEFAULT_K,
    FLAT_MAX_CELLS,
    METHOD_NAMES,
    UNASSIGNED,
    ReferenceMapError,
)
from scgpt_train.tasks.reference_map.embed import embed_adata, load_model, obs_labels
from scgpt_train.tasks.reference_map.index import build_index, knn_vote

log = logging.getLogger(__name__)

# the whole run


def _metrics(truth: np.ndarray, pred: np.ndarray, ref_labels: np.ndarray | None = None, what: str = "") -> dict:
    """Query metrics of one method; with the reference's labels also the collapse / majority flags (a warning when
    one is set, :func:`scgpt_train.evaluation.metrics.collapse_flags`)."""
    from scgpt_train.evaluation.metrics import classification_metrics, collapse_flags, collapse_warning

    has = np.array([t is not None for t in truth])
    t, p = truth[has].astype(str), np.asarray(pred)[has].astype(str)
    m = classification_metrics(t, p)
    out = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "precision": m["precision"], "recall": m["recall"]}
    if ref_labels is not None and len(t):
        out.update(collapse_flags(t, p, ref_labels))
        msg = collapse_warning(out, what, p)
        if msg:
            log.warning(msg)
    return out


def default_index_dir(out) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".h5ad") + ".reference_index")


def run_reference_map(
    checkpoint,
    reference,
    query,
    label_key: str,
    out,
    *,
    k: int = DEFAULT_K,
    index_out=None,
    index_kind: str = "auto",
    knn_backend: str = "auto",
    flat_max: int = FLAT_MAX_CELLS,
    batch_size: int = 64,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
    max_seq_len: int | None = None,
    gene_column: str | None = None,
    use_raw: bool = False,
    gene_table: str | None = None,
    cls_value: float | None = None,
    seed: int = 0,
    device: str | None = None,
    baselines: Sequence[str] = BASELINES,
    n_hvg: int = 2000,
    n_pcs: int = 50,
    l1_c_grid: Sequence[float] | None = None,
    baseline_max_cells: int = BASELINE_MAX_CELLS,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Map ``query`` onto ``reference`` (an h5ad, or a corpus directory: atlas mode) and write ``out``: the query
    AnnData (same obs_names, all genes) with ``obsm["X_scgpt"]``, the kNN predictions and distances in ``obs``,
    the neighbours in ``obsm`` and ``uns["reference_map"]`` (parameters, index, metrics). Returns that summary."""
    from scgpt_train.evaluation.report import write_h5ad

    if k < 1:
        raise ReferenceMapError(f"--k must be >= 1, got {k}")
    atlas = is_corpus(reference)
    if not atlas and not Path(reference).is_file():
        raise ReferenceMapError(
            f"--reference {reference} is neither an .h5ad file nor a corpus directory (no manifest.json)"
        )
    t0 = time.perf_counter()
    q_adata = read_h5ad_checked(query, "--query", ReferenceMapError, use_raw)
    q_truth = obs_labels(q_adata.obs, label_key, query, "--query") if label_key in q_adata.obs.columns else None
    ref_adata = None
    if atlas:
        check_corpus_label(reference, label_key)
    else:
        ref_adata = read_h5ad_checked(reference, "--reference", ReferenceMapError, use_raw)
        ref_labels = obs_labels(ref_adata.obs, label_key, reference, "--reference")
    model, vocab = load_model(checkpoint)
    embed_kw = dict(
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        cls_value=cls_value,
        seed=seed,
        device=device,
        progress=progress,
    )
    file_kw = dict(gene_column=gene_column, use_raw=use_raw, gene_table=gene_table)
    # the query first: its input errors come before an hour of reference embedding
    q_emb = embed_adata(model, vocab, checkpoint, query, q_adata, description="embedding query", **embed_kw, **file_kw)
    summary: dict = {"reference": str(reference), "query": str(query), "label_key": label_key, "k": int(k)}
    index_reloaded = False
    if atlas:
        work_dir = Path(index_out) if index_out else default_index_dir(out)
        embedder = CorpusEmbedder(
            model,
            vocab,
            checkpoint,
            reference,
            work_dir,
            label_key,
            batch_size=batch_size,
            chunk_cells=chunk_cells,
            max_seq_len=max_seq_len,
            cls_value=cls_value,
            seed=seed,
            device=device,
            progress=progress,
            overwrite=overwrite,
        )
        t_emb = time.perf_counter()
        embedder.run()
        t_index = time.perf_counter()
        index, index_reloaded = embedder.build_index(index_kind, knn_backend, flat_max)
        summary["index_dir"] = str(work_dir)
        summary["reference_cells"] = embedder.n_cells
        summary["timings_s"] = {"embed_reference": t_index - t_emb, "index": time.perf_counter() - t_index}
    else:
        t_emb = time.perf_counter()
        r_emb = embed_adata(
            model, vocab, checkpoint, reference, ref_adata, description="embedding reference", **embed_kw, **file_kw
        )
        t_index = time.perf_counter()
        has = np.array([v is not None for v in ref_labels])
        names = sorted({str(v) for v in ref_labels[has]})
        codes = np.full(len(ref_labels), -1, dtype=np.int32)
        lookup = {n: i for i, n in enumerate(names)}
        codes[has] = [lookup[str(v)] for v in ref_labels[has]]
        index = build_index(r_emb.emb, codes, names, index_kind, knn_backend, flat_max, seed)
        summary["reference_cells"] = int(ref_adata.n_obs)
        summary["timings_s"] = {"embed_reference": t_index - t_emb, "index": time.perf_counter() - t_index}
        if index_out:
            index.save(index_out, extra={"label_key": label_key, "reference": str(reference)})
            summary["index_dir"] = str(index_out)
    summary["index"] = {**index.spec.as_dict(), "ntotal": index.ntotal, "reloaded": bool(index_reloaded)}

    # the vote
    t_q = time.perf_counter()
    ok = np.flatnonzero(~q_emb.unmapped)
    n_q = q_adata.n_obs
    k_eff = int(min(k, index.ntotal))
    dist = np.full((n_q, k_eff), np.nan, dtype=np.float32)
    nb_rows = np.full((n_q, k_eff), -1, dtype=np.int64)
    d_ok, nb_ok = index.search(q_emb.emb[ok], k_eff)
    code, score_ok = knn_vote(nb_ok, d_ok, index.labels, len(index.label_names))
    dist[ok] = d_ok
    nb_rows[ok] = np.where(nb_ok >= 0, index.rows[np.maximum(nb_ok, 0)], -1)
    names = np.asarray(index.label_names, dtype=object)
    pred = np.full(n_q, UNASSIGNED, dtype=object)
    pred[ok] = np.where(code >= 0, names[np.maximum(code, 0)], UNASSIGNED)
    score = np.zeros(n_q, dtype=np.float32)
    score[ok] = score_ok
    summary["timings_s"]["query_search"] = time.perf_counter() - t_q
    summary["n_query_cells"] = int(n_q)
    summary["n_query_unmapped"] = int(q_emb.unmapped.sum())

    out_adata = q_adata
    out_adata.obsm["X_scgpt"] = q_emb.emb
    out_adata.obsm["X_scgpt_knn_distances"] = dist
    out_adata.obsm["X_scgpt_knn_indices"] = nb_rows
    out_adata.obs["ref_pred"] = pd.Categorical(pred.astype(str))
    out_adata.obs["ref_pred_score"] = score
    finite = np.where(np.isfinite(dist), dist, np.nan)  # NaN: unmapped query cells and neighbours not found
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows give NaN
        out_adata.obs["ref_knn_dist_min"] = np.nanmin(finite, axis=1).astype(np.float32)
        out_adata.obs["ref_knn_dist_mean"] = np.nanmean(finite, axis=1).astype(np.float32)

    # baselines on the same reference / query split
    methods = {"scgpt_knn": pred}
    if baselines:
        t_b = time.perf_counter()
        if atlas:
            x_ref_raw, ref_codes, _ = embedder.expression_sample(baseline_max_cells, seed)
            ref_ids = np.arange(len(vocab), dtype=np.int64)
            labelled = ref_codes >= 0
            x_ref_raw, y_ref = x_ref_raw[labelled], np.asarray(embedder.label_names, dtype=object)[ref_codes[labelled]]
        else:
            has = np.array([v is not None for v in ref_labels])
            sel = np.flatnonzero(has)
            if len(sel) > baseline_max_cells:
                sel = np.sort(np.random.default_rng(seed).choice(sel, baseline_max_cells, replace=False))
            x_ref_raw, y_ref = r_emb.expression[sel], ref_labels[sel].astype(str)
            ref_ids = r_emb.gene_ids
        xr, xq, shared = align_genes(x_ref_raw, ref_ids, q_emb.expression, q_emb.gene_ids)
        xr, xq = log_normalized(xr, "reference"), log_normalized(xq, "query")
        base_preds, base_info = run_baselines(xr, y_ref, xq, baselines, k, n_hvg, n_pcs, l1_c_grid, seed)
        base_info["n_shared_genes"] = int(len(shared))
        for name, p in base_preds.items():
            methods[name] = np.asarray(p, dtype=object)
            out_adata.obs[f"ref_pred_{name}"] = pd.Categorical(np.asarray(p).astype(str))
        summary["baselines"] = base_info
        summary["timings_s"]["baselines"] = time.perf_counter() - t_b
    if q_truth is not None:
        labels = np.asarray(index.labels)
        known = np.asarray(index.label_names, dtype=object)[labels[labels >= 0]].astype(str)
        summary["metrics"] = {m: _metrics(q_truth, p, known, f"{m} on the query") for m, p in methods.items()}
        ref_names = set(index.label_names)
        summary["query_only_labels"] = sorted({str(t) for t in q_truth if t is not None and str(t) not in ref_names})
    summary["timings_s"]["total"] = time.perf_counter() - t0
    summary["params"] = {
        "checkpoint": str(checkpoint),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "max_seq_len": int(max_seq_len or model.layout.max_seq_len),
        "embedding": "L2-normalized cell embeddings (embed.py path)",
        "vote": "majority of k nearest (Euclidean on L2-normalized); ties: smaller summed distance",
    }
    out_adata.uns["reference_map"] = _jsonable(summary)
    write_h5ad(out_adata, out)
    summary["out"] = str(out)
    return summary


def _jsonable(obj):
    """A copy of ``obj`` AnnData can store in ``uns`` (no None; numpy scalars as Python values)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj if v is not None]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def results_table(summary: dict) -> str:
    """Markdown table of the metrics per method (empty when the query has no labels)."""
    from scgpt_train.evaluation.report import markdown_table

    metrics = summary.get("metrics") or {}
    rows = [
        [METHOD_NAMES.get(m, m), v["accuracy"], v["macro_f1"], v["precision"], v["recall"]] for m, v in metrics.items()
    ]
    return markdown_table(["method", "accuracy", "macro F1", "macro precision", "macro recall"], rows) if rows else ""
