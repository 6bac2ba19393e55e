"""Gene vocabulary in the official scGPT format: a flat ``{token: index}`` JSON map.

Indices are consecutive from 0: gene tokens first, then the special tokens
``<pad>``, ``<cls>``, ``<eoc>`` (``<eoc>`` is unused but kept for compatibility with the
released 60,697-token whole-human vocabulary).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_modules.atomic import write_text_atomic

PAD_TOKEN = "<pad>"
CLS_TOKEN = "<cls>"
EOC_TOKEN = "<eoc>"
SPECIAL_TOKENS = (PAD_TOKEN, CLS_TOKEN, EOC_TOKEN)


class VocabError(ValueError):
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
        for (name, mine), theirs in zip(((names[0], a), (names[1], b)), (other.token_to_id, self.token_to_id)):
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
        unknown = [str(g) for g, i in zip(genes, ids) if i < 0]
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
    return dict(zip(keys.str.split(".").str[0], tokens)) | dict(zip(keys, tokens))


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
