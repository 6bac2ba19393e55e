"""The one batched embedding pass (scgpt_train/inference_batches.py, issue #27 items 1-2; #25 item 15's embed part):
cells sorted by length, packed, token budget, precision as a setting, on real cells (scanpy's pbmc68k_reduced as
counts, in a shuffled order so lengths vary along the file) with a small checkpoint over their genes."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import ROOT

N_CELLS = 192


def pbmc_counts() -> ad.AnnData:
    """pbmc68k_reduced's cells as integer counts (expm1 of .raw over each cell's smallest value), rows shuffled."""
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    x = sp.csr_matrix(src.raw.X, dtype=np.float64)
    x.data = np.expm1(x.data)
    x.data = np.round(x.data / np.repeat(np.minimum.reduceat(x.data, x.indptr[:-1]), np.diff(x.indptr)))
    rows = np.random.default_rng(0).permutation(x.shape[0])[:N_CELLS]
    return ad.AnnData(
        X=sp.csr_matrix(x[rows], dtype=np.float32),
        obs=pd.DataFrame({"cell_type": src.obs["bulk_labels"].astype(str).to_numpy()[rows]}, index=src.obs_names[rows]),
        var=pd.DataFrame(index=src.raw.var_names.astype(str)),
    )


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict:
    from data_modules.vocab import GeneVocab
    from scgpt_train.checkpoints import save_checkpoint
    from scgpt_train.model import ScGPT

    out = tmp_path_factory.mktemp("embed_batches")
    adata = pbmc_counts()
    adata.write_h5ad(out / "cells.h5ad")
    vocab = GeneVocab.from_genes(list(adata.var_names))
    torch.manual_seed(0)
    model = ScGPT(
        vocab_size=len(vocab), pad_token_id=vocab.pad_id, d_model=32, n_heads=2, d_ff=64, n_layers=2, dropout=0.0
    )
    return {
        "dir": out,
        "adata": adata,
        "h5ad": out / "cells.h5ad",
        "ckpt": save_checkpoint(model, vocab.token_to_id, out / "tiny.pt"),
    }


def loader_path_embeddings(ckpt, h5ad, max_seq_len=None, include_zero_genes=False) -> np.ndarray:
    """The embedding as it ran before the batched pass: the fine-tuning data module's loader (padded batches of 64
    cells in the file's order, ``CellCollate``), the model's full forward, fp32."""
    from data_modules.anndata_module import AnnDataModule
    from scgpt_train.inference import l2_normalize, load_for_inference

    model, _ = load_for_inference(ckpt)
    layout = model.layout if max_seq_len is None else model.layout.replace(max_seq_len=max_seq_len)
    dm = AnnDataModule(
        str(h5ad), vocab=str(ckpt), layout=layout, include_zero_genes=include_zero_genes, val_fraction=0.0,
        model_outputs=(),
    )  # fmt: skip
    dm.setup()
    emb = np.zeros((len(dm.split), model.d_model), dtype=np.float32)
    model.eval()
    with torch.no_grad():
        for batch in dm.loader("all", masked=False, batch_size=64):
            assert not batch.packed
            emb[batch.cell_index.numpy()] = model(**batch.model_inputs())["cell_emb"].numpy()
    return l2_normalize(emb)


@pytest.mark.parametrize("max_seq_len, include_zero_genes", [(None, False), (121, False), (121, True)])
def test_sorted_packed_embedding_equals_the_padded_path_in_input_order(real, tmp_path, max_seq_len, include_zero_genes):
    """Sorted by length, packed, cut by a token budget, fp32: the embeddings of the padded fixed-order path (the
    one embed.py ran before) within 1e-5, row for row in the input's order, obs_names kept. ``max_seq_len`` 121
    samples 120 of each cell's genes (seeded per group of 64 cells); ``include_zero_genes`` feeds zeros too (bin 0)."""
    from scgpt_train.inference import embed_h5ad

    lengths = np.diff(real["adata"].X.indptr)
    assert np.any(np.diff(lengths) > 0) and np.any(np.diff(lengths) < 0)  # the file is not in length order
    out = embed_h5ad(
        real["ckpt"], real["h5ad"], tmp_path / "out.h5ad", max_seq_len=max_seq_len,
        include_zero_genes=include_zero_genes, precision="fp32", max_tokens=4096, device="cpu", progress=False,
    )  # fmt: skip
    got = ad.read_h5ad(out)
    assert list(got.obs_names) == list(real["adata"].obs_names)
    assert got.uns["X_scgpt_precision"]["used"] == "fp32"
    expected = loader_path_embeddings(real["ckpt"], real["h5ad"], max_seq_len, include_zero_genes)
    np.testing.assert_allclose(got.obsm["X_scgpt"], expected, atol=1e-5, rtol=0)
    assert np.abs(expected[0] - expected[1]).max() > 1e-3  # the cells differ


