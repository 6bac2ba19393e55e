"""Multi-omic data path (data_modules/multiomic): official parity through the data module, vocabulary extension,
mosaic cells, the token rule, ATAC peaks (a small synthetic peak matrix generated here: no package ships RNA + ATAC
data), and the errors for bad inputs."""

from __future__ import annotations

import json

import anndata as ad
import mudata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import FIXTURES

from data_modules.multiomic import MultiomicDataModule, MultiomicInputError
from scgpt_train.checkpoints import load_official
from scgpt_train.objectives import DARObjective, MLMObjective

MULTI = FIXTURES / "multiomic"
needs_fixtures = pytest.mark.skipif(not (MULTI / "best_model.pt").is_file(), reason=f"no fixtures at {FIXTURES}")


def _npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _h5mu(path, mods: dict, obs: pd.DataFrame):
    """A .h5mu from {key: AnnData}; the MuData's obs columns are ``obs``'s."""
    md = mudata.MuData(mods)
    md.obs = md.obs.join(obs) if len(md.obs.columns) else obs.reindex(md.obs_names)
    md.write_h5mu(path)
    return path


def _dm(path, modalities, **kw):
    kw.setdefault("layout", dict(max_seq_len=200))
    dm = MultiomicDataModule(str(path), modalities, **kw)
    dm.setup()
    return dm


# ------------------------------------------------------------------------------------------------ parity
@needs_fixtures
def test_fixture_parity_through_the_data_path(tmp_path):
    """feature matrix -> .h5mu -> MultiomicDataModule tokens == the official tokenize_and_pad_batch, and the
    official MultiOmicTransformerModel's outputs and masked losses (GEP, GEPC, DAR) within 1e-5."""
    inp, exp = _npz(MULTI / "inputs.npz"), _npz(MULTI / "expected.npz")
    names, mods = inp["feature_names"], inp["feature_mod_types"]
    vocab_mod = json.loads((MULTI / "vocab_mod.json").read_text())
    rna, prot = mods == vocab_mod["RNA"], mods == vocab_mod["Protein"]
    cells = [f"c{i}" for i in range(4)]
    obs = pd.DataFrame({"batch": [f"b{b}" for b in inp["batch_labels"]]}, index=cells)
    a_rna = ad.AnnData(
        sp.csr_matrix(inp["data"][:, rna]), obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=names[rna])
    )
    a_prot = ad.AnnData(
        sp.csr_matrix(inp["data"][:, prot]),
        obs=pd.DataFrame(index=cells),
        var=pd.DataFrame(index=[n.removeprefix("p_") for n in names[prot]]),
    )
    path = _h5mu(tmp_path / "fixture.h5mu", {"rna": a_rna, "prot": a_prot}, obs)
    recipes = {
        "RNA": {"kind": "rna", "values": "binned"},
        "Protein": {"kind": "protein", "values": "binned", "token_prefix": "p_"},
    }
    dm = _dm(path, recipes, batch_key="batch", vocab=str(MULTI), layout=dict(max_seq_len=100))
    assert dm.vocab.token_to_id == json.loads((MULTI / "vocab.json").read_text())  # nothing appended
    assert dm.modality_vocab == vocab_mod and dm.token_rule == "nonzero"
    batch = next(iter(dm.loader("all", masked=False, batch_size=4)))
    for ours, theirs in (
        (batch.gene_ids, "gene_ids"),
        (batch.modality_ids, "mod_types"),
        (batch.pad_mask, "src_key_padding_mask"),
    ):
        np.testing.assert_array_equal(ours.numpy(), inp[theirs])
    np.testing.assert_array_equal(batch.values.numpy(), inp["values"])
    np.testing.assert_array_equal(batch.batch_labels.numpy(), inp["batch_labels"])

    model = load_official(MULTI).eval()
    real = ~inp["src_key_padding_mask"]
    errors = {}
    with torch.no_grad():
        out = model(**batch.model_inputs())
        for key in ("cell_emb", "mvc_output", "dab_output", "mlm_output"):
            where = real if key == "mlm_output" else np.ones(exp[key].shape, dtype=bool)
            errors[key] = float(np.abs(out[key].numpy()[where] - exp[key][where]).max())
        masked = torch.from_numpy(inp["values_masked"])
        batch.mlm_mask = (masked == -1) & ~batch.pad_mask  # the official masker's positions (its RNG is its own)
        batch.values = masked
        out = model(**batch.model_inputs())
        terms = {**MLMObjective(use_gepc=True)(model, batch, out, 0), **DARObjective()(model, batch, out, 0)}
    for ours, theirs in (("mlm", "masked_loss_gep"), ("gepc", "masked_loss_gepc"), ("dar", "masked_loss_dab")):
        errors[theirs] = float(abs(terms[ours] - float(exp[theirs])) / max(1.0, abs(float(exp[theirs]))))
    print("fixture parity max errors (losses relative):", errors)
    assert max(errors.values()) < 1e-5, errors


