"""Hypergeometric over-representation of gene sets in programs, Bonferroni-corrected."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from scgpt_train.tasks.gene_programs.common import MIN_TERM_GENES, GeneProgramError


@dataclass
class EnrichmentResult:
    table: pd.DataFrame  # one row per program x tested term with overlap >= 1
    n_tests: int  # programs x tested terms: the Bonferroni factor
    n_terms_tested: int
    n_terms_skipped: int  # terms with < min_term_genes genes in the background
    background: list[str]


def check_gene_sets(gene_sets: Mapping[str, Sequence[str]], vocab_genes, tested, where: str) -> None:
    """Refuse gene sets that share no gene with the vocabulary, or no gene with the tested genes."""
    all_genes = {g for s in gene_sets.values() for g in s}
    vocab_set = set(vocab_genes)
    if not all_genes & vocab_set:
        raise GeneProgramError(
            f"{where}: none of its {len(all_genes)} genes (e.g. {sorted(all_genes)[:3]}) is in the checkpoint's "
            f"vocabulary (e.g. {list(vocab_genes)[:3]}); the gene sets and the checkpoint must name genes the same "
            "way (symbols vs Ensembl ids, human vs mouse)"
        )
    if not all_genes & set(tested):
        raise GeneProgramError(
            f"{where}: none of its genes is among the {len(tested)} tested genes (e.g. {list(tested)[:3]}); test "
            "more genes (--n-hvg, --genes) or use gene sets of this tissue"
        )


def enrichment(
    programs: Mapping[str, Sequence[str]],
    gene_sets: Mapping[str, Sequence[str]],
    background: Sequence[str],
    min_term_genes: int = MIN_TERM_GENES,
) -> EnrichmentResult:
    """Hypergeometric over-representation of every term in every program, background = ``background`` (the tested
    genes): p = P(X >= overlap), X ~ Hypergeom(M = |background|, n = |term ∩ background|, N = |program|);
    Bonferroni over programs x tested terms (terms with >= ``min_term_genes`` background genes)."""
    from scipy.stats import hypergeom

    bg = list(dict.fromkeys(background))
    pos = {g: i for i, g in enumerate(bg)}
    m = len(bg)
    names = list(programs)
    prog = np.zeros((len(names), m), dtype=bool)
    for i, name in enumerate(names):
        outside = [g for g in programs[name] if g not in pos]
        if outside:
            raise GeneProgramError(f"program {name}: genes outside the background {outside[:5]}")
        prog[i, [pos[g] for g in programs[name]]] = True
    terms = [(t, [pos[g] for g in dict.fromkeys(genes) if g in pos]) for t, genes in gene_sets.items()]
    tested = [(t, cols) for t, cols in terms if len(cols) >= min_term_genes]
    term_mat = np.zeros((len(tested), m), dtype=bool)
    for j, (_, cols) in enumerate(tested):
        term_mat[j, cols] = True
    overlap = prog.astype(np.int64) @ term_mat.T.astype(np.int64)  # (P, T)
    n_prog = prog.sum(1)  # (P,)
    n_term = term_mat.sum(1)  # (T,)
    n_tests = len(names) * len(tested)
    rows = []
    pi, tj = np.nonzero(overlap)
    if len(pi):
        k = overlap[pi, tj]
        p = hypergeom.sf(k - 1, m, n_term[tj], n_prog[pi])
        for a, b, kk, pv in zip(pi, tj, k, p, strict=True):
            genes = [bg[c] for c in np.flatnonzero(prog[a] & term_mat[b])]
            rows.append(
                {
                    "program": names[a],
                    "term": tested[b][0],
                    "n_program": int(n_prog[a]),
                    "n_term_background": int(n_term[b]),
                    "n_background": m,
                    "overlap": int(kk),
                    "expected": float(n_prog[a] * n_term[b] / m),
                    "p_value": float(pv),
                    "p_bonferroni": float(min(1.0, pv * n_tests)),
                    "overlap_genes": ",".join(genes),
                }
            )
    cols = [
        "program",
        "term",
        "n_program",
        "n_term_background",
        "n_background",
        "overlap",
        "expected",
        "p_value",
        "p_bonferroni",
        "overlap_genes",
    ]
    table = pd.DataFrame(rows, columns=cols).sort_values(["p_value", "program", "term"], ignore_index=True)
    return EnrichmentResult(table, n_tests, len(tested), len(terms) - len(tested), bg)