def test_batches_are_sorted_packed_within_the_budget_and_cover_every_cell_once(real):
    """What the pass feeds the model: packed (1, T) streams of at most max_tokens tokens, longest cells first, every
    wanted cell exactly once; padded batches hold cells x their longest within the budget."""
    from data_modules.anndata_module import AnnDataModule
    from scgpt_train.inference import anndata_cells, load_for_inference
    from scgpt_train.inference_batches import BatchOptions, batches_of, plan_batches

    model, _ = load_for_inference(real["ckpt"])
    dm = AnnDataModule(str(real["h5ad"]), vocab=str(real["ckpt"]), layout=model.layout, val_fraction=0.0,
                       model_outputs=())  # fmt: skip
    dm.setup()
    cells = anndata_cells(dm)
    wanted = np.ones(N_CELLS, dtype=bool)
    wanted[[3, 50, 51]] = False
    seen, previous = [], None
    for batch in batches_of(cells, BatchOptions(max_tokens=2000), wanted):
        assert batch.packed and batch.gene_ids.shape[1] <= 2000 and not batch.pad_mask.any()
        lengths = np.diff(batch.cu_seqlens.numpy())
        assert np.all(np.diff(lengths) <= 0) and (previous is None or lengths[0] <= previous)
        previous = lengths[-1]
        seen.extend(batch.cell_index.tolist())
    assert sorted(seen) == sorted(np.flatnonzero(wanted).tolist())
    for batch in batches_of(cells, BatchOptions(max_tokens=2000, layout="padded")):
        assert not batch.packed and batch.gene_ids.numel() <= 2000
    # a cell longer than the budget is a batch of its own; max_cells caps a batch
    plan = plan_batches(np.array([5, 50, 7, 3]), BatchOptions(max_tokens=20, max_cells=2))
    assert [p.tolist() for p in plan] == [[1], [2, 0], [3]]
    with pytest.raises(ValueError, match="max_tokens must be a positive number"):
        BatchOptions(max_tokens=0)
    # the default budget depends on the device (inference_batches' doc: smaller streams are faster on a CPU)
    from scgpt_train.inference_batches import CPU_MAX_TOKENS, DEFAULT_MAX_TOKENS

    assert (BatchOptions().on("cpu").max_tokens, BatchOptions().on("cuda").max_tokens) == (4096, 16384)
    assert (CPU_MAX_TOKENS, DEFAULT_MAX_TOKENS) == (4096, 16384)
    assert BatchOptions(max_tokens=2000).on("cpu").max_tokens == 2000
    with pytest.raises(ValueError, match="depends on the device"):
        plan_batches(np.array([5, 50]), BatchOptions())
    with pytest.raises(ValueError, match="'auto' or None"):
        BatchOptions(max_tokens="many")


# precision as a setting (scgpt_train/precision.py through embed.py) -----------------------------------------------
def _embed_main():
    import runpy

    return runpy.run_path(str(ROOT / "scripts" / "embed.py"))["main"]


@pytest.mark.parametrize("flags", [[], ["amx_bf16", "avx512_bf16"]])
def test_auto_precision_follows_the_processor_and_says_so(real, tmp_path, capsys, monkeypatch, flags):
    """embed.py --precision auto with the CPU's bf16 detection mocked both ways: fp32 without native bf16 (never bf16
    silently), bf16 autocast with it; one printed line says which and why; bf16 embeddings stay within cosine 0.999
    of fp32 on real cells."""
    import scgpt_train.precision as precision

    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda *a, **k: list(flags))
    main = _embed_main()
    base = ["--checkpoint", str(real["ckpt"]), "--input", str(real["h5ad"]), "--device", "cpu"]
    assert main([*base, "--output", str(tmp_path / "auto.h5ad")]) == 0
    stdout = capsys.readouterr().out
    used = "bf16" if flags else "fp32"
    line = [s for s in stdout.splitlines() if s.startswith("precision: ")]
    assert len(line) == 1, stdout
    if flags:
        assert "auto -> bf16 autocast (the CPU has amx_bf16, avx512_bf16)" in line[0]
    else:
        assert "auto -> fp32 (the CPU reports no native bf16" in line[0]
    auto = ad.read_h5ad(tmp_path / "auto.h5ad")
    assert auto.uns["X_scgpt_precision"]["used"] == used
    assert main([*base, "--output", str(tmp_path / "fp32.h5ad"), "--precision", "fp32"]) == 0
    fp32 = ad.read_h5ad(tmp_path / "fp32.h5ad").obsm["X_scgpt"]
    cosine = np.sum(auto.obsm["X_scgpt"] * fp32, axis=1)  # both L2-normalized
    if flags:
        assert cosine.min() >= 0.999 and np.abs(auto.obsm["X_scgpt"] - fp32).max() > 0
    else:
        np.testing.assert_array_equal(auto.obsm["X_scgpt"], fp32)


