"""Corpus store: exact round trip, reader API, splits, verify / info / export CLIs."""

import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_modules.store import CellBlock, Corpus
from data_modules.store.cli import build_main, corpus_main
from data_modules.store.convert import Source, convert_sources
from data_modules.store.inspect import to_anndata, verify_corpus
from data_modules.store.split import split_membership
from data_modules.vocab import GeneVocab

CELLTYPIST_SAMPLE = Path(pd.__file__).parents[1] / "celltypist/data/samples/sample_cell_by_gene.csv"


@pytest.fixture(scope="module")
def real_h5ads(tmp_path_factory):
    """Two h5ad files of real raw counts (celltypist's 559-cell sample) with obs labels."""
    d = tmp_path_factory.mktemp("real")
    df = pd.read_csv(CELLTYPIST_SAMPLE, index_col=0)
    X = sp.csr_matrix(df.to_numpy(dtype=np.float32))
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["T cell", "B cell", "monocyte"], len(df))),
            "donor": rng.choice(["d1", "d2", "d3"], len(df)),  # plain string column
            "tissue": pd.Categorical(rng.choice(["blood", "bone marrow"], len(df))),
        },
        index=df.index.astype(str),
    )
    adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=df.columns.astype(str)))
    paths = []
    for name, rows in (("first", slice(0, 300)), ("second", slice(300, None))):
        part = adata[rows].copy()
        if name == "second":
            part = part[:, part.var_names[::-1]].copy()  # different gene order per file
        part.write_h5ad(d / f"{name}.h5ad")
        paths.append(d / f"{name}.h5ad")
    return adata, paths


def _dense_by_gene(a: ad.AnnData, genes) -> np.ndarray:
    return np.asarray(a[:, list(genes)].X.todense())