# ------------------------------------------------------------------------------------------------ synthetic data
def _synthetic(n=12, genes=("CD3E", "CD4", "LYZ", "MS4A1", "NKG7", "GNLY"), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(1.5, (n, len(genes))).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": np.tile(["T", "B", "NK"], n // 3), "batch": np.repeat(["a", "b"], n // 2)},
        index=[f"cell{i}" for i in range(n)],
    )
    return x, obs, list(genes)


RNA = {"kind": "rna", "values": "counts", "normalize_total": 1e4, "log1p": True}
PROT = {"kind": "protein", "transform": "clr", "token_prefix": "prot:"}


def test_mosaic_cells_carry_no_tokens_of_a_missing_modality(tmp_path):
    x, obs, genes = _synthetic()
    prot = np.random.default_rng(1).poisson(20, (12, 3)).astype(np.float32) + 1
    a = ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))
    a.obsm["protein_expression"], a.uns["protein_names"] = prot, np.array(["CD3", "CD19", "CD56"])
    a.obs["has_Protein"] = np.arange(12) < 6  # the second half has no proteins (their values are ignored)
    a.write_h5ad(tmp_path / "m.h5ad")
    dm = _dm(tmp_path / "m.h5ad", {"RNA": RNA, "Protein": PROT}, label_key="cell_type", batch_key="batch")
    b = next(iter(dm.loader("all", masked=False, batch_size=12)))
    prot_id = dm.modality_vocab["Protein"]
    has_prot = (b.modality_ids == prot_id).any(1).numpy()
    np.testing.assert_array_equal(has_prot, np.arange(12) < 6)
    assert dm.obs["modalities"].tolist() == ["RNA+Protein"] * 6 + ["RNA"] * 6
    assert not dm.expression("Protein")[6:].nnz  # no imputed values either
    # .h5mu: a cell missing from mod["prot"] has no protein tokens
    cells = obs.index
    a_rna = ad.AnnData(sp.csr_matrix(x), obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes))
    a_prot = ad.AnnData(prot[:4], obs=pd.DataFrame(index=cells[:4]), var=pd.DataFrame(index=["CD3", "CD19", "CD56"]))
    path = _h5mu(tmp_path / "m.h5mu", {"rna": a_rna, "prot": a_prot}, obs)
    dm = _dm(path, {"RNA": RNA, "Protein": PROT}, label_key="cell_type", batch_key="batch")
    b = next(iter(dm.loader("all", masked=False, batch_size=12)))
    np.testing.assert_array_equal((b.modality_ids == prot_id).any(1).numpy(), np.arange(12) < 4)
    assert dm.obs["has_Protein"].tolist() == [True] * 4 + [False] * 8


