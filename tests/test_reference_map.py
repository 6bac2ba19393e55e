"""Zero-shot reference mapping (scgpt_train/tasks/reference_map/, scripts/reference_map.py) with the official tiny
checkpoint on real h5ad files and real corpora built by the project's converter: separable toy cell types map
perfectly, shuffled reference labels map at chance, saved indexes give the same neighbours, atlas mode on a
50,000-cell corpus is resumable with bounded memory, and bad inputs are refused by name."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import FIXTURES, ROOT

from scgpt_train.benchmarks.zeroshot import run_zeroshot_benchmark
from scgpt_train.tasks import reference_map as rm

TYPES = ("T cell", "B cell", "NK cell", "monocyte")
BLOCK = 25  # genes per cell type: type t expresses vocabulary genes t*25 .. t*25+24
ENV_1T = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def vocab_genes() -> list[str]:
    return [g for g in json.loads((FIXTURES / "vocab.json").read_text()) if not g.startswith("<")]


def toy_cells(n: int, seed: int, genes_per_cell: int | None = None, prefix: str = "c") -> ad.AnnData:
    """Raw counts of ``n`` cells of the four TYPES (cycled), each expressing its own block of genes: all 25 of
    them (Poisson 3 over background 0.05 elsewhere), or ``genes_per_cell`` of them drawn per cell."""
    genes = vocab_genes()
    rng = np.random.default_rng(seed)
    t = np.arange(n) % len(TYPES)
    if genes_per_cell is None:
        x = rng.poisson(0.05, (n, len(genes))).astype(np.float32)
        for k in range(len(TYPES)):
            rows = np.flatnonzero(t == k)
            x[np.ix_(rows, np.arange(k * BLOCK, (k + 1) * BLOCK))] += rng.poisson(3.0, (len(rows), BLOCK))
        x = sp.csr_matrix(x)
    else:
        pick = np.argsort(rng.random((n, BLOCK)), axis=1)[:, :genes_per_cell]  # (n, g) distinct genes per cell
        cols = np.sort(pick + (t * BLOCK)[:, None], axis=1).ravel()
        rows = np.repeat(np.arange(n), genes_per_cell)
        vals = (1 + rng.poisson(2.0, n * genes_per_cell)).astype(np.float32)
        x = sp.csr_matrix((vals, (rows, cols)), shape=(n, len(genes)))
    obs = pd.DataFrame({"cell_type": np.asarray(TYPES)[t]}, index=[f"{prefix}{i}" for i in range(n)])
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny model gains nothing from threads; on shared cores more threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    ref, query = d / "ref.h5ad", d / "query.h5ad"
    toy_cells(240, 0, prefix="r").write_h5ad(ref)
    q = toy_cells(120, 1, prefix="q")
    q.obs_names = [f"query-cell-{i}" for i in range(q.n_obs)]  # names unlike the reference's
    q.write_h5ad(query)
    return ref, query


@pytest.fixture(scope="module")
def toy_embeddings(toy):
    ref, query = toy
    model, vocab = rm.load_model(FIXTURES)
    kw = dict(batch_size=32, seed=0, device="cpu", progress=False)
    return rm.embed_adata(model, vocab, FIXTURES, ref, **kw), rm.embed_adata(model, vocab, FIXTURES, query, **kw)


def _script_main():
    spec = importlib.util.spec_from_file_location("reference_map_script", ROOT / "scripts" / "reference_map.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_separable_toy_reference_maps_with_accuracy_one(toy, tmp_path, backend):
    if backend == "faiss" and not rm.faiss_available():
        pytest.skip("faiss-cpu is not installed")
    ref, query = toy
    out = tmp_path / "mapped.h5ad"
    summary = rm.run_reference_map(
        FIXTURES, ref, query, "cell_type", out, knn_backend=backend, batch_size=32, l1_c_grid=[1.0], progress=False
    )
    assert summary["index"]["backend"] == backend and summary["index"]["kind"] == "flat"
    assert summary["metrics"]["scgpt_knn"]["accuracy"] == 1.0
    assert summary["metrics"]["scgpt_knn"]["macro_f1"] == 1.0
    assert set(summary["metrics"]) == {"scgpt_knn", "hvg_pca_knn", "l1_lr"}
    res, q = ad.read_h5ad(out), ad.read_h5ad(query)
    assert list(res.obs_names) == list(q.obs_names) and res.n_vars == q.n_vars  # AnnData in, AnnData out
    assert (res.obs["ref_pred"].astype(str) == q.obs["cell_type"].astype(str)).all()
    assert res.obsm["X_scgpt"].shape == (120, 32)
    np.testing.assert_allclose(np.linalg.norm(res.obsm["X_scgpt"], axis=1), 1.0, rtol=1e-5)
    dist, nb = res.obsm["X_scgpt_knn_distances"], res.obsm["X_scgpt_knn_indices"]
    assert dist.shape == nb.shape == (120, 10) and np.all(np.diff(dist, axis=1) >= -1e-6)
    assert np.all((nb >= 0) & (nb < 240))
    # every neighbour of a query cell is a reference cell of its type (reference rows are cycled types)
    assert np.all(nb % 4 == (np.arange(120) % 4)[:, None])
    np.testing.assert_allclose(res.obs["ref_knn_dist_min"], dist[:, 0], rtol=1e-6)
    assert np.all(res.obs["ref_pred_score"] == 1.0)
    assert res.uns["reference_map"]["index"]["backend"] == backend


def test_query_embedding_equals_embed_py(toy, toy_embeddings, tmp_path):
    """Reference mapping embeds through embed.py's path: the same seed and batch size give the same vectors."""
    from scgpt_train.inference import embed_h5ad

    _, query = toy
    out = embed_h5ad(FIXTURES, query, tmp_path / "embedded.h5ad", batch_size=32, seed=0, device="cpu", progress=False)
    np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_scgpt"], toy_embeddings[1].emb, atol=1e-6)


