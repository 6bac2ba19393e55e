"""The whole mapping run: query and reference embedded, index, vote, baselines, output AnnData."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from scgpt_train.evaluation.baselines import log_normalized
from scgpt_train.inference import read_h5ad_checked
from scgpt_train.tasks.reference_map.atlas import CorpusEmbedder, check_corpus_label, is_corpus
from scgpt_train.tasks.reference_map.baselines import align_genes, run_baselines
from scgpt_train.tasks.reference_map.common import (
    METHOD_NAMES,
    UNASSIGNED,
    ReferenceMapError,
    ReferenceMapParams,
)
from scgpt_train.tasks.reference_map.embed import EmbeddedCells, embed_adata, load_model, obs_labels
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


@dataclass
class _Inputs:
    """The checked query and reference of one run (``ref_adata`` / ``ref_labels`` None in atlas mode)."""

    atlas: bool
    query: ad.AnnData
    query_truth: np.ndarray | None  # (N,) labels, None where missing; None without ``label_key`` in the query
    ref_adata: ad.AnnData | None = None
    ref_labels: np.ndarray | None = None


@dataclass
class _Reference:
    """The embedded reference: its kNN index and what the baselines read of it."""

    index: object
    reloaded: bool
    summary: dict
    embedder: CorpusEmbedder | None = None  # atlas mode
    embedded: EmbeddedCells | None = None  # h5ad mode


def run_reference_map(
    checkpoint, reference, query, label_key: str, out, params: ReferenceMapParams | None = None, *, index_out=None,
    **overrides,
) -> dict:  # fmt: skip
    """Map ``query`` onto ``reference`` (an h5ad, or a corpus directory: atlas mode) and write ``out``: the query
    AnnData (same obs_names, all genes) with ``obsm["X_scgpt"]``, the kNN predictions and distances in ``obs``,
    the neighbours in ``obsm`` and ``uns["reference_map"]`` (parameters, index, metrics). Returns that summary.

    Parameters
    ----------
    checkpoint : path-like
        A zero-shot checkpoint (official directory, imported .pt, Lightning .ckpt).
    reference, query : path-like
        The labelled reference (h5ad, or a corpus directory) and the query h5ad.
    label_key : str
        The obs column (corpus: stored obs column) with the cell types.
    out : path-like
        The output h5ad.
    params : ReferenceMapParams, optional
        The settings (``overrides`` replace single fields: ``k=5``, ``seed=1``...).
    index_out : path-like, optional
        Where the kNN index is saved (atlas mode: also the embeddings' journal; default next to ``out``).
    """
    p = ReferenceMapParams.of(params, **overrides)
    t0 = time.perf_counter()
    inputs = _read_inputs(reference, query, label_key, p)
    model, vocab = load_model(checkpoint)
    # the query first: its input errors come before an hour of reference embedding
    q_emb = embed_adata(model, vocab, checkpoint, query, inputs.query, p, description="embedding query")
    ref = _embed_reference(model, vocab, checkpoint, reference, label_key, out, index_out, inputs, p)
    summary: dict = {
        "reference": str(reference),
        "query": str(query),
        "label_key": label_key,
        "k": int(p.k),
        **ref.summary,
    }
    summary["index"] = {**ref.index.spec.as_dict(), "ntotal": ref.index.ntotal, "reloaded": bool(ref.reloaded)}
    t_q = time.perf_counter()
    vote = _vote(q_emb, ref.index, p.k)
    summary["timings_s"]["query_search"] = time.perf_counter() - t_q
    summary["n_query_cells"] = int(inputs.query.n_obs)
    summary["n_query_unmapped"] = int(q_emb.unmapped.sum())
    methods = {"scgpt_knn": vote["pred"]}
    if p.baselines:
        t_b = time.perf_counter()
        base_preds, summary["baselines"] = _baselines(ref, inputs, q_emb, vocab, p)
        methods.update({name: np.asarray(pred, dtype=object) for name, pred in base_preds.items()})
        summary["timings_s"]["baselines"] = time.perf_counter() - t_b
    if inputs.query_truth is not None:
        summary.update(_metrics_table(inputs.query_truth, methods, ref.index))
    summary["timings_s"]["total"] = time.perf_counter() - t0
    summary["params"] = {
        "checkpoint": str(checkpoint),
        "seed": int(p.seed),
        "batch_size": p.batch_size,
        "precision": p.precision,
        "max_seq_len": int(p.max_seq_len or model.layout.max_seq_len),
        "embedding": "L2-normalized cell embeddings (embed.py path)",
        "vote": "majority of k nearest (Euclidean on L2-normalized); ties: smaller summed distance",
    }
    _write_output(inputs.query, q_emb, vote, methods, summary, out)
    summary["out"] = str(out)
    return summary


# compute ---------------------------------------------------------------------------------------------------------
def _read_inputs(reference, query, label_key: str, p: ReferenceMapParams) -> _Inputs:
    """The query (and an h5ad reference) read and checked; the label key checked in both."""
    atlas = is_corpus(reference)
    if not atlas and not Path(reference).is_file():
        raise ReferenceMapError(
            f"--reference {reference} is neither an .h5ad file nor a corpus directory (no manifest.json)"
        )
    q_adata = read_h5ad_checked(query, "--query", ReferenceMapError, p.use_raw)
    q_truth = obs_labels(q_adata.obs, label_key, query, "--query") if label_key in q_adata.obs.columns else None
    if atlas:
        check_corpus_label(reference, label_key)
        return _Inputs(True, q_adata, q_truth)
    ref_adata = read_h5ad_checked(reference, "--reference", ReferenceMapError, p.use_raw)
    return _Inputs(False, q_adata, q_truth, ref_adata, obs_labels(ref_adata.obs, label_key, reference, "--reference"))


def _embed_reference(model, vocab, checkpoint, reference, label_key, out, index_out, inputs, p) -> _Reference:
    """The reference embedded (atlas: streamed from the corpus, journalled) and its kNN index built or reloaded."""
    t_emb = time.perf_counter()
    if inputs.atlas:
        work_dir = Path(index_out) if index_out else default_index_dir(out)
        embedder = CorpusEmbedder(model, vocab, checkpoint, reference, work_dir, label_key, p)
        embedder.run()
        t_index = time.perf_counter()
        index, reloaded = embedder.build_index(p.index_kind, p.knn_backend, p.flat_max)
        summary = {"index_dir": str(work_dir), "reference_cells": embedder.n_cells}
        summary["timings_s"] = {"embed_reference": t_index - t_emb, "index": time.perf_counter() - t_index}
        return _Reference(index, reloaded, summary, embedder=embedder)
    desc = "embedding reference"
    r_emb = embed_adata(model, vocab, checkpoint, reference, inputs.ref_adata, p, description=desc)
    t_index = time.perf_counter()
    ref_labels = inputs.ref_labels
    has = np.array([v is not None for v in ref_labels])
    names = sorted({str(v) for v in ref_labels[has]})
    codes = np.full(len(ref_labels), -1, dtype=np.int32)
    lookup = {n: i for i, n in enumerate(names)}
    codes[has] = [lookup[str(v)] for v in ref_labels[has]]
    index = build_index(r_emb.emb, codes, names, p.index_kind, p.knn_backend, p.flat_max, p.seed)
    summary = {"reference_cells": int(inputs.ref_adata.n_obs)}
    summary["timings_s"] = {"embed_reference": t_index - t_emb, "index": time.perf_counter() - t_index}
    if index_out:
        index.save(index_out, extra={"label_key": label_key, "reference": str(reference)})
        summary["index_dir"] = str(index_out)
    return _Reference(index, False, summary, embedded=r_emb)


def _vote(q_emb: EmbeddedCells, index, k: int) -> dict[str, np.ndarray]:
    """The kNN vote of every query cell the model can read: ``pred`` (UNASSIGNED for the others), ``score`` (share
    of the neighbours voting for it), ``dist`` / ``rows`` (the neighbours' distances and reference rows)."""
    ok = np.flatnonzero(~q_emb.unmapped)
    n_q = len(q_emb.unmapped)
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
    return {"pred": pred, "score": score, "dist": dist, "rows": nb_rows}


def _baselines(ref: _Reference, inputs: _Inputs, q_emb: EmbeddedCells, vocab, p: ReferenceMapParams):
    """(predictions per baseline, their info) on the same reference / query split, log-normalized alike."""
    if ref.embedder is not None:
        x_ref_raw, ref_codes, _ = ref.embedder.expression_sample(p.baseline_max_cells, p.seed)
        ref_ids = np.arange(len(vocab), dtype=np.int64)
        labelled = ref_codes >= 0
        label_names = np.asarray(ref.embedder.label_names, dtype=object)
        x_ref_raw, y_ref = x_ref_raw[labelled], label_names[ref_codes[labelled]]
    else:
        ref_labels = inputs.ref_labels
        sel = np.flatnonzero(np.array([v is not None for v in ref_labels]))
        if len(sel) > p.baseline_max_cells:
            sel = np.sort(np.random.default_rng(p.seed).choice(sel, p.baseline_max_cells, replace=False))
        x_ref_raw, y_ref = ref.embedded.expression[sel], ref_labels[sel].astype(str)
        ref_ids = ref.embedded.gene_ids
    xr, xq, shared = align_genes(x_ref_raw, ref_ids, q_emb.expression, q_emb.gene_ids)
    xr, xq = log_normalized(xr, "reference"), log_normalized(xq, "query")
    grid = None if p.l1_c_grid is None else list(p.l1_c_grid)
    preds, info = run_baselines(xr, y_ref, xq, list(p.baselines), p.k, p.n_hvg, p.n_pcs, grid, p.seed)
    info["n_shared_genes"] = int(len(shared))
    return preds, info


# tables ----------------------------------------------------------------------------------------------------------
def _metrics_table(truth: np.ndarray, methods: dict[str, np.ndarray], index) -> dict:
    """``metrics`` per method on the labelled query cells, and the query's labels the reference lacks."""
    labels = np.asarray(index.labels)
    known = np.asarray(index.label_names, dtype=object)[labels[labels >= 0]].astype(str)
    metrics = {m: _metrics(truth, pred, known, f"{m} on the query") for m, pred in methods.items()}
    ref_names = set(index.label_names)
    query_only = sorted({str(t) for t in truth if t is not None and str(t) not in ref_names})
    return {"metrics": metrics, "query_only_labels": query_only}


# report ----------------------------------------------------------------------------------------------------------
def _write_output(q_adata, q_emb: EmbeddedCells, vote: dict, methods: dict, summary: dict, out) -> None:
    """The query AnnData with the embeddings, the vote, the neighbours and each baseline's predictions, and the
    summary in ``uns["reference_map"]``, written to ``out``."""
    from scgpt_train.evaluation.report import write_h5ad

    q_adata.obsm["X_scgpt"] = q_emb.emb
    q_adata.obsm["X_scgpt_knn_distances"] = vote["dist"]
    q_adata.obsm["X_scgpt_knn_indices"] = vote["rows"]
    q_adata.obs["ref_pred"] = pd.Categorical(vote["pred"].astype(str))
    q_adata.obs["ref_pred_score"] = vote["score"]
    finite = np.where(np.isfinite(vote["dist"]), vote["dist"], np.nan)  # NaN: unmapped cells, neighbours not found
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows give NaN
        q_adata.obs["ref_knn_dist_min"] = np.nanmin(finite, axis=1).astype(np.float32)
        q_adata.obs["ref_knn_dist_mean"] = np.nanmean(finite, axis=1).astype(np.float32)
    for name, pred in methods.items():
        if name != "scgpt_knn":
            q_adata.obs[f"ref_pred_{name}"] = pd.Categorical(np.asarray(pred).astype(str))
    q_adata.uns["reference_map"] = _jsonable(summary)
    write_h5ad(q_adata, out)


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