def _atac_h5mu(tmp_path, n=12, n_peaks=30, seed=0):
    """RNA counts + a synthetic peak matrix (peaks named chr1-<start>-<end>; peak i < 10 open in n - i cells, the
    others in 1-2), counts 1-3."""
    x, obs, genes = _synthetic(n, seed=seed)
    rng = np.random.default_rng(seed)
    n_open = [n - i if i < 10 else 1 + i % 2 for i in range(n_peaks)]  # peaks 0..9 the most accessible
    peaks = np.zeros((n, n_peaks), dtype=np.int64)
    for j, k in enumerate(n_open):
        peaks[rng.choice(n, k, replace=False), j] = rng.integers(1, 4, k)
    names = [f"chr1-{1000 * i}-{1000 * i + 500}" for i in range(n_peaks)]
    a_rna = ad.AnnData(sp.csr_matrix(x), obs=pd.DataFrame(index=obs.index), var=pd.DataFrame(index=genes))
    a_atac = ad.AnnData(
        sp.csr_matrix(peaks.astype(np.float32)), obs=pd.DataFrame(index=obs.index), var=pd.DataFrame(index=names)
    )
    return _h5mu(tmp_path / "atac.h5mu", {"rna": a_rna, "atac": a_atac}, obs), x, peaks


def test_atac_peaks_token_rule_and_binary_or_binned_values(tmp_path):
    path, x, peaks = _atac_h5mu(tmp_path)
    atac = {"kind": "atac", "values": "counts", "n_top": 10, "selection": "accessible"}
    dm = _dm(path, {"RNA": RNA, "ATAC": atac}, label_key="cell_type", batch_key="batch")
    assert dm.mods["ATAC"].tokens == [f"chr1:{1000 * i}-{1000 * i + 500}" for i in range(10)]  # most accessible
    assert dm.token_rule == "all"  # the paper's rule: no protein -> all tokens, zeros included
    b = next(iter(dm.loader("all", masked=False, batch_size=12)))
    assert b.gene_ids.shape == (12, 1 + 6 + 10) and not b.pad_mask.any()
    atac_vals = b.target_values[b.modality_ids == dm.modality_vocab["ATAC"]]
    assert set(atac_vals.unique().tolist()) <= {0.0, 1.0} and (atac_vals == 0).any()  # binary, zeros kept
    dm = _dm(path, {"RNA": RNA, "ATAC": {**atac, "atac_values": "binned"}}, token_rule="nonzero")
    b = next(iter(dm.loader("all", masked=False, batch_size=12)))
    atac_vals = b.target_values[b.modality_ids == dm.modality_vocab["ATAC"]]
    assert (atac_vals > 0).all() and atac_vals.max() > 1  # nonzero rule; peak counts binned per cell


def test_token_rule_with_protein_and_masking(tmp_path):
    x, obs, genes = _synthetic()
    x[:, 0] = 0  # a gene nobody expresses
    a = ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))
    a.obsm["protein_expression"] = np.random.default_rng(2).poisson(10, (12, 3)).astype(np.float32) + 1
    a.uns["protein_names"] = np.array(["CD3", "CD19", "CD56"])
    a.write_h5ad(tmp_path / "p.h5ad")
    mods = {"RNA": RNA, "Protein": PROT}
    paper = _dm(tmp_path / "p.h5ad", mods)
    assert paper.token_rule == "nonzero"
    b = next(iter(paper.loader("all", masked=False, batch_size=12)))
    assert (b.target_values[:, 1:][~b.pad_mask[:, 1:]] > 0).all()  # protein present: non-zero tokens only
    every = _dm(tmp_path / "p.h5ad", mods, token_rule="all")
    b = next(iter(every.loader("all", masked=True, batch_size=12)))
    assert b.gene_ids.shape == (12, 1 + 6 + 3) and (b.target_values == 0).any()
    n_masked = b.mlm_mask.sum(1)
    assert (n_masked == int(9 * 0.4)).all() and not b.mlm_mask[:, 0].any()  # 40% of the 9 features, never <cls>
    assert (b.values[b.mlm_mask] == -1).all()


