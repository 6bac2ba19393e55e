"""Reverse perturbation with a fine-tuned model: which perturbation produced these cells?

The scGPT paper's protocol (Norman data) with the scoring, chance levels and baselines of :mod:`.reverse`:

1. the gene subspace: the ``n_genes`` (20) genes occurring most often in the training and test conditions (the
   validation conditions count too when fewer genes occur there); candidates are every single and pair of them
   (210 for 20 genes);
2. the model predicts ``pool_size`` (40) seeded control cells for every candidate (:func:`.predict.predict_expression`);
3. the queries are the real cells of the held-out conditions inside the subspace (the split's test conditions by
   default); each query cell retrieves its nearest predicted cells (Euclidean), votes are pooled per query
   condition, candidates ranked;
4. ``correct@K`` / ``relevant@K`` for K = 1..8 beside the analytic chance levels and the baselines: a random
   ranking, the query's top-2 DE candidate genes, the candidate genes' own expression change ("oracle": direct
   target read-out, ``direction`` up for CRISPRa, down for CRISPRi / knock-down), and the model's retrieval with
   the 20 candidate genes masked out of the distances (does the model's retrieval need the targets' own values?).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from data_modules.perturbation.conditions import CTRL
from data_modules.perturbation.inputs import flag_columns, gene_positions, map_data_genes
from data_modules.perturbation.pairing import sample_controls
from scgpt_train.tasks.perturbation import reverse as R
from scgpt_train.tasks.perturbation.predict import predict_expression

log = logging.getLogger(__name__)

METHODS = {
    "scgpt": "scGPT retrieval",
    "scgpt_masked": "scGPT retrieval, candidate genes masked",
    "top_de": "top-2 DE genes of the query",
    "oracle": "candidate-gene expression oracle",
    "random": "random ranking",
    "chance": "chance (analytic)",
}
QUERY_SPLITS = ("test", "val", "test+val")


@dataclass
class ReverseResult:
    genes: list[str]
    subspace_from: str
    candidates: list[str]
    queries: list[str]
    summaries: dict[str, pd.DataFrame]  # method -> rows K, columns correct / relevant
    per_query: dict[str, pd.DataFrame]
    chance: pd.DataFrame
    rankings: dict[str, dict[str, list[str]]]

    def table(self) -> pd.DataFrame:
        """Long table: method, K, correct, relevant (chance included as method ``chance``)."""
        rows = []
        for method, s in {**self.summaries, "chance": self.chance}.items():
            for k, r in s.iterrows():
                rows.append({"method": method, "K": int(k), "correct": r["correct"], "relevant": r["relevant"]})
        return pd.DataFrame(rows)


def query_conditions(split, genes, which: str = "test") -> list[str]:
    if which not in QUERY_SPLITS:
        raise ValueError(f"queries must be one of {QUERY_SPLITS}, got {which!r}")
    pool = [*(split.test if "test" in which else []), *(split.val if "val" in which else [])]
    return [c for c in pool if c != CTRL and R.in_subspace(c, genes)]


def reverse_perturbation(
    model,
    vocab,
    data,
    split,
    queries: str = "test",
    n_genes: int = R.N_SUBSPACE_GENES,
    pool_size: int = R.POOL_SIZE,
    n_neighbors: int = R.N_NEIGHBORS,
    direction: str = "abs",
    seed: int = 0,
    batch_size: int = 64,
    unknown_genes: str = "pad",
    device: str | torch.device = "cpu",
) -> ReverseResult:
    """Run the protocol on a ``PerturbationData`` with a ``PerturbationSplit`` (see the module docstring)."""
    try:
        genes, subspace_from = R.subspace_genes([*split.train, *split.test], n_genes), "train + test"
    except ValueError:  # fewer genes than asked occur outside validation: count the validation conditions too
        genes, subspace_from = R.subspace_genes([*split.train, *split.val, *split.test], n_genes), "train + val + test"
        log.warning("only the train + val + test conditions hold %d perturbed genes; subspace from all three", n_genes)
    candidates = R.candidate_conditions(genes)
    asked = query_conditions(split, genes, queries)
    if not asked:
        raise ValueError(
            f"no {queries} condition of {data.source} lies in the {n_genes}-gene subspace {genes}; nothing to query"
        )
    names = data.gene_names
    index = gene_positions(names)
    tokens = map_data_genes(names, vocab, unknown_genes, data.source)
    x = data.adata.X
    pool = sample_controls(data.control_cells, pool_size, seed)
    ctrl_x = np.asarray(x[pool].toarray(), dtype=np.float32)
    reference, ref_labels = [], []
    for cand in candidates:
        flags = flag_columns(cand, index, data.source)
        reference.append(
            predict_expression(model, ctrl_x, [flags] * len(pool), tokens, batch_size, "all", True, device)
        )
        ref_labels += [cand] * len(pool)
    reference = np.concatenate(reference)
    q_cells = np.concatenate([data.cells(c) for c in asked])
    q_labels = data.cell_conditions[q_cells]
    q_x = np.asarray(x[q_cells].toarray(), dtype=np.float64)
    all_ctrl = np.asarray(x[data.control_cells].toarray(), dtype=np.float64)
    ctrl_mean = all_ctrl.mean(axis=0)
    q_means = {c: q_x[q_labels == c].mean(axis=0) for c in asked}
    rankings = {
        "scgpt": R.retrieve(reference, ref_labels, q_x, q_labels, n_neighbors),
        "scgpt_masked": R.retrieve(reference, ref_labels, q_x, q_labels, n_neighbors, R.genes_without(names, genes)),
        "top_de": R.top_de_rankings(q_x, q_labels, all_ctrl, names, candidates),
        "oracle": R.expression_oracle_rankings(q_means, ctrl_mean, names, candidates, direction),
        "random": R.random_rankings(asked, candidates, seed),
    }
    summaries, per_query = {}, {}
    for method, ranking in rankings.items():
        summaries[method], per_query[method] = R.score_rankings(ranking)
    return ReverseResult(
        genes=genes, subspace_from=subspace_from, candidates=candidates, queries=asked, summaries=summaries,
        per_query=per_query, chance=R.chance_levels(asked, candidates), rankings=rankings,
    )  # fmt: skip


def plot_topk(means: pd.DataFrame, path, sds: pd.DataFrame | None = None):
    """correct@K and relevant@K curves per method (``means``: columns method, K, correct, relevant)."""
    from scgpt_train.evaluation.figures import pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, what in zip(axes, ("correct", "relevant"), strict=True):
        for method in dict.fromkeys(means["method"]):
            m = means[means["method"] == method]
            err = None if sds is None else sds[sds["method"] == method][what].to_numpy()
            style = {"linestyle": "--", "color": "grey"} if method == "chance" else {}
            ax.errorbar(m["K"], m[what], yerr=err, marker="o", ms=3, capsize=2,
                        label=METHODS.get(method, method), **style)  # fmt: skip
        ax.set_xlabel("K")
        ax.set_ylabel(f"{what}@K")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{what} hit in the top K")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def markdown(result_means: pd.DataFrame, result_sds: pd.DataFrame | None, ks=(1, 2, 4, 8)) -> str:
    """Table: one row per method, correct@K and relevant@K columns (mean +- sd over runs when ``sds``)."""
    from scgpt_train.evaluation.report import markdown_table

    header = ["method"] + [f"correct@{k}" for k in ks] + [f"relevant@{k}" for k in ks]
    rows = []
    for method in dict.fromkeys(result_means["method"]):
        m = result_means[result_means["method"] == method].set_index("K")
        s = None if result_sds is None else result_sds[result_sds["method"] == method].set_index("K")

        def cell(what, k, m=m, s=s):
            v = m.loc[k, what]
            return f"{v:.3f}" if s is None or not np.isfinite(s.loc[k, what]) else f"{v:.3f} ± {s.loc[k, what]:.3f}"

        rows.append([METHODS.get(method, method)] + [cell("correct", k) for k in ks]
                    + [cell("relevant", k) for k in ks])  # fmt: skip
    return markdown_table(header, rows)


def write_outputs(result: ReverseResult, out_dir, title: str, notes: list[str] | None = None) -> str:
    """One run's ``report.md``, ``reverse_results.csv`` (method x K), ``per_query.csv``, ``rankings.json`` and
    ``reverse_topk.png`` in ``out_dir``; returns the report text."""
    from pathlib import Path

    from scgpt_train.evaluation.report import write_json, write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = result.table()
    write_text(table.to_csv(index=False), out_dir / "reverse_results.csv")
    per_query = pd.concat([q.assign(method=m).reset_index() for m, q in result.per_query.items()], ignore_index=True)
    write_text(per_query.to_csv(index=False), out_dir / "per_query.csv")
    write_json(
        {"genes": result.genes, "candidates": result.candidates, "queries": result.queries,
         "rankings": {m: {q: r[:20] for q, r in rk.items()} for m, rk in result.rankings.items()}},
        out_dir / "rankings.json",
    )  # fmt: skip
    plot_topk(table, out_dir / "reverse_topk.png")
    lines = [
        f"# {title}",
        "",
        *[f"- {n}" for n in notes or []],
        f"- Gene subspace ({len(result.genes)} genes, most frequent in the {result.subspace_from} conditions): "
        f"{', '.join(result.genes)}; {len(result.candidates)} candidates.",
        f"- Query conditions ({len(result.queries)}): {', '.join(result.queries)}.",
        f"- A random guesser needs {R.expected_rank(len(result.candidates)):.1f} tries on average.",
        "",
        markdown(table, None),
        "![reverse_topk.png](reverse_topk.png)",
        "",
    ]
    text = "\n".join(lines)
    write_text(text, out_dir / "report.md")
    return text
