"""Multi-omic training: both modality placements train, the demo recipe runs end to end on the real CITE-seq cells
(fetched from the scvi-tools 1.4.2 sdist on PyPI by resources.fetch_citeseq_demo), every multi-omic experiment
composes, and the BMMC / 10x Multiome download entries work on local files."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import ROOT

from scgpt_train.objectives import DARObjective, MLMObjective
from scgpt_train.tasks.multiomic import build_multiomic_model


@pytest.fixture(scope="session")
def citeseq_file(tmp_path_factory):
    from scgpt_train.resources.pypi import fetch_citeseq_demo

    return fetch_citeseq_demo(log=lambda *_: None)


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("style", ["concat", "encoder"])
def test_both_modality_placements_train(style):
    """concat (official): the transformer never sees the modality; encoder: it is added to the token input.
    Both learn a fixed masked batch (loss falls over 15 Adam steps)."""
    torch.manual_seed(0)
    B, L = 6, 12
    gene_ids = torch.randint(3, 40, (B, L))
    gene_ids[:, 0] = 1
    mod = torch.randint(0, 2, (B, L))
    mod[:, 0] = 3
    target = torch.randint(0, 51, (B, L)).float()
    target[:, 0] = 0
    mlm = torch.rand(B, L) < 0.4
    mlm[:, 0] = False
    from data_modules.batch import Batch

    batch = Batch(
        gene_ids=gene_ids, values=target.masked_fill(mlm, -1.0), pad_mask=torch.zeros(B, L, dtype=torch.bool),
        target_values=target, mlm_mask=mlm, batch_labels=torch.tensor([0, 1] * 3), modality_ids=mod,
    )  # fmt: skip
    model = build_multiomic_model(
        40, 0, d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout=0.0, use_generative=False, use_batch_labels=True,
        do_dab=True, num_batch_labels=2, n_modalities=5, modality_pad_id=2, modality_style=style,
    )  # fmt: skip
    other = batch.model_inputs() | {"modality_ids": torch.where(mod == 3, mod, 1 - mod)}
    model.eval()
    with torch.no_grad():
        same = torch.allclose(model(**batch.model_inputs())["encoder_output"], model(**other)["encoder_output"])
    assert same == (style == "concat")  # the official place keeps modality out of the transformer
    model.train()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    losses = []
    for _ in range(15):
        out = model(**batch.model_inputs())
        terms = {**MLMObjective(use_gepc=True)(model, batch, out, 0), **DARObjective()(model, batch, out, 0)}
        loss = terms["mlm"] + terms["gepc"] + terms["dar"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(terms["mlm"] + terms["gepc"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], losses


def test_demo_recipe_end_to_end_paired_and_mosaic(citeseq_file, tmp_path):
    """train.py experiment=finetune_multiomic_demo (shortened: 1 epoch, 3 steps) on the real cells, paired and
    mosaic: metrics for scGPT and pca_concat, embeddings in obsm['X_scgpt'], mosaic cells recorded in obs."""
    from data_modules.multiomic.demo import build_citeseq_demo
    from scgpt_train.pipeline import run

    cache = citeseq_file.parents[1]
    paired = build_citeseq_demo(tmp_path / "paired.h5ad", citeseq_file)
    for variant in ("paired", "mosaic"):
        out = tmp_path / variant
        mosaic = ["data.withhold={modality:Protein,key:batch,values:[B]}"] if variant == "mosaic" else []
        over = [
            "experiment=finetune_multiomic_demo", f"paths.cache_dir={cache}", f"paths.output_dir={out}",
            f"data.path={paired}", *mosaic,
            "data.modalities.RNA.n_top=200", "layout.max_seq_len=215", "trainer.max_epochs=1",
            "+trainer.limit_train_batches=3", "task.baselines=[pca_concat]", "task.umap=false", "logger=csv",
            "callbacks.progress_bar=null", "task.progress=false", "validate_before_fit=false",
        ]  # fmt: skip
        metrics = run(_compose(over))
        assert np.isfinite(metrics["test/avg_bio"]) and np.isfinite(metrics["baseline/pca_concat/avg_bio"])
        pred = ad.read_h5ad(out / "predictions.h5ad")
        assert pred.obsm["X_scgpt"].shape == (200, 64) and np.isfinite(pred.obsm["X_scgpt"]).all()
        assert (
            pred.n_vars == 200
            and pred.obsm["Protein"].shape == (200, 14)
            and pred.uns["Protein_features"][0] == "prot:CD3"
        )
        counts = pred.obs["modalities"].value_counts().to_dict()
        assert counts == ({"RNA+Protein": 200} if variant == "paired" else {"RNA+Protein": 100, "RNA": 100})
        report = json.loads((out / "data_report.json").read_text())
        assert report["token_rule"].startswith("nonzero") and report["vocab"]["appended_examples"][0] == "prot:CD3"


@pytest.mark.parametrize("name", ["bmmc", "pbmc_multiome", "asap_mosaic", "demo"])
def test_multiomic_experiments_carry_the_paper_hyperparameters(name):
    from hydra.utils import instantiate

    cfg = _compose([f"experiment=finetune_multiomic_{name}", "paths.output_dir=/tmp/unused"])
    assert type(instantiate(cfg.task)).__name__ == "MultiomicIntegrationTask"
    assert set(cfg.objective) == {"mlm", "dar"} and cfg.objective.mlm.use_gepc and cfg.data.mask_ratio == 0.4
    assert cfg.model.lr == 1e-3 and cfg.model.scheduler.gamma == 0.95 and cfg.data.batch_size == 16
    assert cfg.model.net.modality_style == "concat" and cfg.data.token_rule == "paper"
    if name != "demo":
        net = cfg.model.net
        assert (net.n_layers, net.n_heads, net.d_model, cfg.trainer.max_epochs) == (4, 8, 512, 25)
        assert cfg.data.vocab == cfg.model.net.pretrained_genes == cfg.gene_embeddings_from
        assert cfg.data.modalities.RNA.n_top == 1200
    if name in ("pbmc_multiome", "asap_mosaic"):
        assert cfg.data.modalities.ATAC.n_top == 4000


def test_multiomic_downloads_on_local_files(tmp_path):
    """bmmc_cite (gzip from GEO, gunzipped beside it) and pbmc_multiome (10x h5, converted to h5ad) from a local
    mirror: sha256 recorded on first download and checked after."""
    from helpers.mirror import write_10x_arc_h5, write_gzipped_h5ad

    from scgpt_train.resources import download as dl

    mirror = tmp_path / "mirror"
    write_gzipped_h5ad(mirror / "bmmc_cite" / dl.REGISTRY["bmmc_cite"].files[0])
    write_10x_arc_h5(mirror / "pbmc_multiome" / dl.REGISTRY["pbmc_multiome"].files[0])
    root = tmp_path / "bench"
    status = dl.download(["bmmc_cite", "pbmc_multiome"], root, mirror=str(mirror), progress=False, log=lambda *_: None)
    assert status[f"bmmc_cite/{dl.BMMC_CITE}"] == "extracted"
    assert ad.read_h5ad(root / "bmmc_cite" / dl.BMMC_CITE).shape == (3, 3)
    conv = ad.read_h5ad(root / "pbmc_multiome" / dl.PBMC_MULTIOME)
    assert conv.shape == (3, 4) and list(conv.var["feature_types"]) == ["Gene Expression"] * 2 + ["Peaks"] * 2
    again = dl.download(["bmmc_cite", "pbmc_multiome"], root, mirror=str(mirror), progress=False, log=lambda *_: None)
    assert set(again.values()) == {"ok"}
    (root / "bmmc_cite" / dl.BMMC_CITE).write_bytes(b"changed")
    with pytest.raises(dl.ChecksumMismatch):
        dl.download(["bmmc_cite"], root, verify_only=True, progress=False, log=lambda *_: None)


@pytest.mark.parametrize("name", ["bmmc", "pbmc_multiome", "asap_mosaic"])
def test_paper_experiments_build_and_compute_a_loss(name, tmp_path):
    """Each paper experiment's data module and 4-layer d-512 model, built on a tiny .h5mu (RNA counts, 3 ADTs,
    20 synthetic peaks; the mosaic file lacks proteins in half the cells), from scratch; one batch's losses."""
    import mudata

    from scgpt_train.pipeline import build_modules

    rng = np.random.default_rng(0)
    n, cells = 16, [f"c{i}" for i in range(16)]
    genes = [f"G{i}" for i in range(30)]
    obs = pd.DataFrame({"cell_type": np.tile(["T", "B"], 8), "batch": np.repeat(["a", "b"], 8)}, index=cells)
    mods = {
        "rna": ad.AnnData(sp.csr_matrix(rng.poisson(2, (n, 30)).astype(np.float32)), var=pd.DataFrame(index=genes)),
        "prot": ad.AnnData(rng.poisson(9, (n, 3)).astype(np.float32), var=pd.DataFrame(index=["CD3", "CD4", "CD19"])),
        "atac": ad.AnnData(
            sp.csr_matrix((rng.random((n, 20)) < 0.4).astype(np.float32)),
            var=pd.DataFrame(index=[f"chr2_{100 * i}_{100 * i + 50}" for i in range(20)]),
        ),
    }
    for key, a in mods.items():
        a.obs_names = cells
        if key == "prot" and name == "asap_mosaic":
            mods[key] = a[:8].copy()
    md = mudata.MuData(mods)
    md.obs = md.obs.join(obs)
    md.write_h5mu(tmp_path / "tiny.h5mu")
    over = [
        f"experiment=finetune_multiomic_{name}", f"data.path={tmp_path}/tiny.h5mu", "gene_embeddings_from=null",
        f"paths.output_dir={tmp_path}", "data.num_workers=0", "data.modalities.RNA.n_top=20",
    ]  # fmt: skip
    if name == "bmmc":
        over += ["data.modalities.RNA.layer=null", "data.modalities.Protein.layer=null"]
    else:
        over += ["data.modalities.ATAC.n_top=10"]
    dm, module = build_modules(_compose(over))
    assert module.model.config()["d_model"] == 512 and len(module.model.layers) == 4
    batch = next(iter(dm.train_dataloader()))
    terms = module.compute_losses(batch, step=0)
    assert torch.isfinite(terms["loss"]) and set(terms) >= {"mlm/mlm", "mlm/gepc", "dar/dar"}
    if name == "asap_mosaic":
        assert dm.obs["modalities"].value_counts().to_dict() == {"RNA+Protein+ATAC": 8, "RNA+ATAC": 8}
        from hydra.utils import instantiate

        task = instantiate(_compose(over).task)
        emb = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
        task._write_h5mu(dm, emb, tmp_path)  # a MuData input gets its embeddings back in a .h5mu
        np.testing.assert_array_equal(mudata.read_h5mu(tmp_path / "predictions.h5mu").obsm["X_scgpt"], emb)