# ------------------------------------------------------------------------------------------------ vocabulary
@needs_fixtures
def test_vocabulary_extension_keeps_pretrained_rows_bit_for_bit(tmp_path):
    from scgpt_train.tasks.multiomic import build_multiomic_model

    base = json.loads((FIXTURES / "vocab.json").read_text())
    genes = [g for g in base if not g.startswith("<")][:5] + ["NOTAGENE1"]
    x, obs, _ = _synthetic(genes=genes)
    a = ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))
    a.obsm["protein_expression"] = np.full((12, 2), 5.0, dtype=np.float32)
    a.uns["protein_names"] = np.array(["CD3", "CD19"])
    a.write_h5ad(tmp_path / "v.h5ad")
    dm = _dm(tmp_path / "v.h5ad", {"RNA": RNA, "Protein": PROT}, vocab=str(FIXTURES), batch_key="batch")
    vocab = dm.vocab.token_to_id
    assert all(vocab[t] == i for t, i in base.items())  # every checkpoint token keeps its id
    assert [t for t in vocab if t not in base] == ["NOTAGENE1", "prot:CD3", "prot:CD19"]  # appended in data order
    official = load_official(FIXTURES).gene_encoder.embedding.weight.detach()
    for init in ("mean", "random"):
        model = build_multiomic_model(
            len(vocab), dm.pad_id, pretrained_genes=str(FIXTURES), new_token_init=init, d_model=32, n_heads=4,
            d_ff=64, n_layers=1, **dm.model_kwargs,
        )  # fmt: skip
        w = model.gene_encoder.embedding.weight.detach()
        assert torch.equal(w[: len(base)], official)  # bit for bit
        genes_mean = official[[i for t, i in base.items() if not t.startswith("<")]].mean(0)
        assert torch.equal(w[len(base) :], genes_mean.expand(3, -1)) == (init == "mean")
    with pytest.raises(ValueError, match="d_model=32"):
        build_multiomic_model(len(vocab), dm.pad_id, pretrained_genes=str(FIXTURES), d_model=16, n_heads=2)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_name_the_modality_and_the_file(tmp_path):
    x, obs, genes = _synthetic()
    prot = np.full((12, 2), 7.0, dtype=np.float32)
    # a protein named like a gene (no token prefix)
    a = ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))
    a.obsm["protein_expression"], a.uns["protein_names"] = prot, np.array(["CD4", "CD19"])
    a.write_h5ad(tmp_path / "clash.h5ad")
    with pytest.raises(MultiomicInputError, match=r"clash\.h5ad: modality 'Protein'.*clash with gene symbols.*CD4"):
        _dm(tmp_path / "clash.h5ad", {"RNA": RNA, "Protein": {**PROT, "token_prefix": ""}})
    # a .h5mu without the declared modality
    a_rna = ad.AnnData(sp.csr_matrix(x), obs=pd.DataFrame(index=obs.index), var=pd.DataFrame(index=genes))
    path = _h5mu(tmp_path / "rna_only.h5mu", {"rna": a_rna}, obs)
    with pytest.raises(MultiomicInputError, match=r"rna_only\.h5mu: the declared modality 'Protein'.*holds \['rna'\]"):
        _dm(path, {"RNA": RNA, "Protein": PROT})
    # NaN in a modality
    nan = prot.copy()
    nan[3, 1] = np.nan
    a.obsm["protein_expression"], a.uns["protein_names"] = nan, np.array(["CD3", "CD19"])
    a.write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(MultiomicInputError, match=r"modality 'Protein'.*nan\.h5ad.*NaN"):
        _dm(tmp_path / "nan.h5ad", {"RNA": RNA, "Protein": PROT})
    # log-normalized RNA where counts are required
    logn = ad.AnnData(
        sp.csr_matrix(np.log1p(x / x.sum(1, keepdims=True).clip(1) * 1e4)), obs=obs, var=pd.DataFrame(index=genes)
    )
    logn.write_h5ad(tmp_path / "lognorm.h5ad")
    with pytest.raises(MultiomicInputError, match=r"lognorm\.h5ad.*modality 'RNA' must hold raw counts.*log1p"):
        _dm(tmp_path / "lognorm.h5ad", {"RNA": RNA})