def test_shuffled_reference_labels_map_at_chance(toy_embeddings):
    ref, query = toy_embeddings
    labels = np.arange(ref.emb.shape[0]) % 4  # the reference's true codes (types cycle)
    truth = np.arange(query.emb.shape[0]) % 4
    accs = []
    for seed in range(5):
        shuffled = np.random.default_rng(seed).permutation(labels)
        index = rm.build_index(ref.emb, shuffled, list(TYPES), seed=seed)
        dist, nb = index.search(query.emb, 10)
        pred, _ = rm.knn_vote(nb, dist, index.labels, 4)
        accs.append(float((pred == truth).mean()))
    # chance is 0.25; 120 query cells: sd ~0.04 for a random labelling
    assert max(accs) <= 0.45, accs
    assert np.mean(accs) <= 0.35, accs
    # the same index with the true labels is perfect
    index = rm.build_index(ref.emb, labels, list(TYPES))
    dist, nb = index.search(query.emb, 10)
    assert (rm.knn_vote(nb, dist, index.labels, 4)[0] == truth).all()


@pytest.mark.parametrize(
    "backend, kind", [("faiss", "flat"), ("faiss", "ivfpq"), ("sklearn", "flat")], ids=["faiss-flat", "ivfpq", "sk"]
)
def test_index_save_and_reload_gives_identical_neighbours(tmp_path, backend, kind):
    if backend == "faiss" and not rm.faiss_available():
        pytest.skip("faiss-cpu is not installed")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 32))
    x = rm.l2_normalize(centers[np.arange(6000) % 8] + 0.3 * rng.normal(size=(6000, 32)))
    q = rm.l2_normalize(centers[np.arange(300) % 8] + 0.3 * rng.normal(size=(300, 32)))
    labels = (np.arange(6000) % 8).astype(np.int32)
    index = rm.build_index(x, labels, [f"t{i}" for i in range(8)], kind, backend, seed=3)
    assert index.spec.kind == kind and index.spec.backend == backend
    d1, n1 = index.search(q, 10)
    index.save(tmp_path / "idx")
    loaded, meta = rm.KnnIndex.load(tmp_path / "idx")
    d2, n2 = loaded.search(q, 10)
    np.testing.assert_array_equal(n1, n2)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(loaded.labels, labels)
    assert meta["spec"]["kind"] == kind and loaded.label_names == [f"t{i}" for i in range(8)]
    pred, _ = rm.knn_vote(n2, d2, loaded.labels, 8)
    assert (pred == np.arange(300) % 8).mean() >= 0.95  # IVF-PQ is approximate, not wrong


