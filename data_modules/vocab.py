"""Gene vocabulary in the official scGPT format: a flat ``{token: index}`` JSON map.

Indices are consecutive from 0: gene tokens first, then the special tokens
``<pad>``, ``<cls>``, ``<eoc>`` (``<eoc>`` is unused but kept for compatibility with the
released 60,697-token whole-human vocabulary).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_modules.atomic import write_text_atomic
from data_modules.errors import UserInputError

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
CLS_TOKEN = "<cls>"
EOC_TOKEN = "<eoc>"
SPECIAL_TOKENS = (PAD_TOKEN, CLS_TOKEN, EOC_TOKEN)


class VocabError(UserInputError):
    """A vocabulary file or gene list that cannot be used as is."""


@dataclass(frozen=True)
class GeneMapping:
    """Result of mapping a dataset's genes onto a vocabulary."""

    ids: np.ndarray  # (n_genes,) int64 vocab id per input gene, -1 where unknown
    n_known: int
    n_unknown: int
    unknown_genes: list[str]

    @property
    def known(self) -> np.ndarray:  # (n_genes,) bool
        return self.ids >= 0


class GeneVocab:
    """Token <-> index map with the scGPT special tokens."""

    def __init__(self, token_to_id: dict[str, int]):
        ids = sorted(token_to_id.values())
        if ids != list(range(len(ids))):
            raise VocabError("vocabulary indices must be consecutive integers starting at 0")
        missing = [t for t in SPECIAL_TOKENS[:2] if t not in token_to_id]
        if missing:
            raise VocabError(f"vocabulary lacks the special tokens {missing}; scGPT needs <pad> and <cls>")
        self.token_to_id = dict(token_to_id)
        self.id_to_token = [""] * len(ids)
        for tok, i in token_to_id.items():
            self.id_to_token[i] = tok

    # construction -------------------------------------------------------------------
    @classmethod
    def from_genes(cls, genes: Iterable[str]) -> GeneVocab:
        """Sorted unique genes, then ``<pad>``, ``<cls>``, ``<eoc>``."""
        uniq = sorted({g for g in genes if g not in SPECIAL_TOKENS})
        tokens = uniq + list(SPECIAL_TOKENS)
        return cls({t: i for i, t in enumerate(tokens)})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> GeneVocab:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise VocabError(f"vocabulary file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise VocabError(f"vocabulary file {path} is not valid JSON ({e})") from None
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
            raise VocabError(f"vocabulary file {path} must be a flat {{token: index}} JSON object")
        try:
            return cls(data)
        except VocabError as e:
            raise VocabError(f"{path}: {e}") from None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> GeneVocab:
        """The vocabulary a model was trained with: ``vocab.json``, a directory holding one (official
        checkpoint layout), or a torch checkpoint with a ``"vocab"`` entry (ours and our Lightning .ckpt)."""
        path = Path(path)
        if path.is_dir():
            return cls.from_json(path / "vocab.json")
        if path.suffix == ".json":
            return cls.from_json(path)
        if not path.exists():
            raise VocabError(f"checkpoint {path} does not exist")
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=False)
        vocab = obj.get("vocab") if isinstance(obj, dict) else None
        if not vocab:
            raise VocabError(f"checkpoint {path} carries no vocabulary; pass its vocab.json instead")
        return cls(dict(vocab))

    def difference(
        self, other: GeneVocab, names: tuple[str, str] = ("this", "the other"), n_examples: int = 4
    ) -> str | None:
        """None when both map the same tokens to the same ids; else what differs, with a few examples."""
        if self.token_to_id == other.token_to_id:
            return None
        a, b = self.id_to_token, other.id_to_token
        n = min(len(a), len(b))
        moved = [i for i in range(n) if a[i] != b[i]]
        parts = []
        if len(a) != len(b):
            parts.append(f"{names[0]} has {len(a):,} tokens, {names[1]} {len(b):,}")
        if moved:
            shown = ", ".join(f"id {i}: {a[i]!r} vs {b[i]!r}" for i in moved[:n_examples])
            parts.append(f"{len(moved):,} of {n:,} tokens differ ({shown}{', ...' if len(moved) > n_examples else ''})")
        for (name, mine), theirs in zip(
            ((names[0], a), (names[1], b)), (other.token_to_id, self.token_to_id), strict=True
        ):
            only = [t for t in mine if t not in theirs]
            if only:
                shown = ", ".join(repr(t) for t in only[:n_examples])
                parts.append(
                    f"{len(only):,} tokens only in {name} ({shown}{', ...' if len(only) > n_examples else ''})"
                )
        return "; ".join(parts)

    def to_json(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, json.dumps(self.token_to_id, indent=1))

    # queries ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.id_to_token)

    def __contains__(self, token: str) -> bool:
        return token in self.token_to_id

    def __getitem__(self, token: str) -> int:
        return self.token_to_id[token]

    @property
    def pad_id(self) -> int:
        return self.token_to_id[PAD_TOKEN]

    @property
    def cls_id(self) -> int:
        return self.token_to_id[CLS_TOKEN]

    @property
    def genes(self) -> list[str]:
        return [t for t in self.id_to_token if t not in SPECIAL_TOKENS]

    @property
    def keyed_by(self) -> str:
        """``"ensembl"`` when most gene tokens look like Ensembl ids, else ``"symbol"``."""
        return guess_gene_key(self.genes)

    def map_genes(self, genes: Sequence[str], id_table: Mapping[str, str] | None = None) -> GeneMapping:
        """Vocab id of every gene; unknown genes (and special tokens) get -1.

        ``id_table`` translates the given names first (e.g. Ensembl id -> symbol, see
        :func:`load_gene_table`) so a dataset keyed by Ensembl ids maps onto a symbol vocab.
        """
        names = [str(g) for g in genes]
        if id_table is not None:
            names = [id_table.get(g) or id_table.get(g.split(".")[0], "") for g in names]
        ids = np.fromiter(
            (self.token_to_id.get(g, -1) if g not in SPECIAL_TOKENS else -1 for g in names),
            dtype=np.int64,
            count=len(names),
        )
        unknown = [str(g) for g, i in zip(genes, ids, strict=True) if i < 0]
        return GeneMapping(ids=ids, n_known=int((ids >= 0).sum()), n_unknown=len(unknown), unknown_genes=unknown)


