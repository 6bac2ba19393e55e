"""Cross-species gene mapping (data_modules/species.py) through the one gene-name resolution
(data_modules.vocab.resolve_gene_names): detection, the one-to-one policy on celltypist's real Ensembl ortholog tables,
and real mouse cells (the scvelo 0.3.4 sdist's dentate gyrus file, fetched like the other resources) embedded and
fine-tuned with a human-vocabulary checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, train_in_process

from data_modules.species import SpeciesError, detect_species, ortholog_map
from data_modules.vocab import GeneVocab, resolve_gene_names, shipped_gene_table_path


def test_species_is_detected_from_capitalisation_and_id_prefixes():
    assert detect_species(["Cd3e", "Ptprc", "Gm12345", "1700001P01Rik", "mt-Co1"])[0] == "mouse"
    assert detect_species(["CD3E", "PTPRC", "C1orf112", "MT-CO1", "RP11-34P13.7"])[0] == "human"
    assert detect_species(["ENSMUSG00000032093", "ENSMUSG00000026395.3"])[0] == "mouse"
    assert detect_species(["ENSMMUG00000000001", "ENSMMUG00000000002"])[0] == "rhesus"
    assert detect_species(["ENSSSCG00000000001"])[0] == "pig"
    with pytest.raises(SpeciesError, match="ENSDARG"):  # zebrafish: no table ships
        detect_species(["ENSDARG00000000001"])


def test_only_one_to_one_orthologs_map_and_ambiguous_genes_never_match_by_name():
    """The stated policy on the shipped Ensembl 105 human-mouse table: a one-to-one pair maps; a mouse gene with
    several human orthologs (Aarsd1: AARSD1 and the read-through PTGES3L-AARSD1) and mouse genes sharing one human
    ortholog (Plscr1, Plscr2 -> PLSCR1) are dropped; a dropped name both species spell alike (U2) is renamed so it
    cannot hit the human vocabulary by accident."""
    m = ortholog_map("mouse", "human")
    assert m.one_to_one["Cd3e"] == "CD3E" and m.one_to_one["Prox1"] == "PROX1"
    assert "Aarsd1" in m.one_to_many and {"Plscr1", "Plscr2"} <= m.many_to_one
    vocab = GeneVocab.from_genes(["CD3E", "PROX1", "AARSD1", "PLSCR1", "U2"])
    var = pd.DataFrame(index=["Cd3e", "Prox1", "Aarsd1", "Plscr1", "Plscr2", "U2", "Zzz3xyz"])
    names, rep = resolve_gene_names(var, vocab=vocab)
    assert names == ["CD3E", "PROX1", "mouse:Aarsd1", "mouse:Plscr1", "mouse:Plscr2", "mouse:U2", "mouse:Zzz3xyz"]
    sp = rep.species
    assert (sp["species"], sp["target"], sp["n_genes"], sp["n_mapped"]) == ("mouse", "human", 7, 2)
    assert (sp["n_one_to_many"], sp["n_many_to_one"], sp["n_no_ortholog"]) == (2, 2, 1)  # U2 is one-to-many too
    assert "one-to-one ortholog" in rep.summary()
    # the reverse direction (a human file onto a mouse vocabulary) uses the same pairs
    names, _ = resolve_gene_names(pd.DataFrame(index=["CD3E", "PLSCR1"]), vocab=GeneVocab.from_genes(["Cd3e"]))
    assert names == ["Cd3e", "human:PLSCR1"]


def test_species_can_be_forced_and_ids_read_their_symbol_column():
    human_vocab = GeneVocab.from_genes(["CD3E", "PTPRC"])
    # rhesus symbols look human: only a forced species maps them (here CD3E is a rhesus one-to-one gene)
    var = pd.DataFrame(index=["CD3E", "PTPRC"])
    names, rep = resolve_gene_names(var, vocab=human_vocab)
    assert rep.species["species"] == "human" and names == ["CD3E", "PTPRC"]
    names, rep = resolve_gene_names(var, vocab=human_vocab, species="rhesus")
    assert rep.species["detected_by"].startswith("forced") and rep.species["table"].startswith(
        "Ensembl110_Human2Rhesus"
    )
    # mouse Ensembl ids: the symbols come from the file's gene_symbols column, then the orthologs
    var = pd.DataFrame({"gene_symbols": ["Cd3e", "Ptprc"]}, index=["ENSMUSG00000032093", "ENSMUSG00000026395"])
    names, rep = resolve_gene_names(var, vocab=human_vocab)
    assert names == ["CD3E", "PTPRC"] and "gene_symbols" in rep.species["detected_by"]
    # ... onto an Ensembl-keyed human vocabulary: human symbols -> GENCODE ids, never the file's mouse ids
    assert shipped_gene_table_path() is not None
    ens_vocab = GeneVocab.from_genes(["ENSG00000198851", "ENSG00000081237"])  # CD3E, PTPRC
    names, _ = resolve_gene_names(var, vocab=ens_vocab)
    assert names == ["ENSG00000198851", "ENSG00000081237"]
    with pytest.raises(SpeciesError, match="no var column holds symbols"):
        resolve_gene_names(var[[]], vocab=human_vocab)
    with pytest.raises(SpeciesError, match="zebrafish"):
        resolve_gene_names(var, vocab=human_vocab, species="zebrafish")


# ---------------------------------------------------------------------------------------------------------------
# real mouse cells


@pytest.fixture(scope="module")
def mouse_h5ad(tmp_path_factory):
    """The dentate gyrus cells (100 x 13,913, raw counts, Cd3e-style symbols) with 3 k-means groups of their PCA as
    labels (the file has none; the fine-tune test is about the pipeline, not the biology)."""
    import anndata as ad
    import scanpy as sc
    from sklearn.cluster import KMeans

    from scgpt_train.resources.pypi import fetch_mouse_demo

    adata = ad.read_h5ad(fetch_mouse_demo(log=lambda *_: None))
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.pca(norm, n_comps=10, random_state=0)
    adata.obs["group"] = pd.Categorical(
        [f"g{k}" for k in KMeans(3, n_init=10, random_state=0).fit_predict(norm.obsm["X_pca"])]
    )
    out = tmp_path_factory.mktemp("mouse") / "dentategyrus_labelled.h5ad"
    adata.write_h5ad(out)
    return out


@pytest.fixture(scope="module")
def human_ckpt(tmp_path_factory):
    """A tiny scGPT (random weights) on a whole-human vocabulary: every gene symbol of the GENCODE v44 table shipped
    with celltypist, like the released 60,697-token vocabulary. Its layout is the annotation demo's."""
    from data_modules.vocab import gene_table
    from scgpt_train.checkpoints import save_checkpoint
    from scgpt_train.model import ScGPT

    symbols = sorted({s for s in gene_table().values() if s})
    vocab = GeneVocab.from_genes(symbols)
    model = ScGPT(
        vocab_size=len(vocab),
        pad_token_id=vocab.pad_id,
        d_model=16,
        n_heads=2,
        d_ff=32,
        n_layers=1,
        layout={"max_seq_len": 201, "n_bins": 51, "value_style": "continuous", "pad_value": -2.0, "mask_value": -1.0},
    )
    return save_checkpoint(model, vocab.token_to_id, tmp_path_factory.mktemp("human") / "human_vocab.pt")


