"""Census path on a local SOMA experiment in the CELLxGENE Census layout (no internet)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

pytest.importorskip("tiledbsoma")

from data_modules.store import Corpus  # noqa: E402
from data_modules.store.census import PAPER_FILTER, convert_census  # noqa: E402
from data_modules.store.cli import build_main  # noqa: E402
from data_modules.store.inspect import to_anndata  # noqa: E402
from data_modules.store.synthetic import make_census_soma  # noqa: E402
from data_modules.vocab import GeneVocab  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts/build_corpus.py"


@pytest.fixture(scope="module")
def census(tmp_path_factory):
    """A 600-cell homo_sapiens experiment: obs with the Census columns, var feature_id/feature_name, X/raw."""
    rng = np.random.default_rng(0)
    n, g = 600, 80
    X = sp.random(n, g, density=0.15, format="csr", random_state=1, dtype=np.float32)
    X.data = np.ceil(X.data * 30)
    keep_rows = np.ones(n, dtype=np.float32)
    keep_rows[[5, 17]] = 0  # empty cells (dropped)
    X = sp.csr_matrix(sp.diags(keep_rows) @ X)
    X.eliminate_zeros()
    obs = pd.DataFrame(
        {
            "dataset_id": np.repeat(["ds-a", "ds-b", "ds-c"], n // 3),
            "disease": rng.choice(["normal", "COVID-19"], n, p=[0.8, 0.2]),
            "suspension_type": rng.choice(["cell", "nucleus", "na"], n, p=[0.6, 0.3, 0.1]),
            "cell_type": rng.choice(["T cell", "B cell", "monocyte"], n),
            "tissue": rng.choice(["blood", "lung"], n),
            "assay": "10x 3' v3",
            "donor_id": rng.choice(["d1", "d2", "d3"], n),
            "is_primary_data": True,
        },
        index=[str(i) for i in range(n)],
    )
    var = pd.DataFrame(
        {
            "feature_id": [f"ENSG{i:011d}" for i in range(g)],
            "feature_name": [f"GENE{i}" for i in range(g)],
            "feature_length": 1000,
        },
        index=[str(i) for i in range(g)],
    )
    adata = ad.AnnData(X, obs=obs, var=var)
    uri = make_census_soma(tmp_path_factory.mktemp("soma") / "census", adata)
    selected = (obs["disease"] == "normal") & (obs["suspension_type"] != "na")
    expected = adata[selected.to_numpy() & (np.diff(X.indptr) > 0)]
    return uri, adata, expected


def test_census_cli_paper_query_round_trip(census, tmp_path, capsys):
    uri, adata, expected = census
    out = tmp_path / "corpus"
    rc = build_main(
        [
            "census",
            "--census-uri",
            uri,
            "--out",
            str(out),
            "--shard-size",
            "100",
            "--chunk-size",
            "70",
            "--val-datasets",
            "ds-c",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert "ds-a" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["census"]["value_filter"] == PAPER_FILTER == "disease == 'normal' and suspension_type != 'na'"
    assert m["n_cells"] == expected.n_obs
    n_selected = int(((adata.obs.disease == "normal") & (adata.obs.suspension_type != "na")).sum())
    assert sum(d["n_cells_dropped"] for d in m["datasets"]) == n_selected - expected.n_obs
    back = to_anndata(out)
    np.testing.assert_array_equal(back[:, expected.var.feature_name].X.toarray(), expected.X.toarray())
    np.testing.assert_array_equal(back.obs["source_row"], expected.obs_names.astype(int))  # soma_joinid
    for col in ("cell_type", "tissue", "assay", "disease", "donor_id"):
        np.testing.assert_array_equal(back.obs[col].astype(str), expected.obs[col].astype(str))
    np.testing.assert_array_equal(back.obs["dataset"].astype(str), expected.obs["dataset_id"].astype(str))
    assert set(back.obs["disease"]) == {"normal"} and "na" not in set(back.obs.get("suspension_type", []))
    corpus = Corpus(out)
    val = corpus.in_validation(corpus.read_cells(0, corpus.n_cells))
    np.testing.assert_array_equal(val, expected.obs["dataset_id"].to_numpy() == "ds-c")


def test_census_by_ensembl_id_onto_symbol_vocab(census, tmp_path):
    uri, adata, expected = census
    vocab = GeneVocab.from_genes([f"GENE{i}" for i in range(0, 80, 2)])  # half the genes known
    by_id = convert_census(tmp_path / "by_id", uri=uri, vocab=vocab, gene_column="feature_id", shard_size=1000)
    by_name = convert_census(tmp_path / "by_name", uri=uri, vocab=vocab, gene_column="feature_name", shard_size=1000)
    assert by_id["datasets"][0]["n_genes_known"] == 40
    a, b = to_anndata(tmp_path / "by_id"), to_anndata(tmp_path / "by_name")
    assert (a.X != b.X).nnz == 0 and a.n_obs == b.n_obs
    lost = sum(d["counts_lost_unknown_genes"] for d in by_id["datasets"])
    assert lost > 0 and lost == sum(d["counts_lost_unknown_genes"] for d in by_name["datasets"])


def test_census_kill_and_resume(census, tmp_path):
    uri, _, _ = census
    args = ["census", "--census-uri", uri, "--shard-size", "40", "--chunk-size", "30"]
    assert build_main([*args, "--out", str(tmp_path / "ref"), "--quiet"]) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "SCGPT_CORPUS_PAUSE_S": "0.5"}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args, "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = out / ".journal" / "state.json"
    deadline = time.time() + 90
    while not state.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert build_main([*args, "--out", str(out), "--quiet"]) == 0
    ref, got = (json.loads((p / "manifest.json").read_text()) for p in (tmp_path / "ref", out))
    assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert got["datasets"] == ref["datasets"]


def test_census_errors(census, tmp_path, capsys):
    uri, _, _ = census
    assert (
        build_main(
            ["census", "--census-uri", uri, "--out", str(tmp_path / "x"), "--organism", "mus_musculus", "--quiet"]
        )
        == 2
    )
    assert "census_data/mus_musculus" in capsys.readouterr().err
    assert (
        build_main(
            [
                "census",
                "--census-uri",
                uri,
                "--out",
                str(tmp_path / "x"),
                "--value-filter",
                "disease == 'nothing'",
                "--quiet",
            ]
        )
        == 2
    )
    assert "no cell" in capsys.readouterr().err
    assert (
        build_main(["census", "--census-uri", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    )
    assert "cannot open it as a SOMA collection" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
