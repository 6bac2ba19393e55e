"""The whole attention-GRN run: mean attention maps per condition, top-K targets per source gene and setting,
the resource check with baselines beside it, tables, report and figures."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scgpt_train.tasks.attention_grn.common import (
    SETTINGS,
    AttentionGRNParams,
    GRNError,
)
from scgpt_train.tasks.attention_grn.inputs import build_panel, input_style, read_tf_targets, token_batches
from scgpt_train.tasks.attention_grn.scores import condition_attention
from scgpt_train.tasks.attention_grn.targets import (
    attention_scores,
    coexpression_scores,
    de_scores,
    overlap_stats,
    random_matched_overlaps,
    top_k,
)

METHOD_NAMES = {
    "attention": "scGPT attention",
    "random": "random (expression-matched)",
    "coexpression": "co-expression (abs. r)",
    "de": "differential expression",
}


def load_grn_model(checkpoint):
    """:func:`~scgpt_train.inference.load_for_inference`, refusing models that need batch labels."""
    from scgpt_train.inference import load_for_inference

    return load_for_inference(
        checkpoint, GRNError, "needs batch labels (DSBN / batch embedding); use a checkpoint without them"
    )


def perturbed_condition_of(source: str, conditions: Sequence[str]) -> str | None:
    """The single-gene condition perturbing ``source`` (``source+ctrl`` or its order variants), if any."""
    from data_modules.perturbation.conditions import ConditionError, condition_genes

    found = []
    for c in sorted(set(conditions)):
        try:
            if condition_genes(c) == (source,):
                found.append(c)
        except ConditionError:
            continue
    if len(found) > 1:
        raise GRNError(f"several conditions perturb {source} alone ({found}); name one with --perturbed")
    return found[0] if found else None


def _sample(rows: np.ndarray, max_cells: int | None, seed: int) -> np.ndarray:
    if max_cells is None or len(rows) <= max_cells:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))


def resolve_sources(sources, panel_genes, resource: Mapping[str, set], min_targets: int, tf_file) -> list[str]:
    """Sources to test: the given genes (each must be tested, be a resource source and have a known target among
    the candidates), or ``"auto"``: every resource source in the panel with >= ``min_targets`` such targets."""
    pos = set(panel_genes)
    if sources == "auto" or sources is None:
        auto = [g for g in panel_genes if len((resource.get(g, set()) & pos) - {g}) >= min_targets]
        if not auto:
            raise GRNError(
                f"no gene of the panel ({len(panel_genes)} genes) is a source in {tf_file} with >= {min_targets} "
                "known targets among the panel; test more genes or use another resource"
            )
        return auto
    out = []
    for s in sources:
        if s not in pos:
            raise GRNError(
                f"source gene {s!r} is not among the tested genes (the checkpoint's vocabulary and the data)"
            )
        if s not in resource:
            raise GRNError(f"source gene {s!r} is not a source (TF) in {tf_file}; pick a TF it lists")
        if not (resource[s] & pos) - {s}:
            raise GRNError(
                f"none of the {len(resource[s])} known targets of {s!r} in {tf_file} is among the {len(pos)} tested "
                "genes: the TF-target resource and the panel do not overlap, so there is nothing to test against"
            )
        out.append(s)
    return out


@dataclass
class _Setup:
    """What the maps and the scores read: the panel, sources, settings and the cells of each condition."""

    where: str
    model: object
    vocab: object
    style: str
    panel: object
    sources: list[str]
    settings: list[str]
    control: str  # the control condition's name ("all" without a condition key)
    perturbed_of: dict  # source -> its perturbed condition (None: none)
    rows: dict  # condition -> the cells sampled

    @property
    def offset(self) -> int:
        return 1 if self.style == "cls" else 0

    @property
    def needed(self) -> list[str]:
        return [self.control] + sorted({c for c in self.perturbed_of.values() if c is not None})


def run_attention_grn(
    checkpoint, adata, tf_targets, out_dir, params: AttentionGRNParams | None = None, **overrides
) -> dict:
    """Attention GRN of ``checkpoint`` on ``adata`` (an AnnData or an h5ad path); writes ``out_dir`` (docs/grn.md)
    and returns the summary (``summary["table"]``: one row per source x setting x method).

    Parameters
    ----------
    checkpoint : path-like
        A checkpoint without batch labels (official directory, imported .pt, Lightning .ckpt).
    adata : AnnData or path-like
        The cells (log-normalized or counts); ``params.condition_key`` names their conditions.
    tf_targets : path-like
        The TF-target resource (TSV: source, target).
    out_dir : path-like
        Where summary.tsv, targets.tsv, summary.json, report.md and the figures go.
    params : AttentionGRNParams, optional
        The settings (``overrides`` replace single fields: ``top=10``, ``seed=1``...).
    """
    p = AttentionGRNParams.of(params, **overrides)
    t0 = time.perf_counter()
    resource = read_tf_targets(tf_targets)
    setup = _setup(checkpoint, adata, resource, tf_targets, p)
    t_maps = time.perf_counter()
    means = _attention_maps(setup, p)
    t_maps = time.perf_counter() - t_maps
    records, target_rows = _score(setup, means, resource, p)
    summary = _write_outputs(setup, means, records, target_rows, checkpoint, tf_targets, out_dir, p)
    summary["timings_s"] = {"attention_maps": t_maps, "total": time.perf_counter() - t0}
    from scgpt_train.evaluation.report import write_json

    write_json({k: v for k, v in summary.items() if k not in ("table", "report")}, Path(out_dir) / "summary.json")
    return summary


# compute ---------------------------------------------------------------------------------------------------------
def _setup(checkpoint, adata, resource, tf_targets, p: AttentionGRNParams) -> _Setup:
    """The data checked, the model loaded, the gene panel built, sources / settings resolved, cells sampled."""
    import anndata as ad

    from scgpt_train.inference import check_expression, read_h5ad_checked

    where = "the AnnData"
    if not isinstance(adata, ad.AnnData):
        where, adata = str(adata), read_h5ad_checked(adata, "--adata", GRNError)
    else:
        check_expression(adata, where, GRNError)
    model, vocab = load_grn_model(checkpoint)
    style = input_style(model, p.style)
    panel = build_panel(
        adata, vocab, genes=p.genes, max_genes=p.max_genes, gene_column=p.gene_column,
        condition_key=p.condition_key, where=where,
    )  # fmt: skip
    if len(panel.genes) < 3:
        raise GRNError(f"only {len(panel.genes)} genes can be tested; need at least 3")
    srcs = resolve_sources(p.sources, panel.genes, resource, max(1, p.min_targets), tf_targets)
    conds = panel.conditions
    if p.condition_key is None:
        ctrl_name, settings = "all", ["control"] if p.settings is None else list(p.settings)
        if set(settings) - {"control"}:
            raise GRNError("settings perturbed / difference need --condition-key (which cells are perturbed)")
        pert_of = {}
    else:
        ctrl_name = p.control
        if not (conds == p.control).any():
            raise GRNError(
                f"no cell has {p.condition_key} == {p.control!r} (values: {sorted(set(conds))[:10]}); "
                "name the control with --control"
            )
        pert_of = {s: (p.perturbed or {}).get(s) or perturbed_condition_of(s, conds) for s in srcs}
        settings = list(SETTINGS if p.settings is None else p.settings)
        if set(settings) - {"control"}:
            lacking = [s for s in srcs if pert_of[s] is None]
            if lacking and len(lacking) == len(srcs):
                raise GRNError(
                    f"no condition perturbs the source gene(s) {lacking[:5]}; settings perturbed / "
                    "difference need their cells (or use --setting control)"
                )
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise GRNError(f"--setting must be among {SETTINGS}, got {sorted(unknown)}")
    setup = _Setup(where, model, vocab, style, panel, srcs, settings, ctrl_name, pert_of, {})
    setup.rows = {c: _sample(np.flatnonzero(conds == c), p.max_cells, p.seed) for c in setup.needed}
    return setup


def _attention_maps(setup: _Setup, p: AttentionGRNParams):
    """The mean attention map of every condition needed (:func:`condition_attention`)."""
    import torch
    from tqdm.auto import tqdm

    cells = np.sort(np.concatenate([setup.rows[c] for c in setup.needed]))
    m = len(setup.panel.genes) + setup.offset
    if p.progress:
        print(
            f"{len(setup.panel.genes)} genes, {len(setup.sources)} source gene(s), {len(cells)} cells "
            f"({setup.style} input, M = {m})"
        )
    torch.manual_seed(p.seed)
    bar = tqdm(total=len(cells), unit="cell", desc="attention maps", disable=not p.progress)
    batches = token_batches(
        setup.model, setup.vocab, setup.panel, cells, style=setup.style, batch_size=p.batch_size, seed=p.seed
    )
    means = condition_attention(
        setup.model, batches, m, layer=p.layer, softmax=p.softmax, rank=p.rank, device=p.device, progress=bar.update
    )
    bar.close()
    return means


# tables ----------------------------------------------------------------------------------------------------------
def _target_rows(source: str, setting: str, method: str, selected, known, genes) -> list[dict]:
    """One row per selected target: its rank, gene and whether the resource knows it."""
    return [
        {"source": source, "setting": setting, "method": method, "rank": r + 1, "gene": genes[g],
         "known_target": bool(known[g])}
        for r, g in enumerate(selected)
    ]  # fmt: skip


def _score(setup: _Setup, means, resource, p: AttentionGRNParams) -> tuple[list[dict], list[dict]]:
    """(records: one per source x setting x method, with the overlap statistics; target rows: the top K of each)."""
    from scgpt_train.evaluation.baselines import log_normalized

    panel, genes = setup.panel, setup.panel.genes
    x_log = log_normalized(panel.x, setup.where).toarray()
    pos = {g: i for i, g in enumerate(genes)}
    records, target_rows = [], []
    ctrl_map = means.mean(setup.control)
    for s in setup.sources:
        si = pos[s]
        cand = np.ones(len(genes), dtype=bool)
        cand[si] = False
        known = np.array([g in resource.get(s, set()) for g in genes]) & cand
        pc = setup.perturbed_of.get(s)
        pert_map = means.mean(pc) if pc is not None else None
        x_ctrl = x_log[setup.rows[setup.control]]
        x_pert = x_log[setup.rows[pc]] if pc is not None else None
        for setting in setup.settings:
            if setting != "control" and pc is None:
                continue
            cells_of = {"control": x_ctrl, "perturbed": x_pert, "difference": None}[setting]
            expr = (cells_of if cells_of is not None else np.vstack([x_ctrl, x_pert])).mean(0)
            base = {
                "source": s,
                "setting": setting,
                "perturbed_condition": pc,
                "known_targets_in_panel": int(known.sum()),
            }
            scores = attention_scores(ctrl_map, pert_map, si, setting, setup.offset, p.direction)
            sel = top_k(scores, cand, p.top)
            rec = {**base, "method": "attention", **overlap_stats(sel, known, cand)}
            rnd = random_matched_overlaps(sel, known, cand, expr, p.n_random, p.seed)
            rec["random_mean_overlap"] = float(rnd.mean())
            rec["p_random"] = float((1 + (rnd >= rec["overlap"]).sum()) / (1 + p.n_random))
            records.append(rec)
            records.append(
                {
                    **base,
                    "method": "random",
                    "k": rec["k"],
                    "overlap": float(rnd.mean()),
                    "overlap_sd": float(rnd.std()),
                    "n_background": rec["n_background"],
                    "n_known_targets": rec["n_known_targets"],
                    "expected": rec["expected"],
                }
            )
            target_rows += _target_rows(s, setting, "attention", sel, known, genes)
            scorers = {"coexpression": coexpression_scores(x_ctrl, x_pert, si, setting)}
            if setting != "control":
                scorers["de"] = de_scores(x_ctrl, x_pert)
            for name, sc in scorers.items():
                bsel = top_k(sc, cand, p.top)
                records.append({**base, "method": name, **overlap_stats(bsel, known, cand)})
                target_rows += _target_rows(s, setting, name, bsel, known, genes)
    return records, target_rows


# report ----------------------------------------------------------------------------------------------------------
def _write_outputs(setup: _Setup, means, records, target_rows, checkpoint, tf_targets, out_dir, p) -> dict:
    """summary.tsv, targets.tsv (attention_maps.npz), the figures and report.md; returns the summary."""
    from scgpt_train.evaluation.report import markdown_table, write_text

    table = pd.DataFrame(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "summary.tsv", sep="\t", index=False)
    pd.DataFrame(target_rows).to_csv(out_dir / "targets.tsv", sep="\t", index=False)
    if p.save_maps:
        np.savez_compressed(
            out_dir / "attention_maps.npz",
            genes=np.asarray(setup.panel.genes),
            offset=setup.offset,
            **{f"mean__{c}": means.mean(c) for c in setup.needed},
        )
    agg = aggregate(table)
    figures = [plot_precision(agg, out_dir / "grn_precision.png", p.top)]
    att_records = [r for r in records if r["method"] == "attention"]
    # the network figure: the source with most known targets in its top K (the difference setting first)
    first = max(att_records, key=lambda r: (r["setting"] == "difference", r["overlap"])) if att_records else None
    if first is not None:
        sub = pd.DataFrame(target_rows)
        sub = sub[(sub.source == first["source"]) & (sub.setting == first["setting"]) & (sub.method == "attention")]
        figures.append(plot_targets(first["source"], sub, out_dir / "grn_network.png", first["setting"]))
    summary = {
        "checkpoint": str(checkpoint),
        "data": setup.where,
        "tf_targets": str(tf_targets),
        "input_style": setup.style,
        "n_genes": len(setup.panel.genes),
        "genes_left_out": setup.panel.left_out,
        "sources": setup.sources,
        "perturbed_conditions": {s: c for s, c in setup.perturbed_of.items() if c is not None},
        "settings": setup.settings,
        "cells_per_condition": {c: int(len(r)) for c, r in setup.rows.items()},
        "scored_cells_per_condition": {c: int(means.counts.get(c, 0)) for c in setup.needed},
        "params": {
            "top_k": p.top,
            "n_random": p.n_random,
            "layer": p.layer,
            "softmax": p.softmax,
            "rank_normalize": p.rank,
            "direction": p.direction,
            "batch_size": p.batch_size,
            "max_cells": p.max_cells,
            "seed": p.seed,
        },
        "timings_s": {},
        "aggregate": agg.to_dict(orient="records"),
        "figures": [str(f) for f in figures],
    }
    text = report_text(summary, agg, table, markdown_table)
    write_text(text, out_dir / "report.md")
    summary["table"] = table
    summary["report"] = text
    return summary


def aggregate(table: pd.DataFrame) -> pd.DataFrame:
    """Per setting x method: sources, mean precision@K (overlap / k), summed overlap vs expected, sources with
    hypergeometric p < 0.05 (attention and the ranked baselines)."""
    rows = []
    for (setting, method), g in table.groupby(["setting", "method"], sort=False):
        p = g["p_hypergeom"] if "p_hypergeom" in g else pd.Series(dtype=float)
        rows.append(
            {
                "setting": setting,
                "method": method,
                "n_sources": int(len(g)),
                "precision_at_k": float((g["overlap"] / g["k"].clip(lower=1)).mean()),
                "overlap_total": float(g["overlap"].sum()),
                "expected_total": float(g["expected"].sum()),
                "n_sources_p05": None if p.isna().all() else int((p < 0.05).sum()),
                "median_p": None if p.isna().all() else float(p.median()),
            }
        )
    return pd.DataFrame(rows)


def report_text(summary: dict, agg: pd.DataFrame, table: pd.DataFrame, markdown_table) -> str:
    par = summary["params"]
    lines = [
        "# Attention GRN\n",
        f"Checkpoint `{summary['checkpoint']}`, data `{summary['data']}` ({summary['n_genes']} genes, "
        f"{summary['input_style']} input), TF-target resource `{Path(summary['tf_targets']).name}`. Last-layer "
        f"q.k^T per head ({'softmax' if par['softmax'] else 'unscaled, no softmax'}), "
        f"{'row-then-column rank normalization, ' if par['rank_normalize'] else ''}head mean, averaged over every "
        f"cell of a condition (cells: {summary['scored_cells_per_condition']}). Top {par['top_k']} genes by "
        f"{par['direction']} of the source; hypergeometric p against the source's known targets among the panel "
        f"(background: panel genes except the source); random = {par['n_random']} expression-matched draws.\n",
        "## Summary over source genes\n",
        markdown_table(
            [
                "setting",
                "method",
                "sources",
                f"precision@{par['top_k']}",
                "overlap (sum)",
                "expected (sum)",
                "sources p < 0.05",
                "median p",
            ],
            [
                [
                    r["setting"],
                    METHOD_NAMES.get(r["method"], r["method"]),
                    r["n_sources"],
                    r["precision_at_k"],
                    f"{r['overlap_total']:.1f}",
                    f"{r['expected_total']:.1f}",
                    _count(r["n_sources_p05"]),
                    _p(r["median_p"]),
                ]
                for r in agg.to_dict(orient="records")
            ],
        ),
        "\n## Per source gene (attention)\n",
    ]
    att = table[table["method"] == "attention"].head(40)
    lines.append(
        markdown_table(
            [
                "source",
                "setting",
                "known targets in panel",
                "overlap",
                "expected",
                "p (hypergeom.)",
                "random mean overlap",
                "p (random)",
            ],
            [
                [
                    r.source,
                    r.setting,
                    int(r.known_targets_in_panel),
                    int(r.overlap),
                    r.expected,
                    _p(r.p_hypergeom),
                    r.random_mean_overlap,
                    _p(r.p_random),
                ]
                for r in att.itertuples()
            ],
        )
    )
    if summary["figures"]:
        lines.append("\n## Figures\n\n" + "".join(f"![{Path(f).stem}]({Path(f).name})\n" for f in summary["figures"]))
    return "\n".join(lines)


def _count(v) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else str(int(v))


def _p(v) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{float(v):.3g}"


def plot_precision(agg: pd.DataFrame, path, k: int) -> Path:
    """Mean precision@K per method, one group of bars per setting."""
    from scgpt_train.evaluation.figures import pyplot, save_figure

    plt = pyplot()

    settings = list(dict.fromkeys(agg["setting"]))
    methods = list(dict.fromkeys(agg["method"]))
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(settings), 3.2))
    w = 0.8 / max(len(methods), 1)
    for i, mth in enumerate(methods):
        vals = [agg[(agg.setting == s) & (agg.method == mth)]["precision_at_k"].sum() for s in settings]
        ax.bar(np.arange(len(settings)) + i * w, vals, w, label=METHOD_NAMES.get(mth, mth))
    ax.set_xticks(np.arange(len(settings)) + w * (len(methods) - 1) / 2, settings)
    ax.set_ylabel(f"known targets in top {k} / {k}")
    ax.legend(fontsize=7, frameon=False)
    ax.set_title("attention GRN vs baselines (mean over source genes)", fontsize=9)
    return save_figure(fig, Path(path))


def plot_targets(source: str, rows: pd.DataFrame, path, setting: str) -> Path:
    """The source gene and its top targets as a star; known targets highlighted."""
    from scgpt_train.evaluation.figures import pyplot, save_figure

    plt = pyplot()

    n = len(rows)
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    fig, ax = plt.subplots(figsize=(5, 5))
    for a, (_, r) in zip(ang, rows.iterrows(), strict=True):
        x, y = np.cos(a), np.sin(a)
        hit = bool(r["known_target"])
        ax.plot([0, x], [0, y], color="slateblue" if hit else "lightgrey", lw=2.5 if hit else 1, zorder=1)
        ax.text(1.1 * x, 1.1 * y, r["gene"], ha="center", va="center", fontsize=7, fontweight="bold" if hit else None)
    ax.scatter([0], [0], s=500, color="salmon", zorder=2)
    ax.text(0, 0, source, ha="center", va="center", fontsize=8, fontweight="bold", zorder=3)
    ax.set_xlim(-1.35, 1.35)
    ax.set_ylim(-1.35, 1.35)
    ax.axis("off")
    ax.set_title(f"{source}: top {n} attention targets ({setting}); blue = known target", fontsize=9)
    return save_figure(fig, Path(path))