def test_wrong_settings_are_refused_before_anything_is_written(real, tmp_path, capsys):
    from scgpt_train import api
    from scgpt_train.errors import UserInputError

    main = _embed_main()
    base = ["--checkpoint", str(real["ckpt"]), "--input", str(real["h5ad"]), "--output", str(tmp_path / "o.h5ad")]
    for extra in (["--precision", "fp16"], ["--max-tokens", "0"], ["--batch-size", "-1"]):
        with pytest.raises(SystemExit) as e:
            main([*base, *extra])
        assert e.value.code == 2
        assert extra[0] in capsys.readouterr().err
    assert not (tmp_path / "o.h5ad").exists()
    with pytest.raises(UserInputError, match="'fp16' is not one of"):
        api.embed(real["adata"][:8].copy(), real["ckpt"], precision="fp16")


# issue #25 item 15: ids and a symbol column that disagree; --prefer-gene-column / prefer_gene_column --------------
@pytest.fixture(scope="module")
def ids_and_symbols(real) -> dict:
    """The cells with Ensembl ids (GENCODE v44, shipped with celltypist) as var_names and a ``gene_symbols`` column
    whose symbols of the two most expressed genes are swapped."""
    from data_modules.vocab import gene_table

    by_symbol = {}
    for gid, symbol in gene_table().items():
        by_symbol.setdefault(symbol, []).append(gid)
    adata = real["adata"][:48].copy()
    keep = [g for g in adata.var_names if len(by_symbol.get(g, [])) == 1]
    adata = adata[:, keep].copy()
    symbols = np.asarray(adata.var_names, dtype=object)
    top = np.argsort(-np.asarray(adata.X.sum(0)).ravel())[:2]
    column = symbols.copy()
    column[top] = column[top[::-1]]
    adata.var = pd.DataFrame({"gene_symbols": column}, index=[by_symbol[g][0] for g in symbols])
    path = real["dir"] / "ids_and_symbols.h5ad"
    adata.write_h5ad(path)
    return {"adata": adata, "path": path, "swapped": [str(s) for s in symbols[top]]}


def test_prefer_gene_column_in_embed_py(real, ids_and_symbols, tmp_path, capsys):
    main = _embed_main()
    base = ["--checkpoint", str(real["ckpt"]), "--input", str(ids_and_symbols["path"]), "--device", "cpu"]
    assert main([*base, "--output", str(tmp_path / "ids.h5ad")]) == 0
    assert main([*base, "--output", str(tmp_path / "column.h5ad"), "--prefer-gene-column"]) == 0
    stdout = capsys.readouterr().out
    assert "2 of" in stdout and "the Ensembl ids were used" in stdout and "the column was used, as asked" in stdout
    ids, column = ad.read_h5ad(tmp_path / "ids.h5ad"), ad.read_h5ad(tmp_path / "column.h5ad")
    assert ids.uns["X_scgpt_gene_ids"]["authority"] == "ids"
    assert column.uns["X_scgpt_gene_ids"]["authority"] == "column"
    assert np.abs(ids.obsm["X_scgpt"] - column.obsm["X_scgpt"]).max() > 1e-4  # the two genes' counts were swapped


def test_prefer_gene_column_in_the_api(real, ids_and_symbols):
    from scgpt_train import api

    kw = dict(device="cpu", precision="fp32")
    ids = api.embed(ids_and_symbols["adata"], real["ckpt"], **kw)
    column = api.embed(ids_and_symbols["adata"], real["ckpt"], prefer_gene_column=True, **kw)
    assert ids.uns["X_scgpt_gene_ids"]["authority"] == "ids"
    assert column.uns["X_scgpt_gene_ids"]["authority"] == "column"
    assert list(column.obs_names) == list(ids_and_symbols["adata"].obs_names)
    assert np.abs(ids.obsm["X_scgpt"] - column.obsm["X_scgpt"]).max() > 1e-4