def test_round_trip_every_cell_counts_genes_obs(real_h5ads, tmp_path, capsys):
    adata, paths = real_h5ads
    out = tmp_path / "corpus"
    rc = build_main(
        [
            "h5ad",
            *map(str, paths),
            "--out",
            str(out),
            "--obs-columns",
            "cell_type",
            "tissue",
            "batch=donor",
            "--shard-size",
            "128",
            "--chunk-size",
            "50",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "first" in printed and "second" in printed  # per-dataset report
    manifest = json.loads((out / "manifest.json").read_text())
    kept = np.asarray((adata.X > 0).sum(axis=1)).ravel() > 0
    assert manifest["n_cells"] == int(kept.sum())
    assert sum(d["n_cells_dropped"] for d in manifest["datasets"]) == int((~kept).sum())
    assert manifest["n_genes"] == adata.n_vars
    assert {s["dtype"] for s in manifest["shards"]} <= {"uint16", "uint32"}

    assert (
        corpus_main(["export", str(out), "--cells", f"0:{manifest['n_cells']}", "--out", str(tmp_path / "all.h5ad")])
        == 0
    )
    back = ad.read_h5ad(tmp_path / "all.h5ad")
    expected = adata[kept]
    np.testing.assert_array_equal(_dense_by_gene(back, expected.var_names), np.asarray(expected.X.todense()))
    assert set(back.var_names) == set(adata.var_names)
    np.testing.assert_array_equal(back.obs["cell_type"].astype(str), expected.obs["cell_type"].astype(str))
    np.testing.assert_array_equal(back.obs["tissue"].astype(str), expected.obs["tissue"].astype(str))
    np.testing.assert_array_equal(back.obs["batch"].astype(str), expected.obs["donor"].astype(str))
    np.testing.assert_array_equal(
        back.obs["dataset"].astype(str), np.where(np.arange(adata.n_obs)[kept] < 300, "first", "second")
    )
    source_rows = np.concatenate([np.arange(300), np.arange(adata.n_obs - 300)])[kept]
    np.testing.assert_array_equal(back.obs["source_row"], source_rows)

    # a slice crossing shard boundaries equals the same rows of the full export
    assert (
        corpus_main(["export", str(out), "--cells", "100:300", "--out", str(tmp_path / "s.h5ad"), "--genes", "present"])
        == 0
    )
    part = ad.read_h5ad(tmp_path / "s.h5ad")
    np.testing.assert_array_equal(_dense_by_gene(part, part.var_names), _dense_by_gene(back[100:300], part.var_names))
    assert np.all(np.asarray(part.X.sum(axis=0)).ravel() > 0)


def test_reader_blocks_match_input_and_lead_api(tmp_path):
    """In-memory AnnData (log-normalized .raw) through the API the demo uses."""
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    out = tmp_path / "demo"
    manifest = convert_sources(
        [Source("pbmc", pbmc, use_raw=True)],
        out,
        obs_columns=["bulk_labels"],
        allow_float=True,
        shard_size=256,
        split={"strategy": "cell", "seed": 0, "val_fraction": 0.1},
    )
    corpus = Corpus(out)
    assert corpus.n_cells == pbmc.n_obs == manifest["n_cells"] and corpus.n_shards == 3
    assert corpus.shard_offsets.tolist() == [0, 256, 512, 700]
    assert {s["dtype"] for s in corpus.shards} == {"float32"}
    raw = pbmc.raw.X.toarray() if sp.issparse(pbmc.raw.X) else pbmc.raw.X
    vocab_ids = corpus.vocab.map_genes(list(pbmc.raw.var_names)).ids
    block = corpus.read_cells(250, 300)  # spans shards 0 and 1
    dense = np.zeros((len(block), len(corpus.vocab)), dtype=np.float32)
    rows = np.repeat(np.arange(len(block)), block.nnz_per_cell)
    dense[rows, block.gene_ids] = block.counts
    np.testing.assert_array_equal(dense[:, vocab_ids], raw[250:300].astype(np.float32))
    assert block.gene_ids.dtype == np.int32 and np.all(block.cell_index == np.arange(250, 300))
    labels = np.array(corpus.obs_columns["bulk_labels"])[block.obs["bulk_labels"]]
    np.testing.assert_array_equal(labels, pbmc.obs["bulk_labels"].astype(str).to_numpy()[250:300])
    # take / concat keep rows and entries aligned
    sub = block.take(np.array([3, 0, 7]))
    again = CellBlock.concat([block.take(np.array([3])), block.take(np.array([0, 7]))])
    np.testing.assert_array_equal(sub.counts, again.counts)
    np.testing.assert_array_equal(sub.cell_index, [253, 250, 257])
    # the split recorded in the manifest reproduces from ids alone
    val = corpus.in_validation(corpus.read_cells(0, corpus.n_cells))
    assert val.sum() == manifest["split"]["n_val"] and 0.05 < val.mean() < 0.15
    with pytest.raises(IndexError):
        corpus.read_cells(600, 800)
    corpus.close()
    # rerunning the same call is a no-op; different arguments need overwrite
    assert (
        convert_sources(
            [Source("pbmc", pbmc, use_raw=True)],
            out,
            obs_columns=["bulk_labels"],
            allow_float=True,
            shard_size=256,
            split={"strategy": "cell", "seed": 0, "val_fraction": 0.1},
        )["creation"]
        == manifest["creation"]
    )
    with pytest.raises(ValueError, match="other arguments.*--overwrite"):
        convert_sources([Source("pbmc", pbmc, use_raw=True)], out, allow_float=True, shard_size=100)
    m2 = convert_sources([Source("pbmc", pbmc, use_raw=True)], out, allow_float=True, shard_size=100, overwrite=True)
    assert len(m2["shards"]) == 7 and len(list((out / "shards").iterdir())) == 7


def test_splits_by_cell_and_by_dataset(real_h5ads, tmp_path):
    _, paths = real_h5ads
    sources = [Source(p.stem, str(p)) for p in paths]
    m = convert_sources(
        sources, tmp_path / "ds", shard_size=200, split={"strategy": "dataset", "val_datasets": ["second"]}
    )
    corpus = Corpus(tmp_path / "ds")
    block = corpus.read_cells(0, corpus.n_cells)
    is_second = np.array(corpus.obs_columns["dataset"])[block.obs["dataset"]] == "second"
    np.testing.assert_array_equal(corpus.in_validation(block), is_second)
    assert m["split"]["n_val"] == int(is_second.sum())
    with pytest.raises(ValueError, match="name no input dataset"):
        convert_sources(sources, tmp_path / "bad", split={"strategy": "dataset", "val_datasets": ["nope"]})
    assert not (tmp_path / "bad").exists()
    ids = np.arange(100_000)
    a = split_membership({"strategy": "cell", "seed": 3, "val_fraction": 0.2}, ids, None)
    b = split_membership({"strategy": "cell", "seed": 3, "val_fraction": 0.2}, ids, None)
    c = split_membership({"strategy": "cell", "seed": 4, "val_fraction": 0.2}, ids, None)
    np.testing.assert_array_equal(a, b)
    assert abs(a.mean() - 0.2) < 0.01 and (a != c).any()


def test_map_by_ensembl_id_and_by_gene_column(tmp_path):
    genes = pd.DataFrame(
        {"symbol": ["ACTB", "GAPDH", "CD3E", "XIST"]},
        index=["ENSG00000075624", "ENSG00000111640", "ENSG00000198851", "ENSG00000229807"],
    )
    X = sp.csr_matrix(np.array([[1, 0, 2, 5], [0, 3, 0, 1]], dtype=np.float32))
    adata = ad.AnnData(X, var=genes)
    adata.write_h5ad(tmp_path / "ens.h5ad")
    vocab = GeneVocab.from_genes(["ACTB", "CD3E", "GAPDH", "MS4A1"])
    vocab.to_json(tmp_path / "vocab.json")
    (tmp_path / "table.tsv").write_text(
        "feature_id\tfeature_name\n" + "\n".join(f"{i}\t{s}" for i, s in zip(genes.index, genes.symbol, strict=True))
    )
    common = [str(tmp_path / "ens.h5ad"), "--vocab", str(tmp_path / "vocab.json"), "--no-split", "--quiet"]
    assert (
        build_main(["h5ad", *common, "--out", str(tmp_path / "by_ens"), "--gene-table", str(tmp_path / "table.tsv")])
        == 0
    )
    assert build_main(["h5ad", *common, "--out", str(tmp_path / "by_sym"), "--gene-column", "symbol"]) == 0
    for name in ("by_ens", "by_sym"):
        back = to_anndata(tmp_path / name, genes="present")
        assert list(back.var_names) == ["ACTB", "CD3E", "GAPDH"]
        np.testing.assert_array_equal(back.X.toarray(), [[1, 2, 0], [0, 0, 3]])
        ds = json.loads((tmp_path / name / "manifest.json").read_text())["datasets"][0]
        assert ds["n_genes_unknown"] == 1 and ds["unknown_genes_sample"] in (["XIST"], ["ENSG00000229807"])
        assert ds["counts_lost_unknown_genes"] == 6.0 and ds["nnz_lost_unknown_genes"] == 2


def _build_small(tmp_path, real_h5ads) -> Path:
    _, paths = real_h5ads
    out = tmp_path / "v"
    convert_sources([Source(p.stem, str(p)) for p in paths], out, shard_size=150)
    return out


def test_verify_catches_flipped_byte_and_truncated_shard(real_h5ads, tmp_path, capsys):
    out = _build_small(tmp_path, real_h5ads)
    assert corpus_main(["verify", str(out)]) == 0
    assert "OK (4 shards verified)" in capsys.readouterr().out
    shard = out / "shards/shard-000002.h5"
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    shard.write_bytes(bytes(flipped))
    assert corpus_main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "shard 2 (shards/shard-000002.h5)" in err and "sha256" in err
    shard.write_bytes(original[: len(original) - 1000])
    assert corpus_main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "shard 2" in err and "truncated" in err
    shard.write_bytes(original)
    assert verify_corpus(out).ok


def test_verify_catches_structural_damage_with_matching_size(real_h5ads, tmp_path):
    out = _build_small(tmp_path, real_h5ads)
    with h5py.File(out / "shards/shard-000001.h5", "r+") as f:
        f["indptr"][5] = 10**9  # rewrite in place: checksum off, structure broken
    report = verify_corpus(out, checksums=False)
    assert not report.ok and "shard 1" in report.problems[0] and "indptr" in report.problems[0]


def test_info_prints_sizes(real_h5ads, tmp_path, capsys):
    out = _build_small(tmp_path, real_h5ads)
    assert corpus_main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    m = json.loads((out / "manifest.json").read_text())
    assert info["n_cells"] == m["n_cells"] and info["nnz"] == m["nnz"] and info["n_shards"] == 4
    assert info["disk_bytes"] >= sum(s["bytes"] for s in m["shards"])
    assert [d["name"] for d in info["datasets"]] == ["first", "second"]
    assert corpus_main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cells" in text and "disk size" in text and "second" in text
    assert corpus_main(["info", str(tmp_path / "nothing")]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