def test_real_mouse_cells_embed_with_a_human_checkpoint(mouse_h5ad, human_ckpt, tmp_path, capsys):
    import runpy

    import anndata as ad

    main = runpy.run_path(str(ROOT / "scripts" / "embed.py"))["main"]
    out = tmp_path / "embedded.h5ad"
    assert main(["--checkpoint", str(human_ckpt), "--input", str(mouse_h5ad), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "species mouse" in printed and "one-to-one ortholog" in printed
    emb = ad.read_h5ad(out)
    mapped = np.isfinite(emb.obsm["X_scgpt"]).all(axis=1)
    assert mapped.mean() >= 0.95
    ids = emb.uns["X_scgpt_gene_ids"]
    sp = ids["species"]
    assert sp["species"] == "mouse" and sp["target"] == "human" and sp["n_genes"] == 13913
    assert 0.5 < sp["n_mapped"] / sp["n_genes"] < 1.0
    kept = 1 - emb.uns["X_scgpt_gene_report"]["lost_expression_fraction"]
    assert kept > 0.5  # the expression share in genes the model reads
    # a species without a shipped table is refused with exit 2 (one message)
    assert (
        main(["--checkpoint", str(human_ckpt), "--input", str(mouse_h5ad), "--output", str(out), "--species", "fish"])
        == 2
    )
    assert "is not a species" in capsys.readouterr().err


def test_mouse_annotation_fine_tune_on_a_human_checkpoint(mouse_h5ad, human_ckpt, tmp_path):
    metrics = train_in_process(
        [
            "experiment=finetune_annotation_demo",
            "model=from_official",
            f"pretrained={human_ckpt}",
            f"data.vocab={human_ckpt}",
            f"data.path={mouse_h5ad}",
            "data.builder=null",
            "data.label_key=group",
            "data.batch_size=16",
            "trainer.max_epochs=1",
            "logger=none",
        ],
        tmp_path,
    )
    assert "test/accuracy" in metrics or any("accuracy" in k for k in metrics)
    report = json.loads((tmp_path / "data_report.json").read_text())
    species = report["gene_ids"][0]["species"]
    assert species["species"] == "mouse" and species["n_mapped"] > 0.5 * species["n_genes"]
