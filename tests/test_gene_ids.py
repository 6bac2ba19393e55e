"""Gene identifiers per input (issue #18 item 3): Ensembl ids or symbols, mapped to the vocabulary's key through a
var column or the GENCODE v44 table shipped with celltypist, alike for build_corpus.py, fine-tuning and embed.py;
inputs that would never match are refused; duplicates and truncated names are reported."""

from __future__ import annotations

import importlib.util
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT
from test_own_data import pbmc_counts, tiny_checkpoint, write

from data_modules.anndata_module import AnnDataModule
from data_modules.store.cli import build_main
from data_modules.store.inspect import to_anndata
from data_modules.vocab import GeneVocab, gene_table, resolve_gene_names


def symbol_to_ensembl() -> dict[str, str]:
    """Symbols that name exactly one GENCODE v44 gene id -> that id."""
    table = {k: v for k, v in gene_table().items() if "." not in k}
    count = pd.Series(list(table.values())).value_counts()
    return {s: i for i, s in table.items() if count[s] == 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The same 700 PBMCs as counts: over gene symbols (765 genes), over Ensembl ids with a ``gene_symbols``
    column, over Ensembl ids (versioned) alone, and over the symbols of the 700 genes GENCODE v44 knows."""
    out = tmp_path_factory.mktemp("gene_ids")
    counts = pbmc_counts()
    ids = symbol_to_ensembl()
    known = [g for g in counts.var_names if g in ids]  # 700 of 765: the other 65 are older symbols
    sub = counts[:, known].copy()
    ens = sub.copy()
    ens.var = pd.DataFrame({"gene_symbols": known}, index=[f"{ids[g]}.{k % 3 + 1}" for k, g in enumerate(known)])
    bare = ens.copy()
    bare.var = pd.DataFrame(index=ens.var_names)
    return {
        "dir": out,
        "known": known,
        "counts": counts,
        "ckpt": tiny_checkpoint(list(counts.var_names), out / "tiny.pt"),
        "symbols": write(counts, out / "symbols.h5ad"),
        "symbols700": write(sub, out / "symbols700.h5ad"),
        "ensembl_with_symbols": write(ens, out / "ensembl_with_symbols.h5ad"),
        "ensembl": write(bare, out / "ensembl.h5ad"),
    }


def test_fine_tuning_maps_ensembl_files_onto_a_symbol_vocabulary(files, tmp_path):
    """The data module holds the same matrix whether the file names its genes by symbol, by Ensembl id with a
    symbol column, or by (versioned) Ensembl id alone; data_report.json says how the names were mapped."""
    out = {}
    for name in ("symbols700", "ensembl_with_symbols", "ensembl"):
        dm = AnnDataModule(str(files[name]), label_key="cell_type", vocab=str(files["ckpt"]))
        dm.setup()
        out[name] = dm
    ids = {k: dm.gene_id_reports[0] for k, dm in out.items()}
    assert ids["symbols700"]["method"] == "as stored" and ids["symbols700"]["input_key"] == "symbol"
    assert ids["ensembl_with_symbols"]["method"] == (
        "var column 'gene_symbols' checked against GENCODE v44 id table (shipped with celltypist)"
    )
    assert ids["ensembl_with_symbols"]["n_disagreements"] == 0
    assert ids["ensembl"]["method"] == "GENCODE v44 id table (shipped with celltypist)"
    for name in ("ensembl_with_symbols", "ensembl"):
        assert ids[name]["input_key"] == "ensembl" and ids[name]["target_key"] == "symbol"
        assert ids[name]["n_translated"] == 700 and ids[name]["n_untranslated"] == 0
        assert out[name].gene_report.n_in_vocab == 700
        assert list(out[name].adata.var_names) == list(out["symbols700"].adata.var_names)
        assert (out[name].expression("all") != out["symbols700"].expression("all")).nnz == 0


def test_readme_embed_command_on_an_ensembl_file(files, tmp_path, capsys):
    """`scripts/embed.py --checkpoint CKPT --input in.h5ad --output out.h5ad` (README) on a file keyed by
    Ensembl ids: mapped through the GENCODE table, the embeddings equal those of the same cells keyed by symbols."""
    spec = importlib.util.spec_from_file_location("embed_script", ROOT / "scripts" / "embed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    outs = {}
    for name in ("ensembl", "symbols700"):
        outs[name] = tmp_path / f"{name}.h5ad"
        rc = module.main(
            ["--checkpoint", str(files["ckpt"]), "--input", str(files[name]), "--output", str(outs[name])]
            + ["--device", "cpu"]
        )
        assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "Ensembl ids (var_names) -> gene symbols through GENCODE v44 id table" in printed
    assert "700/700 genes in the vocabulary" in printed
    ens, sym = ad.read_h5ad(outs["ensembl"]), ad.read_h5ad(outs["symbols700"])
    assert list(ens.var_names) == list(ad.read_h5ad(files["ensembl"]).var_names)  # the input, untouched
    assert ens.uns["X_scgpt_gene_ids"]["n_translated"] == 700
    np.testing.assert_allclose(ens.obsm["X_scgpt"], sym.obsm["X_scgpt"], atol=1e-6)


def test_build_corpus_maps_an_ensembl_input_onto_the_symbols_of_another(files, tmp_path, capsys):
    """One Ensembl input and one symbol input: one symbol vocabulary in which the same cell has the same genes."""
    out = tmp_path / "corpus"
    rc = build_main(["h5ad", str(files["ensembl"]), str(files["symbols"]), "--out", str(out), "--no-split"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "ensembl: 700 genes, Ensembl ids (var_names) -> gene symbols through GENCODE v44" in captured.err
    assert "gene identifiers" in captured.out  # the mapping table beside the conversion report
    vocab = GeneVocab.from_json(out / "vocab.json")
    assert vocab.keyed_by == "symbol" and len(vocab.genes) == 765
    assert not any(g.startswith("ENSG") for g in vocab.genes)
    manifest = json.loads((out / "manifest.json").read_text())
    known = {d["name"]: (d["n_genes_known"], d["n_genes"]) for d in manifest["datasets"]}
    assert known == {"ensembl": (700, 700), "symbols": (765, 765)}
    corpus = to_anndata(out, genes="all")
    first_ens = corpus[corpus.obs["dataset"] == "ensembl"][0]
    first_sym = corpus[corpus.obs["dataset"] == "symbols"][0]
    in_700 = first_sym.var_names.isin(files["known"])
    np.testing.assert_array_equal(first_ens.X.toarray()[0], first_sym.X.toarray()[0] * in_700)


def test_build_corpus_refuses_inputs_that_would_never_match(files, tmp_path, capsys):
    """Ensembl ids no table knows (mouse here) next to a symbol input: refused, never a vocabulary of two halves."""
    mouse = ad.read_h5ad(files["ensembl"])
    mouse.var_names = [f"ENSMUSG{i:011d}" for i in range(mouse.n_vars)]
    path = write(mouse, tmp_path / "mouse.h5ad")
    rc = build_main(["h5ad", str(path), str(files["symbols"]), "--out", str(tmp_path / "c"), "--no-split"])
    err = capsys.readouterr().err
    assert rc == 2 and "mouse.h5ad: its genes are Ensembl ids (var_names)" in err, err
    assert "would never match" in err and "--gene-column" in err and "--gene-table" in err
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_duplicates_and_truncated_names_are_reported(files, tmp_path):
    # two GENCODE ids share the name DDX11L2: the first keeps it, the second keeps its id (reported)
    var = pd.DataFrame(index=["ENSG00000290825", "ENSG00000236397", "ENSG00000075624"])
    names, rep = resolve_gene_names(var, "symbol")
    assert names == ["DDX11L2", "ENSG00000236397", "ACTB"]
    assert rep.n_duplicates == 1 and rep.duplicate_examples == ["DDX11L2 <- ENSG00000290825, ENSG00000236397"]
    # names cut to 8 characters (a fixed-width string column): reported with the gene they probably were
    cut = files["counts"].copy()
    cut.var_names = [g[:8] for g in cut.var_names]
    cut.var_names_make_unique()
    dm = AnnDataModule(str(write(cut, tmp_path / "cut.h5ad")), vocab=str(files["ckpt"]))
    dm.setup()
    rep = dm.gene_report
    assert rep.n_lost == rep.n_truncated == 21  # every name longer than 8 characters
    assert "RP11-782 (RP11-782C8.1?)" in rep.truncated_examples
    assert "look truncated" in rep.summary()


def test_gene_column_per_input_file(files, tmp_path, capsys):
    """Inputs that keep their gene names in different places: ``--gene-column FILE=COLUMN`` for build_corpus.py,
    ``data.preprocess.query_gene_column`` for a fine-tune's query; a FILE that is no input is refused by name."""
    counts = files["counts"]
    odd = counts.copy()  # symbols in a column no detector knows, var_names that are no gene names at all
    odd.var = pd.DataFrame({"hgnc": list(counts.var_names)}, index=[f"feature{i}" for i in range(counts.n_vars)])
    odd_path = write(odd, tmp_path / "odd.h5ad")
    out = tmp_path / "corpus"
    args = ["h5ad", str(odd_path), str(files["symbols"]), "--out", str(out), "--no-split"]
    rc = build_main([*args, "--gene-column", "odd.h5ad=hgnc"])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert {d["name"]: d["n_genes_known"] for d in manifest["datasets"]} == {"odd": 765, "symbols": 765}
    assert len(GeneVocab.from_json(out / "vocab.json").genes) == 765  # one vocabulary, not two halves
    capsys.readouterr()
    rc = build_main([*args[:-3], "--out", str(tmp_path / "c2"), "--no-split", "--gene-column", "other.h5ad=hgnc"])
    err = capsys.readouterr().err
    assert rc == 2 and "--gene-column other.h5ad=...: no input is 'other.h5ad'" in err, err
    assert not (tmp_path / "c2").exists()
    # fine-tuning: the reference by var_names, the query through its own column
    dm = AnnDataModule(
        str(files["symbols"]),
        query_path=str(odd_path),
        vocab=str(files["ckpt"]),
        label_key="cell_type",
        preprocess={"query_gene_column": "hgnc"},
    )
    dm.setup()
    assert [(r["n_genes"], r["n_in_vocab"]) for r in dm.report()["genes"]] == [(765, 765), (765, 765)]
