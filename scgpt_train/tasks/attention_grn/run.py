"""The whole attention-GRN run: mean attention maps per condition, top-K targets per source gene and setting,
the resource check with baselines beside it, tables, report and figures."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from scgpt_train.tasks.attention_grn.common import (
    CONTROL,
    DEFAULT_N_RANDOM,
    DEFAULT_TOP_K,
    SETTINGS,
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


def run_attention_grn(
    checkpoint,
    adata,
    tf_targets,
    out_dir,
    *,
    sources: Sequence[str] | str = "auto",
    condition_key: str | None = None,
    control: str = CONTROL,
    perturbed: Mapping[str, str] | None = None,
    settings: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    max_genes: int = 1200,
    gene_column: str | None = None,
    top: int = DEFAULT_TOP_K,
    n_random: int = DEFAULT_N_RANDOM,
    min_targets: int = 1,
    layer: int = -1,
    softmax: bool = False,
    rank: bool = True,
    direction: str = "column",
    style: str = "auto",
    batch_size: int = 8,
    max_cells: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    save_maps: bool = False,
    progress: bool = True,
) -> dict:
    """Attention GRN of ``checkpoint`` on ``adata`` (an AnnData or an h5ad path); writes ``out_dir`` (docs/grn.md)
    and returns the summary (``summary["table"]``: one row per source x setting x method)."""
    import anndata as ad
    import torch

    from scgpt_train.evaluation.baselines import log_normalized
    from scgpt_train.evaluation.report import markdown_table, write_json, write_text
    from scgpt_train.inference import check_expression, read_h5ad_checked

    say = print if progress else (lambda *a, **k: None)
    t0 = time.perf_counter()
    where = "the AnnData"
    if not isinstance(adata, ad.AnnData):
        where, adata = str(adata), read_h5ad_checked(adata, "--adata", GRNError)
    else:
        check_expression(adata, where, GRNError)
    resource = read_tf_targets(tf_targets)
    model, vocab = load_grn_model(checkpoint)
    style = input_style(model, style)
    panel = build_panel(
        adata,
        vocab,
        genes=genes,
        max_genes=max_genes,
        gene_column=gene_column,
        condition_key=condition_key,
        where=where,
    )
    if len(panel.genes) < 3:
        raise GRNError(f"only {len(panel.genes)} genes can be tested; need at least 3")
    srcs = resolve_sources(sources, panel.genes, resource, max(1, min_targets), tf_targets)
    conds = panel.conditions
    if condition_key is None:
        ctrl_name, settings = "all", ["control"] if settings is None else list(settings)
        if set(settings) - {"control"}:
            raise GRNError("settings perturbed / difference need --condition-key (which cells are perturbed)")
        pert_of = {}
    else:
        ctrl_name = control
        if not (conds == control).any():
            raise GRNError(
                f"no cell has {condition_key} == {control!r} (values: {sorted(set(conds))[:10]}); "
                "name the control with --control"
            )
        pert_of = {s: (perturbed or {}).get(s) or perturbed_condition_of(s, conds) for s in srcs}
        settings = list(SETTINGS if settings is None else settings)
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
    needed = [ctrl_name] + sorted({c for c in pert_of.values() if c is not None})
    rows = {c: _sample(np.flatnonzero(conds == c), max_cells, seed) for c in needed}
    cells = np.sort(np.concatenate([rows[c] for c in needed]))
    offset = 1 if style == "cls" else 0
    m = len(panel.genes) + offset
    say(f"{len(panel.genes)} genes, {len(srcs)} source gene(s), {len(cells)} cells ({style} input, M = {m})")

    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    bar = tqdm(total=len(cells), unit="cell", desc="attention maps", disable=not progress)
    t_maps = time.perf_counter()
    means = condition_attention(
        model,
        token_batches(model, vocab, panel, cells, style=style, batch_size=batch_size, seed=seed),
        m,
        layer=layer,
        softmax=softmax,
        rank=rank,
        device=device,
        progress=bar.update,
    )
    bar.close()
    t_maps = time.perf_counter() - t_maps

    x_log = log_normalized(panel.x, where).toarray()
    pos = {g: i for i, g in enumerate(panel.genes)}
    records, target_rows = [], []
    ctrl_map = means.mean(ctrl_name)
    for s in srcs:
        si = pos[s]
        cand = np.ones(len(panel.genes), dtype=bool)
        cand[si] = False
        known = np.array([g in resource.get(s, set()) for g in panel.genes]) & cand
        pc = pert_of.get(s)
        pert_map = means.mean(pc) if pc is not None else None
        x_ctrl = x_log[rows[ctrl_name]]
        x_pert = x_log[rows[pc]] if pc is not None else None
        for setting in settings:
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
            sel = top_k(attention_scores(ctrl_map, pert_map, si, setting, offset, direction), cand, top)
            rec = {**base, "method": "attention", **overlap_stats(sel, known, cand)}
            rnd = random_matched_overlaps(sel, known, cand, expr, n_random, seed)
            rec["random_mean_overlap"] = float(rnd.mean())
            rec["p_random"] = float((1 + (rnd >= rec["overlap"]).sum()) / (1 + n_random))
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
            target_rows += [
                {
                    "source": s,
                    "setting": setting,
                    "method": "attention",
                    "rank": r + 1,
                    "gene": panel.genes[g],
                    "known_target": bool(known[g]),
                }
                for r, g in enumerate(sel)
            ]
            scorers = {"coexpression": coexpression_scores(x_ctrl, x_pert, si, setting)}
            if setting != "control":
                scorers["de"] = de_scores(x_ctrl, x_pert)
            for name, sc in scorers.items():
                bsel = top_k(sc, cand, top)
                records.append({**base, "method": name, **overlap_stats(bsel, known, cand)})
                target_rows += [
                    {
                        "source": s,
                        "setting": setting,
                        "method": name,
                        "rank": r + 1,
                        "gene": panel.genes[g],
                        "known_target": bool(known[g]),
                    }
                    for r, g in enumerate(bsel)
                ]
    table = pd.DataFrame(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "summary.tsv", sep="\t", index=False)
    pd.DataFrame(target_rows).to_csv(out_dir / "targets.tsv", sep="\t", index=False)
    if save_maps:
        np.savez_compressed(
            out_dir / "attention_maps.npz",
            genes=np.asarray(panel.genes),
            offset=offset,
            **{f"mean__{c}": means.mean(c) for c in needed},
        )
    agg = aggregate(table)
    figures = [plot_precision(agg, out_dir / "grn_precision.png", top)]
    att_records = [r for r in records if r["method"] == "attention"]
    # the network figure: the source with most known targets in its top K (the difference setting first)
    first = max(att_records, key=lambda r: (r["setting"] == "difference", r["overlap"])) if att_records else None
    if first is not None:
        sub = pd.DataFrame(target_rows)
        sub = sub[(sub.source == first["source"]) & (sub.setting == first["setting"]) & (sub.method == "attention")]
        figures.append(plot_targets(first["source"], sub, out_dir / "grn_network.png", first["setting"]))
    summary = {
        "checkpoint": str(checkpoint),
        "data": where,
        "tf_targets": str(tf_targets),
        "input_style": style,
        "n_genes": len(panel.genes),
        "genes_left_out": panel.left_out,
        "sources": srcs,
        "perturbed_conditions": {s: c for s, c in pert_of.items() if c is not None},
        "settings": settings,
        "cells_per_condition": {c: int(len(r)) for c, r in rows.items()},
        "scored_cells_per_condition": {c: int(means.counts.get(c, 0)) for c in needed},
        "params": {
            "top_k": top,
            "n_random": n_random,
            "layer": layer,
            "softmax": softmax,
            "rank_normalize": rank,
            "direction": direction,
            "batch_size": batch_size,
            "max_cells": max_cells,
            "seed": seed,
        },
        "timings_s": {"attention_maps": t_maps, "total": time.perf_counter() - t0},
        "aggregate": agg.to_dict(orient="records"),
        "figures": [str(f) for f in figures],
    }
    write_json(summary, out_dir / "summary.json")
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