def test_without_faiss_the_sklearn_fallback_finds_the_exact_neighbours(toy_embeddings, monkeypatch):
    ref, query = toy_embeddings
    labels = np.arange(ref.emb.shape[0]) % 4
    exact = None
    if rm.faiss_available():
        index = rm.build_index(ref.emb, labels, list(TYPES), "flat", "faiss")
        exact = index.search(query.emb, 10)
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError, as when not installed
    assert not rm.faiss_available()
    spec = rm.choose_index(10**6, 32)  # a large reference without faiss: exact search, not IVF-PQ
    assert (spec.backend, spec.kind) == ("sklearn", "flat")
    with pytest.raises(rm.ReferenceMapError, match="ivfpq needs faiss"):
        rm.choose_index(1000, 32, kind="ivfpq")
    index = rm.build_index(ref.emb, labels, list(TYPES))
    assert index.spec.backend == "sklearn"
    dist, nb = index.search(query.emb, 10)
    if exact is not None:
        np.testing.assert_allclose(dist, exact[0], atol=1e-5)
        # the same neighbour sets (order may differ only between equidistant cells)
        assert all(set(a) == set(b) for a, b in zip(nb, exact[1], strict=True))


def test_knn_vote_ties_go_to_the_closer_label():
    nb = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [-1, -1, -1, -1]])
    dist = np.array([[0.1, 0.5, 0.2, 0.3], [0.4, 0.1, 0.5, 0.1], [np.inf] * 4], dtype=np.float32)
    labels = np.array([0, 0, 1, 1], dtype=np.int32)
    pred, score = rm.knn_vote(nb, dist, labels, 2)
    assert pred.tolist() == [1, 0, -1]  # 2-2 votes: the label whose voters are closer in total wins
    assert score.tolist() == [0.5, 0.5, 0.0]


# ---------------------------------------------------------------------------------------
# atlas mode


def _build_corpus(h5ad_path, out, own_vocab: bool = False):
    """A corpus of the h5ad by the project's converter, in the checkpoint's vocabulary or (``own_vocab``) in one
    built from the file's genes."""
    from data_modules.store.convert import Source, convert_sources
    from data_modules.vocab import GeneVocab

    vocab = None if own_vocab else GeneVocab.from_checkpoint(FIXTURES)
    convert_sources([Source("atlas", str(h5ad_path))], out, vocab=vocab, obs_columns=["cell_type"])
    return out


@pytest.mark.parametrize("own_vocab", [False, True], ids=["checkpoint-vocab", "own-vocab"])
def test_corpus_embeddings_equal_the_h5ad_path(tmp_path, own_vocab):
    """A corpus built from an h5ad embeds, cell for cell, like the h5ad itself (same batches, same seeds); a corpus
    in another vocabulary is mapped onto the checkpoint's (genes outside it dropped, as the h5ad path drops them)."""
    src = tmp_path / "cells.h5ad"
    cells = toy_cells(300, 5, genes_per_cell=12)
    if own_vocab:  # two expressed genes the checkpoint does not know
        extra = sp.csr_matrix(np.random.default_rng(1).poisson(2.0, (300, 2)).astype(np.float32))
        cells = ad.AnnData(
            X=sp.hstack([cells.X, extra], format="csr"),
            obs=cells.obs,
            var=pd.DataFrame(index=[*cells.var_names, "ZZ_UNKNOWN_1", "ZZ_UNKNOWN_2"]),
        )
    cells.write_h5ad(src)
    corpus = _build_corpus(src, tmp_path / "corpus", own_vocab)
    model, vocab = rm.load_model(FIXTURES)
    direct = rm.embed_adata(model, vocab, FIXTURES, src, batch_size=32, seed=4, device="cpu", progress=False)
    emb = rm.CorpusEmbedder(
        model, vocab, FIXTURES, corpus, tmp_path / "work", "cell_type", batch_size=32, seed=4, device="cpu"
    )
    assert (emb.lut is not None) == own_vocab
    chunk, labels = emb.embed_chunk(0)
    np.testing.assert_allclose(chunk, direct.emb, atol=1e-5)
    assert [emb.label_names[c] for c in labels] == list(np.asarray(TYPES)[np.arange(300) % 4])


