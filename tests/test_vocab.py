"""Gene vocabulary: official format, mapping by symbol and by Ensembl id."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FIXTURES

from data_modules.vocab import GeneVocab, VocabError, guess_gene_key, is_ensembl_id, load_gene_table

OFFICIAL_VOCAB = FIXTURES / "vocab.json"
GENCODE = Path(pd.__file__).parents[1] / "celltypist/data/samples/GENCODEv44_Gene_id2name.csv"


def test_from_genes_appends_specials_in_official_order(tmp_path):
    vocab = GeneVocab.from_genes(["TP53", "ACTB", "TP53", "<pad>"])
    assert vocab.id_to_token == ["ACTB", "TP53", "<pad>", "<cls>", "<eoc>"]
    assert (vocab.pad_id, vocab.cls_id) == (2, 3)
    vocab.to_json(tmp_path / "vocab.json")
    assert json.loads((tmp_path / "vocab.json").read_text()) == {
        "ACTB": 0,
        "TP53": 1,
        "<pad>": 2,
        "<cls>": 3,
        "<eoc>": 4,
    }
    assert GeneVocab.from_json(tmp_path / "vocab.json").token_to_id == vocab.token_to_id


@pytest.mark.skipif(not OFFICIAL_VOCAB.exists(), reason="official fixture not present")
def test_official_vocab_loads_and_maps_by_symbol():
    vocab = GeneVocab.from_json(OFFICIAL_VOCAB)
    raw = json.loads(OFFICIAL_VOCAB.read_text())
    assert vocab.pad_id == raw["<pad>"] and vocab.cls_id == raw["<cls>"]
    genes = vocab.genes[:5] + ["NOT_A_GENE", "<cls>"]
    m = vocab.map_genes(genes)
    assert m.ids.tolist() == [raw[g] for g in vocab.genes[:5]] + [-1, -1]  # special tokens never match genes
    assert m.n_known == 5 and m.unknown_genes == ["NOT_A_GENE", "<cls>"]
    assert vocab.keyed_by == "symbol"


@pytest.mark.skipif(not GENCODE.exists(), reason="celltypist GENCODE table not installed")
def test_map_by_ensembl_id_through_a_gene_table_matches_symbol_mapping():
    table = load_gene_table(GENCODE)  # headerless GENCODE id,name list shipped with celltypist
    symbol_to_id = {}
    for ens, sym in table.items():
        if "." not in ens:
            symbol_to_id.setdefault(sym, ens)
    symbols = ["ACTB", "GAPDH", "CD3E", "MS4A1", "LYZ", "NKG7", "CD14", "PTPRC"]
    vocab = GeneVocab.from_genes(symbols[:6])
    ens_ids = [symbol_to_id[s] for s in symbols]
    ens_ids[1] = ens_ids[1] + ".7"  # versioned ids match too
    by_symbol = vocab.map_genes(symbols)
    by_ensembl = vocab.map_genes(ens_ids, id_table=table)
    np.testing.assert_array_equal(by_ensembl.ids, by_symbol.ids)
    assert by_ensembl.n_known == 6 and by_ensembl.unknown_genes == ens_ids[6:]
    assert guess_gene_key(ens_ids) == "ensembl" and guess_gene_key(symbols) == "symbol"
    assert is_ensembl_id("ENSG00000075624.17") and not is_ensembl_id("ACTB")


def test_vocab_keyed_by_ensembl_maps_directly():
    ids = ["ENSG00000075624", "ENSG00000111640"]
    vocab = GeneVocab.from_genes(ids)
    assert vocab.keyed_by == "ensembl"
    assert vocab.map_genes(ids[::-1] + ["ENSG00000000003"]).ids.tolist() == [1, 0, -1]


def test_bad_vocab_files_are_named(tmp_path):
    with pytest.raises(VocabError, match="does not exist"):
        GeneVocab.from_json(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text(json.dumps(["A", "B"]))
    with pytest.raises(VocabError, match="flat"):
        GeneVocab.from_json(tmp_path / "list.json")
    (tmp_path / "nospecial.json").write_text(json.dumps({"A": 0, "B": 1}))
    with pytest.raises(VocabError, match="nospecial.json.*<pad>"):
        GeneVocab.from_json(tmp_path / "nospecial.json")
    (tmp_path / "gap.json").write_text(json.dumps({"A": 0, "<pad>": 2, "<cls>": 3}))
    with pytest.raises(VocabError, match="consecutive"):
        GeneVocab.from_json(tmp_path / "gap.json")
    (tmp_path / "t.csv").write_text("gene,symbol\nENSG1,A\n")
    with pytest.raises(VocabError, match="lacks the columns"):
        load_gene_table(tmp_path / "t.csv")
