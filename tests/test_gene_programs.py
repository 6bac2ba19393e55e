"""Gene-embedding programs (scgpt_train/tasks/gene_programs/, scripts/gene_programs.py): enrichment statistics
against hand-computed counts, seeded Leiden, a GMT the vocabulary does not share, and an end-to-end run on the
official tiny checkpoint with real AnnData and a GMT written here."""

from __future__ import annotations

import importlib.util
import json
from math import comb

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import FIXTURES, ROOT
from helpers.figures import assert_drawn_png

from scgpt_train.tasks import gene_programs as gp

BLOCK = 25  # planted co-expression: cell type t expresses vocabulary genes t*25 .. t*25+24


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def vocab_genes() -> list[str]:
    return [g for g in json.loads((FIXTURES / "vocab.json").read_text()) if not g.startswith("<")]


def _script_main():
    spec = importlib.util.spec_from_file_location("gene_programs_script", ROOT / "scripts" / "gene_programs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def write_gmt(path, sets: dict[str, list[str]]):
    path.write_text(
        "".join(f"{name}\tdescription of {name}\t" + "\t".join(genes) + "\n" for name, genes in sets.items())
    )
    return path


def test_enrichment_matches_hand_computed_hypergeometric():
    from scipy.stats import hypergeom

    background = [f"G{i}" for i in range(20)]
    programs = {"A": [f"G{i}" for i in range(6)], "B": [f"G{i}" for i in range(6, 12)]}
    sets = {
        "T1": ["G0", "G1", "G2", "G10", "G11", "OUTSIDE1"],  # 5 in the background
        "T2": ["G3", "G12", "G13"],  # 3
        "T3": ["G14", "OUTSIDE2", "OUTSIDE3"],  # 1 in the background: below min_term_genes, not tested
    }
    res = gp.enrichment(programs, sets, background, min_term_genes=3)
    assert res.n_terms_tested == 2 and res.n_terms_skipped == 1 and res.n_tests == 4  # 2 programs x 2 terms
    assert res.background == background
    t = res.table.set_index(["program", "term"])
    assert set(t.index) == {("A", "T1"), ("A", "T2"), ("B", "T1")}  # B shares nothing with T2

    def by_hand(k, big_k, n, m=20):  # P(X >= k), X ~ Hypergeom(m, big_k, n)
        return sum(comb(big_k, i) * comb(m - big_k, n - i) for i in range(k, min(big_k, n) + 1)) / comb(m, n)

    for (prog, term), k, big_k in ((("A", "T1"), 3, 5), (("A", "T2"), 1, 3), (("B", "T1"), 2, 5)):
        row = t.loc[(prog, term)]
        assert (row["overlap"], row["n_term_background"], row["n_program"], row["n_background"]) == (k, big_k, 6, 20)
        assert row["p_value"] == pytest.approx(by_hand(k, big_k, 6), rel=1e-12)
        assert row["p_value"] == pytest.approx(hypergeom.sf(k - 1, 20, big_k, 6), rel=1e-12)
        assert row["p_bonferroni"] == pytest.approx(min(1.0, 4 * by_hand(k, big_k, 6)), rel=1e-12)
        assert row["expected"] == pytest.approx(6 * big_k / 20)
    assert t.loc[("A", "T1"), "overlap_genes"] == "G0,G1,G2"
    # A x T1: C(5,3)C(15,3)/C(20,6) + C(5,4)C(15,2)/C(20,6) + C(5,5)C(15,1)/C(20,6) = (4550 + 525 + 15) / 38760
    assert t.loc[("A", "T1"), "p_value"] == pytest.approx(5090 / 38760, rel=1e-12)
    with pytest.raises(gp.GeneProgramError, match="outside the background"):
        gp.enrichment({"C": ["G0", "NOPE"]}, sets, background)


def test_leiden_programs_are_deterministic_with_a_seed():
    from scgpt_train.tasks.reference_map import load_model

    model, vocab = load_model(FIXTURES)
    ge = gp.gene_embeddings(model, vocab, vocab_genes())
    assert ge.emb.shape == (120, 32) and not ge.missing
    # the gene encoder's output: embedding then its LayerNorm (zero mean, unit variance per gene before the affine)
    ids = torch.as_tensor([vocab[g] for g in ge.genes[:3]])
    with torch.no_grad():
        manual = model.gene_encoder.norm(model.gene_encoder.embedding(ids)).numpy()
    np.testing.assert_allclose(ge.emb[:3], manual, atol=1e-6)
    runs = [gp.leiden_programs(ge.emb, ge.genes, [0.5, 1.0, 2.0], seed=7) for _ in range(2)]
    (p1, l1), (p2, l2) = runs
    assert p1 == p2
    for r in l1:
        np.testing.assert_array_equal(l1[r], l2[r])
    assert any(p1[r] for r in p1)
    for progs in p1.values():
        assert all(len(g) >= gp.MIN_PROGRAM_GENES for g in progs.values())
        members = [g for v in progs.values() for g in v]
        assert len(members) == len(set(members))  # a gene is in one program per resolution


def test_gmt_without_vocabulary_genes_is_refused(tmp_path, capsys):
    gmt = write_gmt(tmp_path / "mouse.gmt", {"SET_A": ["Cd3e", "Cd3d", "Ptprc"], "SET_B": ["Actb", "Gapdh"]})
    rc = _script_main()(["--checkpoint", str(FIXTURES), "--gmt", str(gmt), "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{gmt}: none of its 5 genes" in err and "checkpoint's vocabulary" in err
    assert not (tmp_path / "out").exists()


def test_malformed_gmt_is_refused_with_its_line(tmp_path):
    bad = tmp_path / "bad.gmt"
    bad.write_text("SET_A\tdesc\tA1BG\tA2M\nSET_B only-two-fields\n")
    with pytest.raises(gp.GeneProgramError, match="bad.gmt line 2"):
        gp.read_gmt(bad)


def toy_cells(n: int, seed: int) -> ad.AnnData:
    genes = vocab_genes()
    rng = np.random.default_rng(seed)
    t = np.arange(n) % 4
    x = rng.poisson(0.05, (n, len(genes))).astype(np.float32)
    for k in range(4):
        rows = np.flatnonzero(t == k)
        x[np.ix_(rows, np.arange(k * BLOCK, (k + 1) * BLOCK))] += rng.poisson(3.0, (len(rows), BLOCK))
    obs = pd.DataFrame({"cell_type": np.array(["T", "B", "NK", "Mono"])[t]}, index=[f"cell-{i}" for i in range(n)])
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))


def test_end_to_end_on_the_official_tiny_checkpoint(tmp_path, capsys):
    genes = vocab_genes()
    adata_path = tmp_path / "cells.h5ad"
    toy_cells(240, 0).write_h5ad(adata_path)
    sets = {f"BLOCK_{k}": genes[k * BLOCK : (k + 1) * BLOCK] for k in range(4)}  # the planted co-expression blocks
    sets["ABC_TRANSPORTERS"] = [g for g in genes if g.startswith("ABC") and g[3:4] in "ABCDEFG"] + ["NOT_IN_VOCAB"]
    sets["ABHD_FAMILY"] = [g for g in genes if g.startswith("ABHD")]
    sets["TOO_SMALL"] = ["A1BG", "OUTSIDE"]
    gmt = write_gmt(tmp_path / "tiny.gmt", sets)
    out = tmp_path / "programs"
    rc = _script_main()(
        [
            *("--checkpoint", str(FIXTURES), "--adata", str(adata_path), "--gmt", str(gmt), "--out", str(out)),
            *("--label-key", "cell_type", "--resolutions", "0.5,1", "--resolution", "1", "--family", "^ABC[AB]"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_genes_tested"] == 120 and summary["n_background"] == 120
    assert (out / "background_genes.txt").read_text().split() == genes  # the recorded background
    assert summary["enrichment"]["n_terms_tested"] == 6 and summary["enrichment"]["n_terms"] == 7
    assert summary["leiden"]["resolutions"] == [0.5, 1.0]

    programs = pd.read_csv(out / "programs.tsv", sep="\t")
    assert set(programs["method"]) == {"scgpt", "coexpression"}
    assert (programs["n_genes"] >= 5).all()
    enr = pd.read_csv(out / "enrichment.tsv", sep="\t")
    assert enr["p_value"].between(0, 1).all()
    per_res = {(r["method"], r["resolution"]): r["n_tests"] for r in summary["per_resolution"]}
    for (method, res), rows in enr.groupby(["method", "resolution"]):
        np.testing.assert_allclose(rows["p_bonferroni"], np.minimum(1.0, rows["p_value"] * per_res[(method, res)]))
    # the co-expression baseline recovers the planted blocks: each block term is enriched in a co-expression program
    co = enr[(enr["method"] == "coexpression") & (enr["p_bonferroni"] < 0.05)]
    assert {f"BLOCK_{k}" for k in range(4)} <= set(co["term"])
    assert set(summary["terms_only_coexpression"]) | set(summary["terms_shared"]) >= {f"BLOCK_{k}" for k in range(4)}

    # within-program cosine networks: every pair of every program, cosines of the gene embeddings
    net = pd.read_csv(out / "networks.tsv", sep="\t")
    scgpt_progs = programs[programs["method"] == "scgpt"]
    assert len(net) == sum(n * (n - 1) // 2 for n in scgpt_progs["n_genes"])
    from scgpt_train.tasks.reference_map import load_model

    model, vocab = load_model(FIXTURES)
    row = net.iloc[0]
    e = gp.gene_embeddings(model, vocab, [row["gene_a"], row["gene_b"]]).emb
    assert row["cosine"] == pytest.approx(float(e[0] @ e[1] / np.linalg.norm(e[0]) / np.linalg.norm(e[1])), abs=1e-5)

    # scores per cell on the input AnnData (same cells, same names, all genes), figures and the report
    scored = ad.read_h5ad(out / "scores.h5ad")
    main = scgpt_progs[scgpt_progs["resolution"] == 1.0]["program"]
    assert list(scored.obs_names) == [f"cell-{i}" for i in range(240)] and scored.n_vars == 120
    assert {f"gp_{p}" for p in main} <= set(scored.obs.columns) and len(main) > 0
    assert_drawn_png(out / "program_heatmap.png")
    assert_drawn_png(out / "family_network.png")
    report = (out / "report.md").read_text()
    for section in ("## Per resolution", "## Programs at resolution 1", "gene embeddings vs co-expression"):
        assert section in report


def test_label_key_and_genes_file_errors(tmp_path, capsys):
    adata_path = tmp_path / "cells.h5ad"
    toy_cells(40, 1).write_h5ad(adata_path)
    gmt = write_gmt(tmp_path / "g.gmt", {"S": vocab_genes()[:10]})
    main = _script_main()
    base = ["--checkpoint", str(FIXTURES), "--gmt", str(gmt), "--out", str(tmp_path / "o")]
    assert main([*base, "--adata", str(adata_path), "--label-key", "celltype"]) == 2
    assert "--label-key 'celltype' is not an obs column" in capsys.readouterr().err
    genes = tmp_path / "genes.txt"
    genes.write_text("NOT_A_GENE\nALSO_NOT\n")
    assert main([*base, "--genes", str(genes)]) == 2
    err = capsys.readouterr().err
    assert f"none of the 2 genes of --genes {genes}" in err and "vocabulary" in err