def _mapping_cmd(corpus, query, out, index_dir, *extra):
    return [
        sys.executable,
        "scripts/reference_map.py",
        "--checkpoint",
        str(FIXTURES),
        "--reference",
        str(corpus),
        "--query",
        str(query),
        "--label-key",
        "cell_type",
        "--out",
        str(out),
        "--index-out",
        str(index_dir),
        "--index",
        "ivfpq",
        "--batch-size",
        "512",
        "--chunk-cells",
        "8192",
        "--l1-c-grid",
        "1",
        "--device",
        "cpu",
        *extra,
    ]


def test_atlas_mode_is_streaming_resumable_and_bounded(tmp_path, capsys, monkeypatch):
    n_cells = 50_000
    src = tmp_path / "atlas.h5ad"
    toy_cells(n_cells, 11, genes_per_cell=6, prefix="atlas").write_h5ad(src)
    corpus = _build_corpus(src, tmp_path / "corpus")
    query = tmp_path / "query.h5ad"
    toy_cells(200, 12, genes_per_cell=6, prefix="q").write_h5ad(query)
    index_dir, out = tmp_path / "index", tmp_path / "mapped.h5ad"
    cmd = _mapping_cmd(corpus, query, out, index_dir)
    journal = index_dir / "journal.json"

    # 1. a run interrupted (a signal, like Ctrl-C) after two chunks of 8,192 cells were journalled; every chunk and
    # the journal are written to a temporary name and renamed, so a kill -9 leaves the same state behind
    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    def watch():  # signals this process once two chunks are journalled (the run then sleeps in its pause)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if journal.exists() and len(json.loads(journal.read_text())["done"]) >= 2:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.05)

    model, vocab = rm.load_model(FIXTURES)
    kw = dict(batch_size=512, chunk_cells=8192, device="cpu", progress=False)
    monkeypatch.setenv("SCGPT_REFMAP_PAUSE_S", "2")  # after each chunk: time to interrupt
    previous = signal.signal(signal.SIGUSR1, interrupt)
    watcher = threading.Thread(target=watch, daemon=True)
    try:
        embedder = rm.CorpusEmbedder(model, vocab, FIXTURES, corpus, index_dir, "cell_type", **kw)
        watcher.start()
        with pytest.raises(Interrupted):
            embedder.run()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        watcher.join()
    monkeypatch.delenv("SCGPT_REFMAP_PAUSE_S")
    done = json.loads(journal.read_text())["done"]
    assert done == [0, 1]
    chunks = {c: (index_dir / "chunks" / f"chunk-{c:06d}.npz").stat().st_mtime_ns for c in done}

    # 2. the same command again: resumes, finishes, builds and saves the IVF-PQ index; peak RSS measured there
    res = subprocess.run(cmd, cwd=ROOT, env=ENV_1T, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resuming, {len(done)}/7 chunks of reference embeddings done" in res.stdout
    assert "embedding reference corpus" in res.stderr  # the progress bar
    for c, mtime in chunks.items():  # finished chunks were not redone
        assert (index_dir / "chunks" / f"chunk-{c:06d}.npz").stat().st_mtime_ns == mtime
    # the CLI's own high-water mark (VmHWM). Not ru_maxrss: Linux carries the parent's peak across vfork + exec,
    # so a CLI started from a long pytest session reported that session's peak (2,356 MiB on a fresh-clone run)
    peak = float(re.search(r"peak RSS: (\d+) MiB \(VmHWM", res.stdout).group(1))
    with capsys.disabled():
        print(
            f"\n[atlas mode] {n_cells} reference cells (corpus), IVF-PQ index: peak RSS of the mapping process "
            f"{peak:.0f} MiB (this pytest process: {rm.peak_rss_mib():.0f} MiB)"
        )
    assert peak < 2048
    state = json.loads(journal.read_text())
    assert state["complete"] and len(state["done"]) == 7
    assert "faiss ivfpq over 50000 reference cells (saved to" in res.stdout
    first = ad.read_h5ad(out)
    summary = first.uns["reference_map"]
    assert summary["metrics"]["scgpt_knn"]["accuracy"] >= 0.95
    assert 19_000 <= summary["baselines"]["n_reference_cells"] <= 20_000  # the bounded sample: 312 runs of 64
    assert list(first.obs_names) == [f"q{i}" for i in range(200)]

    # a resumed run equals a fresh one: chunk 2 (embedded by the resumed run) recomputed here is the stored chunk
    emb = rm.CorpusEmbedder(model, vocab, FIXTURES, corpus, index_dir, "cell_type", **kw)
    assert emb.complete
    fresh, labels = emb.embed_chunk(2)
    stored, stored_labels = emb.read_chunk(2)
    np.testing.assert_allclose(fresh, stored, atol=1e-6)
    np.testing.assert_array_equal(labels, stored_labels)

    # 3. once more (in this process): nothing embedded, the saved index is reloaded and finds the same neighbours
    again = tmp_path / "again.h5ad"
    summary = rm.run_reference_map(
        FIXTURES, corpus, query, "cell_type", again, index_out=index_dir, index_kind="ivfpq", batch_size=512,
        chunk_cells=8192, device="cpu", baselines=(), progress=False,
    )  # fmt: skip
    assert summary["index"]["reloaded"] and summary["timings_s"]["embed_reference"] < 1.0
    second = ad.read_h5ad(again)
    np.testing.assert_array_equal(second.obsm["X_scgpt_knn_indices"], first.obsm["X_scgpt_knn_indices"])
    np.testing.assert_array_equal(second.obsm["X_scgpt_knn_distances"], first.obsm["X_scgpt_knn_distances"])
    np.testing.assert_array_equal(second.obs["ref_pred"].astype(str), first.obs["ref_pred"].astype(str))


# ---------------------------------------------------------------------------------------
# bad inputs


def test_missing_label_key_is_named(toy, tmp_path, capsys):
    ref, query = toy
    main = _script_main()
    args = ["--checkpoint", str(FIXTURES), "--query", str(query), "--out", str(tmp_path / "o.h5ad")]
    assert main([*args, "--reference", str(ref), "--label-key", "celltype"]) == 2
    err = capsys.readouterr().err
    assert f"--reference {ref}: --label-key 'celltype' is not an obs column" in err and "'cell_type'" in err
    assert not (tmp_path / "o.h5ad").exists()


def test_missing_label_key_in_a_corpus_is_named(tmp_path, capsys):
    src = tmp_path / "cells.h5ad"
    toy_cells(64, 3, genes_per_cell=5).write_h5ad(src)
    corpus = _build_corpus(src, tmp_path / "corpus")
    main = _script_main()
    rc = main(
        [
            *("--checkpoint", str(FIXTURES), "--reference", str(corpus), "--query", str(src)),
            *("--label-key", "tissue", "--out", str(tmp_path / "o.h5ad"), "--baselines", "none"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--reference {corpus}: --label-key 'tissue' is not an obs column of the corpus" in err
    assert "cell_type" in err


def test_query_without_vocabulary_genes_is_refused(toy, tmp_path, capsys):
    ref, _ = toy
    query = tmp_path / "alien.h5ad"
    genes = [f"NOT_A_GENE_{i}" for i in range(20)]
    x = sp.csr_matrix(np.random.default_rng(0).poisson(1.0, (30, 20)).astype(np.float32))
    ad.AnnData(X=x, obs=pd.DataFrame(index=[f"a{i}" for i in range(30)]), var=pd.DataFrame(index=genes)).write_h5ad(
        query
    )
    main = _script_main()
    rc = main(
        [
            *("--checkpoint", str(FIXTURES), "--reference", str(ref), "--query", str(query)),
            *("--label-key", "cell_type", "--out", str(tmp_path / "o.h5ad")),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{query}: none of its 20 genes" in err and "checkpoint's vocabulary" in err


def test_zeroshot_benchmark_writes_a_table_with_baselines(toy, tmp_path):
    ref, query = toy
    bench = {
        "name": "zeroshot_toy",
        "task": "zeroshot",
        "dataset": "toy cell types",
        "checkpoint": str(FIXTURES),
        "data": {"reference": str(ref), "query": str(query), "label_key": "cell_type"},
        "batch_size": 32,
        "l1_c_grid": [1.0],
        "umap": False,
    }
    result = run_zeroshot_benchmark(bench, [0, 1], tmp_path / "bench")
    assert result["summary"]["scgpt_knn"]["accuracy"]["values"] == [1.0, 1.0]
    assert set(result["summary"]) == {"scgpt_knn", "hvg_pca_knn", "l1_lr"}
    text = (tmp_path / "bench" / "benchmark.md").read_text()
    assert "| scGPT zero-shot kNN | ours (2 seeds) | 1.000 ± 0.000 |" in text and "HVG + PCA kNN" in text
    assert (tmp_path / "bench" / "confusion_matrix.png").exists()
    assert json.loads((tmp_path / "bench" / "results.json").read_text())["seeds"] == [0, 1]


def test_prefer_gene_column_reaches_the_gene_names(tmp_path):
    """A query keyed by Ensembl ids whose gene_symbols column swaps two genes against the id table: the ids decide by
    default; ``--prefer-gene-column`` / ``prefer_gene_column=`` make the column's names win, in the script's options,
    the embeddings (embed_adata) and the Python API alike."""
    from scgpt_train import api

    genes = vocab_genes()
    cells = toy_cells(24, 3, prefix="p")
    ids = [f"ENSG{i:011d}" for i in range(len(genes))]
    table = tmp_path / "ids.csv"
    pd.DataFrame({"feature_id": ids, "feature_name": genes}).to_csv(table, index=False)
    column = list(genes)
    column[0], column[BLOCK] = genes[BLOCK], genes[0]  # a T-cell gene and a B-cell gene swapped in the column
    cells.var = pd.DataFrame({"gene_symbols": column}, index=ids)
    query = tmp_path / "ids.h5ad"
    cells.write_h5ad(query)

    args = ["--checkpoint", "c", "--reference", "r", "--query", "q", "--label-key", "k", "--out", "o"]
    spec = importlib.util.spec_from_file_location("reference_map_script", ROOT / "scripts" / "reference_map.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert not script.params_from_args(script.parser().parse_args(args)).prefer_gene_column
    assert script.params_from_args(script.parser().parse_args([*args, "--prefer-gene-column"])).prefer_gene_column

    model, vocab = rm.load_model(FIXTURES)
    base = rm.ReferenceMapParams(gene_table=str(table), batch_size=8, device="cpu", progress=False)
    by_ids = rm.embed_adata(model, vocab, FIXTURES, query, params=base)
    by_column = rm.embed_adata(model, vocab, FIXTURES, query, params=base.of(base, prefer_gene_column=True))
    x = cells.X.toarray()
    col = {int(g): j for j, g in enumerate(by_ids.gene_ids)}
    first = col[vocab[genes[0]]]
    assert np.array_equal(by_ids.expression[:, first].toarray().ravel(), x[:, 0])  # the id table's GENE0
    assert np.array_equal(by_column.expression[:, first].toarray().ravel(), x[:, BLOCK])  # the column's GENE0
    assert not np.allclose(by_ids.emb, by_column.emb)

    reference = toy_cells(40, 4, prefix="r")
    reference.var = cells.var.copy()  # the same genes, keyed alike
    mapped, _ = api.reference_map(
        cells, reference, FIXTURES, baselines=(), device="cpu", batch_size=8, gene_table=table,
        prefer_gene_column=True,
    )  # fmt: skip
    np.testing.assert_allclose(mapped.obsm["X_scgpt"], by_column.emb, atol=1e-6)
