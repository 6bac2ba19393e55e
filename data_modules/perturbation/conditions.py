"""Perturbation condition names, GEARS style: ``ctrl``, ``A+ctrl`` (one gene), ``A+B`` (two genes).

One canonical spelling per condition: the genes sorted, a single gene written ``A+ctrl`` (so ``ctrl+A`` and
``A+ctrl`` are the same condition, and so are ``B+A`` and ``A+B``), no perturbation at all written ``ctrl``.
Gene names are case-sensitive and kept as given (``ctrl`` is the only reserved word). At most two genes per
condition (GEARS' datasets and models handle singles and pairs only).
"""

from __future__ import annotations

from collections.abc import Iterable

from data_modules.errors import UserInputError

CTRL = "ctrl"
SEP = "+"
MAX_GENES = 2


class ConditionError(UserInputError):
    """A condition name that cannot be parsed (names the condition and why)."""


def condition_genes(condition: str) -> tuple[str, ...]:
    """The perturbed genes of ``condition``, sorted: ``()`` for ``ctrl``, ``("A",)``, ``("A", "B")``."""
    if not isinstance(condition, str):
        raise ConditionError(f"condition {condition!r} is not a string")
    text = condition.strip()
    if not text:
        raise ConditionError(f"condition {condition!r} is empty")
    parts = [p.strip() for p in text.split(SEP)]
    if any(not p for p in parts):
        raise ConditionError(f"condition {condition!r} has an empty part (expected 'ctrl', 'A+ctrl' or 'A+B')")
    genes = [p for p in parts if p != CTRL]
    if len(parts) > MAX_GENES:
        raise ConditionError(
            f"condition {condition!r} has {len(parts)} parts; at most {MAX_GENES} (a single 'A+ctrl' or a pair 'A+B')"
        )
    if len(set(genes)) != len(genes):
        raise ConditionError(f"condition {condition!r} names the same gene twice")
    bad = [g for g in genes if any(ch.isspace() for ch in g)]
    if bad:
        raise ConditionError(f"condition {condition!r}: gene name {bad[0]!r} contains whitespace")
    return tuple(sorted(genes))


def normalize_condition(condition: str) -> str:
    """The canonical spelling: ``ctrl+A`` -> ``A+ctrl``, ``B+A`` -> ``A+B``, ``ctrl+ctrl`` -> ``ctrl``."""
    return condition_name(condition_genes(condition))


def condition_name(genes: Iterable[str]) -> str:
    """Canonical condition name of a set of perturbed genes (0, 1 or 2 genes)."""
    genes = sorted(genes)
    if len(genes) == 0:
        return CTRL
    if len(genes) == 1:
        return f"{genes[0]}{SEP}{CTRL}"
    if len(genes) == 2:
        if genes[0] == genes[1]:
            raise ConditionError(f"a pair needs two different genes, got {genes}")
        return f"{genes[0]}{SEP}{genes[1]}"
    raise ConditionError(f"at most {MAX_GENES} genes per condition, got {genes}")


def normalize_conditions(conditions: Iterable[str]) -> list[str]:
    """:func:`normalize_condition` over a sequence (order and repeats kept)."""
    cache: dict[str, str] = {}
    out = []
    for c in conditions:
        if c not in cache:
            cache[c] = normalize_condition(c)
        out.append(cache[c])
    return out


def is_control(condition: str) -> bool:
    return len(condition_genes(condition)) == 0


def is_single(condition: str) -> bool:
    return len(condition_genes(condition)) == 1


def is_combo(condition: str) -> bool:
    return len(condition_genes(condition)) == 2


def genes_of_conditions(conditions: Iterable[str]) -> list[str]:
    """Sorted unique genes perturbed in any of ``conditions``."""
    out: set[str] = set()
    for c in conditions:
        out.update(condition_genes(c))
    return sorted(out)


def check_genes_measured(conditions: Iterable[str], gene_names: Iterable[str], source: str = "the data") -> None:
    """Raise naming the gene, the condition and ``source`` when a perturbed gene is not among ``gene_names``."""
    measured = set(gene_names)
    for c in dict.fromkeys(conditions):
        for g in condition_genes(c):
            if g not in measured:
                raise ConditionError(
                    f"gene {g!r} of condition {c!r} is not among the genes of {source} "
                    f"(var['gene_name']); a perturbed gene must be measured"
                )