_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def is_ensembl_id(name: str) -> bool:
    return bool(_ENSEMBL_RE.match(name))


def guess_gene_key(genes: Sequence[str]) -> str:
    """``"ensembl"`` if more than half of ``genes`` are Ensembl gene ids, else ``"symbol"``."""
    genes = list(genes)
    if not genes:
        return "symbol"
    n_ens = sum(is_ensembl_id(str(g)) for g in genes)
    return "ensembl" if n_ens * 2 > len(genes) else "symbol"


def load_gene_table(
    path: str | os.PathLike, key_column: str = "feature_id", token_column: str = "feature_name"
) -> dict[str, str]:
    """Read a gene table (CSV/TSV) as ``{key: token}``, keys also without Ensembl version suffix.

    Typical use: Ensembl id -> symbol, to map a dataset keyed by Ensembl ids onto a symbol
    vocabulary (the CELLxGENE Census ``var`` has both as feature_id / feature_name). With a
    header the two named columns are used; a headerless file (first field an Ensembl id,
    e.g. GENCODE ``id,name`` lists) is read as key, token.
    """
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise VocabError(f"gene table {path} does not exist")
    sep = "\t" if path.suffix in (".tsv", ".txt") else ","
    with open(path) as f:
        first = f.readline().split(sep)[0].strip()
    if is_ensembl_id(first):
        table = pd.read_csv(path, sep=sep, dtype=str, header=None).iloc[:, :2]
        table.columns = [key_column, token_column]
    else:
        table = pd.read_csv(path, sep=sep, dtype=str)
    missing = [c for c in (key_column, token_column) if c not in table.columns]
    if missing:
        raise VocabError(
            f"gene table {path} lacks the columns {missing} (it has {list(table.columns)}); "
            f"give it a header with {key_column!r} and {token_column!r} or pass the column names"
        )
    table = table.dropna(subset=[key_column, token_column])
    keys, tokens = table[key_column].astype(str), table[token_column].astype(str)
    return dict(zip(keys.str.split(".").str[0], tokens, strict=True)) | dict(zip(keys, tokens, strict=True))


class VocabSizes:
    """``vocab_size`` / ``pad_id`` / ``cls_id`` derived from ``self.vocab`` (what scgpt_train.pipeline reads)."""

    vocab: GeneVocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def pad_id(self) -> int:
        return self.vocab.pad_id

    @property
    def cls_id(self) -> int:
        return self.vocab.cls_id


# ---------------------------------------------------------------------------------------------------------------
# gene identifiers: Ensembl ids vs symbols, per input, mapped to the key a vocabulary uses

SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "gene_names", "gene_name", "feature_name")
ENSEMBL_COLUMNS = ("gene_ids", "gene_id", "feature_id", "ensembl_id", "ensembl_ids")
# shipped with celltypist (a pinned dependency): GENCODE v44 human Ensembl gene id -> gene name, headerless CSV
SHIPPED_GENE_TABLE = ("celltypist", "data/samples/GENCODEv44_Gene_id2name.csv")


def shipped_gene_table_path() -> Path | None:
    """The GENCODE v44 id -> symbol table inside the installed celltypist package, or None if it is missing."""
    import importlib.util

    spec = importlib.util.find_spec(SHIPPED_GENE_TABLE[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SHIPPED_GENE_TABLE[1]
    return path if path.is_file() else None


_TABLES: dict[tuple, dict[str, str]] = {}


def gene_table(path: str | os.PathLike | None = None, columns: tuple[str, str] | None = None) -> dict[str, str] | None:
    """``{Ensembl id (with and without version): symbol}`` from ``path`` (see :func:`load_gene_table`), or the
    shipped GENCODE table when ``path`` is None (None if celltypist is not installed). Cached per path."""
    src = Path(path) if path is not None else shipped_gene_table_path()
    if src is None:
        return None
    key = (str(src), tuple(columns or ()))
    if key not in _TABLES:
        _TABLES[key] = load_gene_table(src, *columns) if columns else load_gene_table(src)
    return _TABLES[key]


def table_name(path: str | os.PathLike | None) -> str:
    return f"gene table {path}" if path is not None else "GENCODE v44 id table (shipped with celltypist)"


@dataclass
class GeneIdReport:
    """How one input's gene names were read and brought to the vocabulary's key (symbols or Ensembl ids)."""

    source: str  # where the names were read: "var_names" / "var['feature_name']"
    input_key: str  # "ensembl" | "symbol": what those names are
    target_key: str  # what the vocabulary (or, from scratch, the reference) uses
    method: str  # "as stored" | "var column 'gene_symbols'" | "<table name>"
    n_genes: int
    n_translated: int = 0  # names replaced through the column / the table
    n_untranslated: int = 0  # names of the input's key that the column / table does not know (kept as they are)
    untranslated_examples: list[str] = field(default_factory=list)
    n_duplicates: int = 0  # columns whose final name an earlier column already has (the first one is kept)
    duplicate_examples: list[str] = field(default_factory=list)  # "CD3E <- ENSG00000198851, ENSG00000288698"
    n_version_stripped: int = 0  # Ensembl ids matched without their ".N" version
    n_disagreements: int = 0  # genes whose symbol column and Ensembl id (through the id table) name different genes
    disagreement_examples: list[str] = field(default_factory=list)  # "ENSG00000000971: column 'FH', id table 'CFH'"
    authority: str = ""  # which of the two named the gene where they disagree: "ids" | "column" ("" = no check)
    species: dict | None = None  # data_modules.species.SpeciesReport: orthologs used when the species differ

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        keys = {"ensembl": "Ensembl ids", "symbol": "gene symbols"}
        text = f"{self.n_genes} genes, {keys[self.input_key]} ({self.source})"
        if self.method != "as stored":
            text += f" -> {keys[self.target_key]} through {self.method}: {self.n_translated} mapped"
            if self.n_untranslated:
                text += f", {self.n_untranslated} unknown to it (e.g. {', '.join(self.untranslated_examples[:3])})"
        if self.n_version_stripped:
            text += f", {self.n_version_stripped} Ensembl versions dropped"
        if self.n_disagreements:
            text += f"; {self.disagreement_warning()}"
        if self.n_duplicates:
            text += f"; {self.n_duplicates} duplicate names (first kept; e.g. {'; '.join(self.duplicate_examples[:3])})"
        if self.species and self.species["species"] != self.species["target"]:
            from data_modules.species import SpeciesReport

            text += f"; {SpeciesReport(**self.species).summary()}"
        return text

    def disagreement_warning(self) -> str:
        shown = "; ".join(self.disagreement_examples[:5])
        used = (
            "the Ensembl ids were used (data.preprocess.prefer_gene_column=true / --prefer-gene-column uses the column)"
            if self.authority == "ids"
            else "the column was used, as asked (prefer_gene_column)"
        )
        return (
            f"{self.n_disagreements:,} of {self.n_genes:,} genes have a symbol column that disagrees with their "
            f"Ensembl id in the {self.method.split(' checked against ')[-1]} (e.g. {shown}); {used}"
        )


def _column_names(var, column: str) -> list[str] | None:
    values = var[column]
    if values.isna().all():
        return None
    return [str(v) if v == v and str(v) not in ("", "nan", "None") else "" for v in values]


def _column_of_key(var, columns: Sequence[str], key: str) -> str | None:
    """The first of ``columns`` in ``var`` whose values are mostly of ``key`` ("symbol" / "ensembl")."""
    for c in columns:
        values = _column_names(var, c) if c in var.columns else None
        if values and guess_gene_key([g for g in values if g]) == key:
            return c
    return None


def resolve_gene_names(
    var,
    target_key: str | None = None,
    gene_column: str | None = None,
    table: Mapping[str, str] | None = None,
    table_label: str | None = None,
    vocab: GeneVocab | None = None,
    where: str = "the input",
    prefer_column: bool = False,
    species: str | None = None,
    target_species: str | None = None,
) -> tuple[list[str], GeneIdReport]:
    """One name per column of ``var`` (a var DataFrame), in the key of ``vocab`` (or ``target_key``).

    Names are read from ``gene_column`` or var_names. When they are Ensembl ids and the key is symbols (or the
    reverse), a var column of the wanted kind (``SYMBOL_COLUMNS`` / ``ENSEMBL_COLUMNS``) is used when
    ``gene_column`` was not given, else ``table`` (``{Ensembl id: symbol}``; default the shipped GENCODE table)
    translates name by name; names it lacks stay as they are (and are unknown to the vocabulary). When both an id
    and a symbol of each gene are there (var_names + a var column), the column is checked against the id table
    (``table``, default the shipped GENCODE table): disagreements are a warning with count and examples, and the
    ids decide (through the table) unless ``prefer_column``; ids the table lacks keep the column's name. Ensembl ids
    lose a ``.N`` version the vocabulary does not have. Of names that end up equal, the first column keeps the
    name and later ones get their input name back when that differs (translated duplicates), else they stay
    duplicates (the caller makes them unique); both are reported with examples.

    Species (``data_modules.species``): when the input's species (``species``, else detected from the names)
    differs from the vocabulary's (``target_species``, else detected from ``vocab``'s genes; neither: nothing is
    translated), names first go through one-to-one orthologs; the report's ``species`` entry counts what was kept.
    """
    if gene_column is not None and gene_column not in var.columns:
        raise VocabError(
            f"{where}: gene column {gene_column!r} is not a var column (columns: {list(var.columns)[:15]}; "
            f"var_names are e.g. {list(map(str, var.index[:3]))})"
        )
    original = _column_names(var, gene_column) if gene_column else [str(g) for g in var.index]
    if original is None:
        raise VocabError(f"{where}: gene column {gene_column!r} holds no values")
    from data_modules.species import species_names, vocab_species

    target_species = target_species or (vocab_species(vocab.genes) if vocab is not None else None)

    def symbols_column():  # read only when another species' Ensembl ids need their symbols
        at = None if gene_column is not None else _column_of_key(var, SYMBOL_COLUMNS, "symbol")
        return (at, _column_names(var, at)) if at is not None else None

    original, species_report, translated = species_names(
        original, symbols_column, species, target_species, where, [str(c) for c in var.columns]
    )
    input_key = guess_gene_key([g for g in original if g])
    target = vocab.keyed_by if vocab is not None else (target_key or input_key)
    source = f"var[{gene_column!r}]" if gene_column else "var_names"
    rep = GeneIdReport(source, input_key, target, "as stored", len(original))
    rep.species = species_report.as_dict() if species_report is not None else None
    names = list(original)
    if input_key != target:
        wanted = SYMBOL_COLUMNS if target == "symbol" else ENSEMBL_COLUMNS
        column = None if gene_column is not None or translated else _column_of_key(var, wanted, target)
        if column is not None:
            values = _column_names(var, column)
            names = [v or o for v, o in zip(values, original, strict=True)]
            rep.method = f"var column {column!r}"
            rep.n_translated = sum(bool(v) for v in values)
            missing = [o for v, o in zip(values, original, strict=True) if not v]
            lookup = table if table is not None else gene_table()
            if lookup is not None:  # ids and symbols both given: check one against the other through the id table
                names, missing = _check_column_against_ids(
                    rep, original, values, names, missing, lookup, table_label or table_name(None), prefer_column, where
                )
        else:
            lookup = table if table is not None else gene_table()
            if lookup is None:
                raise VocabError(
                    f"{where}: its genes are {'Ensembl ids' if input_key == 'ensembl' else 'symbols'} and the "
                    f"vocabulary uses {'symbols' if target == 'symbol' else 'Ensembl ids'}, but no id table is "
                    "available (celltypist is not installed): pass a var column of the right kind or a gene table"
                )
            if target == "ensembl":  # symbol -> id: symbols that name one id only
                counts: dict[str, int] = {}
                for sym in lookup.values():
                    counts[sym] = counts.get(sym, 0) + 1
                lookup = {s: i for i, s in lookup.items() if counts[s] == 1 and "." not in i}
            rep.method = table_label or table_name(None)
            missing = []
            for k, g in enumerate(original):
                if (target == "symbol") != is_ensembl_id(g):
                    continue  # already in the target key
                new = lookup.get(g) or (lookup.get(g.split(".")[0]) if target == "symbol" else None)
                if new:
                    names[k] = new
                    rep.n_translated += 1
                else:
                    missing.append(g)
        rep.n_untranslated, rep.untranslated_examples = len(missing), missing[:10]
    if target == "ensembl" and vocab is not None:
        for k, g in enumerate(names):
            if is_ensembl_id(g) and "." in g and g not in vocab and g.split(".")[0] in vocab:
                names[k] = g.split(".")[0]
                rep.n_version_stripped += 1
    first: dict[str, int] = {}
    dup_groups: dict[str, list[str]] = {}
    for k, g in enumerate(names):
        if not g:
            continue
        if g in first:
            dup_groups.setdefault(g, [original[first[g]]]).append(original[k])
            rep.n_duplicates += 1
            if original[k] != g:
                names[k] = original[k]  # a translated duplicate keeps its input name (unknown to the vocab)
        else:
            first[g] = k
    rep.duplicate_examples = [f"{g} <- {', '.join(srcs[:3])}" for g, srcs in list(dup_groups.items())[:10]]
    names = [g or o or f"unnamed_{k}" for k, (g, o) in enumerate(zip(names, original, strict=True))]
    return names, rep


def _check_column_against_ids(
    rep: GeneIdReport,
    original: list[str],
    values: list[str],
    names: list[str],
    missing: list[str],
    lookup: Mapping[str, str],
    label: str,
    prefer_column: bool,
    where: str,
) -> tuple[list[str], list[str]]:
    """Compare each gene's column value with what the id table says for its Ensembl id (``rep.input_key`` says which
    side holds the ids). Returns (names, names left untranslated); fills the report's disagreement fields."""
    ids_in_names = rep.input_key == "ensembl"  # var_names hold the ids, the column the symbols (else the reverse)
    disagree = []
    id_named = []  # per gene: the symbol the id table gives its id ("" when the table lacks it)
    for orig, value in zip(original, values, strict=True):
        gene_id, symbol = (orig, value) if ids_in_names else (value, orig)
        known = (lookup.get(gene_id) or lookup.get(gene_id.split(".")[0], "")) if gene_id else ""
        id_named.append(known)
        if known and symbol != known:
            disagree.append(f"{gene_id}: column {symbol!r}, id table {known!r}")
    rep.method = f"{rep.method} checked against {label}"
    if not disagree:
        return names, missing
    rep.n_disagreements, rep.disagreement_examples = len(disagree), disagree[:10]
    rep.authority = "column" if prefer_column and ids_in_names else "ids"
    log.warning("%s: %s", where, rep.disagreement_warning())
    if not ids_in_names or prefer_column:  # the column holds the ids (used as they are), or the user prefers it
        return names, missing
    names = [known or v or o for known, v, o in zip(id_named, values, original, strict=True)]
    rep.n_translated = sum(bool(known or v) for known, v in zip(id_named, values, strict=True))
    return names, [o for known, v, o in zip(id_named, values, original, strict=True) if not (known or v)]


def truncated_names(unknown: Sequence[str], all_names: Sequence[str], vocab: GeneVocab) -> list[str]:
    """Unknown names that look cut to a fixed width: as long as the longest input name (the width a
    fixed-width string column cuts at) and the start of a longer vocabulary token. ``"LINC0126 (LINC01262?)"``."""
    import bisect

    width = max((len(str(n)) for n in all_names), default=0)
    if width < 4:
        return []
    tokens = sorted(vocab.genes)
    out = []
    for name in unknown:
        name = str(name)
        if len(name) != width:
            continue
        i = bisect.bisect_right(tokens, name)
        if i < len(tokens) and tokens[i].startswith(name):
            out.append(f"{name} ({tokens[i]}?)")
    return out
