"""Cross-species gene names: which species a gene list comes from, and one-to-one orthologs to bring it onto a
vocabulary of another species (a human checkpoint for mouse cells, typically).

Tables: the Ensembl ortholog lists shipped inside celltypist (a pinned dependency), human symbol -> other symbol:
``Ensembl105_Human2Mouse_Genes.csv`` and the Ensembl 110 rhesus, cynomolgus and pig tables.

Policy (``OrthologMap``): only ONE-TO-ONE pairs map. A gene of the input species with several orthologs in the
target species (one-to-many) or whose ortholog is also the ortholog of other input-species genes (many-to-one) is
dropped, not summed and not assigned to one of them: either choice would feed the model one gene's expression under
another (paralog) gene's token, and nothing in the data says which is right. Genes absent from the table are dropped
too. Dropped genes are renamed ``<species>:<name>`` so that a name both species share (``U2``, ``5S_rRNA``) can never
match the vocabulary by accident; the report counts each kind with examples.

Detection (``detect_species``): Ensembl gene ids by prefix (``ENSG`` human, ``ENSMUSG`` mouse, ``ENSMMUG`` rhesus,
``ENSMFAG`` cynomolgus, ``ENSSSCG`` pig); symbols by capitalisation (``Cd3e``: mouse; ``CD3E``: human). Rhesus,
cynomolgus and pig symbols are written like human ones, so symbols of those species must be named
(``--species`` / ``data.species``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

from data_modules.errors import UserInputError

SPECIES = ("human", "mouse", "rhesus", "cynomolgus", "pig")
ORTHOLOG_TABLES = {
    "mouse": "Ensembl105_Human2Mouse_Genes.csv",
    "rhesus": "Ensembl110_Human2Rhesus_Genes.csv",
    "cynomolgus": "Ensembl110_Human2Cynomolgus_Genes.csv",
    "pig": "Ensembl110_Human2Pig_Genes.csv",
}
ID_PREFIXES = {"ENSG": "human", "ENSMUSG": "mouse", "ENSMMUG": "rhesus", "ENSMFAG": "cynomolgus", "ENSSSCG": "pig"}
_ID_RE = re.compile(r"^(ENS[A-Z]*G)\d{6,}(\.\d+)?$")
_MOUSE_STYLE = re.compile(r"^[A-Z][a-z0-9]*[a-z][a-z0-9.\-]*$")  # Cd3e, Gm12345, Ptprc
_HUMAN_STYLE = re.compile(r"^[^a-z]*[A-Z][^a-z]*$")  # CD3E, MT-CO1, RP11-34P13.7 (no lowercase letter)


class SpeciesError(UserInputError):
    """A species name or gene list that cannot be mapped (unknown species, no table between the two)."""


def check_species(species: str | None, where: str = "species") -> str | None:
    """``species`` lower-cased, or None for auto-detection (``None`` / ``"auto"``); refuses an unknown name."""
    if species is None or str(species).lower() in ("auto", "none", "null", ""):
        return None
    s = str(species).lower()
    if s not in SPECIES:
        raise SpeciesError(f"{where}={species!r} is not a species with a shipped ortholog table; use one of {SPECIES}")
    return s


def detect_species(names: Sequence[str]) -> tuple[str, str]:
    """(species, evidence) of a gene list: Ensembl id prefixes when most names are ids, else capitalisation."""
    names = [str(n) for n in names if n]
    if not names:
        return "human", "no gene names: assumed human"
    prefixes = Counter(m.group(1) for n in names if (m := _ID_RE.match(n)))
    n_ids = sum(prefixes.values())
    if n_ids * 2 > len(names):
        prefix, count = prefixes.most_common(1)[0]
        if prefix not in ID_PREFIXES:
            raise SpeciesError(
                f"the genes are Ensembl ids with the prefix {prefix} (e.g. {names[0]}), a species without a shipped "
                f"ortholog table (known prefixes: {ID_PREFIXES})"
            )
        return ID_PREFIXES[prefix], f"gene naming: {count:,} of {len(names):,} names are {prefix} Ensembl ids"
    mouse = sum(bool(_MOUSE_STYLE.match(n)) for n in names)
    human = sum(bool(_HUMAN_STYLE.match(n)) for n in names)
    if mouse > human:
        return "mouse", f"gene naming: {mouse:,} of {len(names):,} symbols capitalised like 'Cd3e' (mouse style)"
    return "human", (
        f"gene naming: {human:,} of {len(names):,} symbols upper-case like 'CD3E' (human style; rhesus, cynomolgus and "
        "pig symbols look the same: name the species to map them)"
    )


def celltypist_table_path(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("celltypist")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "samples" / name if spec else None
    if path is None or not path.is_file():
        raise SpeciesError(f"the ortholog table {name} is not in the installed celltypist package (celltypist==1.7.1)")
    return path


@dataclass
class SpeciesReport:
    """How one input's genes were brought from its species to the vocabulary's."""

    species: str  # the input's species
    target: str  # the vocabulary's species
    detected_by: str  # "forced (species='mouse')" or the detection evidence
    table: str = ""
    n_genes: int = 0
    n_mapped: int = 0  # one-to-one orthologs
    n_one_to_many: int = 0  # an input gene with several orthologs in the target species: dropped
    n_many_to_one: int = 0  # input genes sharing one target ortholog: dropped
    n_no_ortholog: int = 0  # not in the table: dropped
    examples: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if self.species == self.target:
            return f"species {self.species} ({self.detected_by})"
        share = self.n_mapped / max(self.n_genes, 1)
        return (
            f"species {self.species} ({self.detected_by}) -> {self.target} through {self.table}: {self.n_mapped:,} of "
            f"{self.n_genes:,} genes ({share:.1%}) have a one-to-one ortholog; dropped: {self.n_one_to_many:,} "
            f"one-to-many, {self.n_many_to_one:,} many-to-one, {self.n_no_ortholog:,} without ortholog"
        )


class OrthologMap:
    """One-to-one orthologs from species ``source`` to ``target`` (one of them human), with the ambiguous genes."""

    def __init__(self, source: str, target: str):
        if source == target or "human" not in (source, target):
            raise SpeciesError(
                f"no ortholog table from {source} to {target}: the shipped tables pair human with "
                f"{sorted(ORTHOLOG_TABLES)}"
            )
        other = target if source == "human" else source
        self.source, self.target, self.table = source, target, ORTHOLOG_TABLES[other]
        pairs = _pairs(self.table)  # (human, other)
        if source != "human":
            pairs = [(o, h) for h, o in pairs]  # (source, target)
        n_src = Counter(s for s, _ in pairs)
        n_dst = Counter(t for _, t in pairs)
        self.one_to_one = {s: t for s, t in pairs if n_src[s] == 1 and n_dst[t] == 1}
        self.one_to_many = {s for s in n_src if n_src[s] > 1}
        self.many_to_one = {s for s, t in pairs if n_src[s] == 1 and n_dst[t] > 1}
        upper = Counter(s.upper() for s in n_src)  # case-insensitive fallback (e.g. "CD3E" in a mouse file)
        self.by_upper = {s.upper(): s for s in n_src if upper[s.upper()] == 1}

    def translate(self, names: Sequence[str], report: SpeciesReport) -> list[str]:
        """Each name's one-to-one ortholog, or ``<source>:<name>`` when it has none (counted in ``report``)."""
        out = []
        kinds: dict[str, list[str]] = {"one_to_many": [], "many_to_one": [], "no_ortholog": []}
        for name in names:
            key = name if name in self.one_to_one or name in self.one_to_many else self.by_upper.get(name.upper(), name)
            if key in self.one_to_one:
                out.append(self.one_to_one[key])
                report.n_mapped += 1
                continue
            kind = "one_to_many" if key in self.one_to_many else "many_to_one" if key in self.many_to_one else None
            kinds[kind or "no_ortholog"].append(name)
            out.append(f"{self.source}:{name}" if name else name)
        report.table = f"{self.table} (celltypist)"
        report.n_genes = len(names)
        report.n_one_to_many = len(kinds["one_to_many"])
        report.n_many_to_one = len(kinds["many_to_one"])
        report.n_no_ortholog = len(kinds["no_ortholog"])
        report.examples = {k: v[:5] for k, v in kinds.items() if v}
        return out