def test_scvi_baselines_run_on_rna_protein_and_rna_atac(tmp_path):
    """totalVI on RNA + protein, MultiVI on RNA + ATAC (synthetic counts, 2 epochs), pca_concat on both; a
    baseline that does not fit the data's modalities is reported, never faked."""
    pytest.importorskip("scvi", reason="scvi-tools (the baselines extra) not installed")
    from test_multiomic_data import PROT, RNA, _atac_h5mu, _dm, _synthetic

    from scgpt_train.tasks.multiomic import MultiomicIntegrationTask

    settings = {"max_epochs": 2, "batch_size": 8}
    task = MultiomicIntegrationTask(baselines=["pca_concat", "totalvi", "multivi"], totalvi=settings, multivi=settings)
    path, _, _ = _atac_h5mu(tmp_path, n=24)
    atac = {"kind": "atac", "values": "counts", "n_top": 10, "selection": "accessible"}
    dm = _dm(path, {"RNA": RNA, "ATAC": atac}, batch_key="batch")
    emb, rep = task.baseline_embeddings(dm, dm.obs["batch"].to_numpy())
    assert set(emb) == {"pca_concat", "multivi"} and all(np.isfinite(e).all() for e in emb.values())
    assert rep["skipped_baselines"] == {"totalvi": "not applicable (needs RNA + protein)"}
    x, obs, genes = _synthetic(24)
    a = ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))
    a.obsm["protein_expression"] = np.random.default_rng(3).poisson(15, (24, 3)).astype(np.float32) + 1
    a.uns["protein_names"] = np.array(["CD3", "CD19", "CD56"])
    a.write_h5ad(tmp_path / "p.h5ad")
    dm = _dm(tmp_path / "p.h5ad", {"RNA": RNA, "Protein": PROT}, batch_key="batch")
    emb, rep = task.baseline_embeddings(dm, dm.obs["batch"].to_numpy())
    assert set(emb) == {"pca_concat", "totalvi"} and emb["totalvi"].shape[0] == 24


