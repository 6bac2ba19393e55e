"""One vocabulary for every modality, and the modality vocabulary.

Feature vocabulary: a pretrained checkpoint's tokens keep their ids (its embedding rows are loaded unchanged);
tokens the data brings that the checkpoint lacks (proteins ``prot:CD3``, peaks ``chr1:100-600``, and RNA genes
unknown to it, as the official tutorial does) are appended after it, in the data's order. From scratch: the
RNA genes sorted, the special tokens, then the other modalities' tokens.

Modality vocabulary (the official ``vocab_mod.json``): the modality names sorted, then ``<pad>``, ``<cls>``,
``<eoc>``; ``<cls>`` and padding positions carry those ids.
"""

from __future__ import annotations

from data_modules.multiomic.inputs import MultiomicInputError
from data_modules.vocab import CLS_TOKEN, EOC_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, GeneVocab


def modality_vocab(names) -> dict[str, int]:
    """{modality: id} with the official order: sorted names, then <pad>, <cls>, <eoc>."""
    tokens = sorted(set(names)) + [PAD_TOKEN, CLS_TOKEN, EOC_TOKEN]
    return {t: i for i, t in enumerate(tokens)}


def check_clashes(
    tokens: dict[str, list[str]],
    kinds: dict[str, str],
    base: GeneVocab | None,
    where: str,
    prefixes: dict[str, str] | None = None,
) -> None:
    """Refuse non-RNA feature tokens that equal an RNA gene of the data or, for protein tokens without a prefix
    that marks them (``prot:``), a token of the pretrained vocabulary: two features would share one embedding
    row. Prefixed tokens already in the vocabulary (a multi-omic checkpoint's) are reused."""
    prefixes = prefixes or {}
    rna = {t for name, toks in tokens.items() if kinds[name] == "rna" for t in toks}
    for name, toks in tokens.items():
        if kinds[name] == "rna":
            continue
        dup = sorted({t for t in toks if toks.count(t) > 1}) if len(set(toks)) != len(toks) else []
        if dup:
            raise MultiomicInputError(f"{where}: modality {name!r} names features twice: {dup[:5]}")
        clash = [t for t in toks if t in rna]
        if base is not None and kinds[name] == "protein" and not prefixes.get(name):
            clash += [t for t in toks if t in base and t not in clash]
        if clash:
            raise MultiomicInputError(
                f"{where}: modality {name!r} has feature names that clash with gene symbols "
                f"({', '.join(clash[:5])}{', ...' if len(clash) > 5 else ''}): a protein and a gene would share "
                f"one token. Give the modality a token prefix (data.modalities.{name}.token_prefix='prot:')"
            )


def build_vocab(
    base: GeneVocab | None, tokens: dict[str, list[str]], kinds: dict[str, str], unknown_genes: str = "append"
) -> tuple[GeneVocab, dict]:
    """(vocabulary, report). ``unknown_genes``: "append" (RNA genes the checkpoint lacks get new rows) or
    "drop" (they are left out of the data; the caller filters them)."""
    if unknown_genes not in ("append", "drop"):
        raise ValueError(f"unknown_genes must be append or drop, got {unknown_genes!r}")
    rna = [t for name, toks in tokens.items() if kinds[name] == "rna" for t in toks]
    other = [t for name, toks in tokens.items() if kinds[name] != "rna" for t in toks]
    if base is None:
        vocab = GeneVocab.from_genes(rna)
        n_base = 0
    else:
        vocab, n_base = base, len(base)
    new: list[str] = []
    seen = set(vocab.token_to_id)
    for t in (rna if (base is None or unknown_genes == "append") else []) + other:
        if t not in seen and t not in SPECIAL_TOKENS:
            new.append(t)
            seen.add(t)
    mapping = dict(vocab.token_to_id)
    for t in new:
        mapping[t] = len(mapping)
    out = GeneVocab(mapping)
    report = {
        "n_pretrained_tokens": n_base,
        "n_appended": len(new),
        "appended_examples": new[:10],
        "n_rna_unknown_to_checkpoint": 0 if base is None else sum(1 for t in rna if t not in base),
    }
    return out, report