@cache
def _pairs(table: str) -> list[tuple[str, str]]:
    import pandas as pd

    t = pd.read_csv(celltypist_table_path(table), header=None, names=["h", "o"], dtype=str, keep_default_na=False)
    t = t[(t.h != "") & (t.o != "")].drop_duplicates()
    return list(zip(t.h, t.o, strict=True))


@cache
def ortholog_map(source: str, target: str) -> OrthologMap:
    return OrthologMap(source, target)


def vocab_species(genes: Sequence[str]) -> str:
    """The species of a vocabulary's genes (detected from their naming)."""
    return detect_species(list(genes))[0]


def species_names(
    names: list[str],
    symbols_column: Callable[[], tuple[str, list[str]] | None],
    species: str | None,
    target: str | None,
    where: str,
    columns: Sequence[str] = (),
) -> tuple[list[str], SpeciesReport | None, bool]:
    """Step 0 of :func:`data_modules.vocab.resolve_gene_names`: ``names`` (read from var) brought to the ``target``
    species through one-to-one orthologs. Ensembl ids of another species are first read as symbols from the var
    column ``symbols_column()`` finds, as (name, values) or None (``columns``: every var column, for the message).
    Returns (names, report or None when nothing was asked or detected, translated?)."""
    forced = check_species(species, "species")
    if forced is None and target is None:
        return names, None, False
    src, how = (forced, f"forced (species={forced!r})") if forced else detect_species(names)
    target = target or src
    if src == target:
        return names, SpeciesReport(src, target, how, n_genes=len(names), n_mapped=len(names)), False
    symbols = names
    if sum(bool(_ID_RE.match(n)) for n in names) * 2 > len(names):  # ids of another species: their symbols first
        found = symbols_column()
        if found is None:
            raise SpeciesError(
                f"{where}: its genes are {src} Ensembl ids (e.g. {names[:2]}) and the vocabulary is {target}; the "
                f"ortholog tables pair gene symbols, and no var column holds symbols (columns: {list(columns)[:10]}"
                f"). Add a gene_symbols column, or pass the column holding symbols as the gene column"
            )
        column, values = found
        symbols = [s or n for s, n in zip(values, names, strict=True)]
        how += f"; symbols from var[{column!r}]"
    report = SpeciesReport(src, target, how)
    return ortholog_map(src, target).translate(symbols, report), report, True