def test_the_rna_only_row_of_the_mosaic_variant_builds_its_data(citeseq_file, tmp_path):
    """benchmark=multiomic_demo's RNA-only scGPT row of the mosaic variant: the seed config drops the variant's
    data.withhold (the data module refused to withhold proteins from a run that reads only RNA, and the benchmark
    stopped there); the data module of that config sets up on the real cells with RNA only."""
    from data_modules.multiomic.demo import build_citeseq_demo
    from scgpt_train.benchmarks.multiomic import rna_only_config
    from scgpt_train.pipeline import build_modules

    paired = build_citeseq_demo(tmp_path / "paired.h5ad", citeseq_file)
    bench = {"name": "multiomic_demo", "task": "multiomic", "experiment": "finetune_multiomic_demo"}
    extra = [
        "data.withhold={modality:Protein,key:batch,values:[B]}", f"data.path={paired}",
        f"paths.cache_dir={citeseq_file.parents[1]}", "data.modalities.RNA.n_top=200", "layout.max_seq_len=215",
    ]  # fmt: skip
    cfg = rna_only_config({**bench, "baselines": ["pca_concat"]}, 0, tmp_path / "seed_0_rna_only", extra, _compose)
    assert cfg.data.withhold is None and list(cfg.data.use_modalities) == ["RNA"] and list(cfg.task.baselines) == []
    datamodule, _ = build_modules(cfg)  # the benchmark's run stopped here with MultiomicInputError
    assert list(datamodule.mods) == ["RNA"]
