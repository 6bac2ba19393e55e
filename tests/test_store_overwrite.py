"""`build_corpus.py --overwrite` validates before it deletes (issue #17 item 5).

The replacement is built in a temporary sibling of --out and swapped in only once complete: a bad input
found mid-way, or a kill -9, leaves the old corpus (or the old unfinished, resumable conversion) as it was.
"""

from __future__ import annotations

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

from data_modules.store import Corpus
from data_modules.store.cli import build_main, corpus_main
from data_modules.store.convert import Source, convert_sources
from data_modules.store.format import CorpusFormatError
from data_modules.store.inspect import verify_corpus
from data_modules.store.journal import STATE_NAME
from data_modules.store.synthetic import make_synthetic_h5ad

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts/build_corpus.py"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two good raw-count inputs and one whose cell 'late-170' holds a NaN (found after shards were written)."""
    d = tmp_path_factory.mktemp("overwrite_inputs")
    a = make_synthetic_h5ad(d / "a.h5ad", n_cells=700, nnz_per_cell=30, n_genes=200, seed=1)
    b = make_synthetic_h5ad(d / "b.h5ad", n_cells=300, nnz_per_cell=30, n_genes=150, seed=2)
    rng = np.random.default_rng(3)
    X = rng.poisson(2.0, size=(200, 40)).astype(np.float32) + np.eye(200, 40, dtype=np.float32)
    X[170, 7] = np.nan
    bad = d / "late_nan.h5ad"
    ad.AnnData(
        sp.csr_matrix(X),
        obs=pd.DataFrame(index=[f"late-{i}" for i in range(200)]),
        var=pd.DataFrame(index=[f"GENE{i}" for i in range(40)]),
    ).write_h5ad(bad)
    return {"a": a, "b": b, "bad": bad}


def _args(paths, out: Path, shard_size: int = 100) -> list[str]:
    return [
        "h5ad",
        *map(str, paths),
        "--out",
        str(out),
        "--shard-size",
        str(shard_size),
        "--chunk-size",
        "64",
        "--obs-columns",
        "cell_type",
        "--val-fraction",
        "0.1",
    ]


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` (relative path -> bytes)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_overwrite_replaces_a_finished_corpus_through_a_sibling(inputs, tmp_path, capsys):
    out = tmp_path / "corpora" / "mine"
    assert build_main([*_args([inputs["a"]], out), "--quiet"]) == 0
    os.chmod(out, 0o750)
    (out / ".verified.json").write_text("{}")  # the checksum cache a training run keeps is part of the corpus
    assert Corpus(out).shards[0]["n_cells"] == 100
    capsys.readouterr()
    assert build_main([*_args([inputs["a"], inputs["b"]], out, shard_size=50), "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "building the replacement in" in err and f"{out} stays as it is until the new corpus is complete" in err
    corpus = Corpus(out)
    assert corpus.n_cells == 1000 and corpus.shards[0]["n_cells"] == 50 and len(corpus.shards) == 20
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"shard-{i:06d}.h5" for i in range(20)]
    assert verify_corpus(out).ok
    assert _siblings(out) == []  # neither the temporary sibling nor the old corpus is left
    assert not (out / ".verified.json").exists()  # nor the old corpus's checksum cache
    assert out.stat().st_mode & 0o777 == 0o750  # the replacement keeps the directory's permissions


def test_failed_overwrite_keeps_the_old_corpus_and_removes_the_sibling(inputs, tmp_path, capsys):
    out = tmp_path / "corpora" / "mine"
    assert build_main([*_args([inputs["b"]], out), "--quiet"]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    # the first input fills shards in the sibling, then the NaN of the second input stops the build
    rc = build_main([*_args([inputs["a"], inputs["bad"]], out, shard_size=50), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "shards, " in err and "cells written" in err  # shards were written before the bad input was found
    assert str(inputs["bad"]) in err and "NaN or infinite value" in err and "'late-170'" in err, err
    assert _snapshot(out) == before  # byte for byte the old corpus
    assert verify_corpus(out).ok and Corpus(out).n_cells == 300
    assert _siblings(out) == []


def test_out_that_is_a_regular_file_is_refused(inputs, tmp_path, capsys):
    target = tmp_path / "corpus.h5ad"
    target.write_bytes(b"not a directory")
    for extra in ([], ["--overwrite"]):
        assert build_main([*_args([inputs["b"]], target), "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert f"--out {target} is an existing file, not a directory" in err and "choose another path" in err, err
    below = target / "corpus"
    assert build_main([*_args([inputs["b"]], below), "--quiet"]) == 2
    assert f"{target} is a file" in capsys.readouterr().err
    with pytest.raises(CorpusFormatError, match="is an existing file, not a directory"):
        convert_sources([Source("b", str(inputs["b"]))], target)
    assert target.read_bytes() == b"not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.h5ad"]


def test_overwrite_refuses_a_corpus_directory_holding_other_files(inputs, tmp_path, capsys):
    out = tmp_path / "mine"
    assert build_main([*_args([inputs["b"]], out), "--quiet"]) == 0
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    assert build_main([*_args([inputs["a"]], out), "--quiet", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "move those files elsewhere" in err, err
    assert _snapshot(out) == before and _siblings(out) == []


def test_overwrite_of_an_empty_or_missing_directory_builds_in_place(inputs, tmp_path):
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        assert build_main([*_args([inputs["b"]], out), "--quiet", "--overwrite"]) == 0
        assert verify_corpus(out).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]


# ---------------------------------------------------------------------------------------
# kill -9 (real subprocesses)


def _journal_shards(state: Path) -> int:
    try:
        return len(json.loads(state.read_text())["writer"]["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _kill_when(args: list[str], states, min_shards: int) -> None:
    """Run build_corpus.py, kill -9 it once a journal in ``states()`` lists ``min_shards`` shards."""
    env = {**os.environ, "SCGPT_CORPUS_PAUSE_S": "0.3"}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 90
    while max((_journal_shards(s) for s in states()), default=0) < min_shards:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "conversion made no progress"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def test_unfinished_conversion_survives_verify_and_a_failed_overwrite_then_resumes(inputs, tmp_path, capsys):
    out = tmp_path / "mine"
    good = _args([inputs["a"], inputs["b"]], out)
    _kill_when(good, lambda: [out / ".journal" / STATE_NAME], min_shards=3)
    assert not (out / "manifest.json").exists() and (out / ".journal" / STATE_NAME).exists()

    assert corpus_main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "unfinished conversion" in err and "rerun the same command to resume" in err, err
    assert "shard(s) done, next input" in err and "--overwrite" not in err and "FAILED" not in err, err
    assert corpus_main(["info", str(out)]) == 2
    err = capsys.readouterr().err
    assert "rerun the same build_corpus.py command to resume it" in err and "--overwrite" not in err, err

    before = _snapshot(out)
    rc = build_main([*_args([inputs["a"], inputs["bad"]], out, shard_size=50), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and "'late-170'" in err, err
    assert _snapshot(out) == before and _siblings(out) == []  # the unfinished conversion is untouched

    assert build_main(good) == 0  # the original command resumes it in place
    err = capsys.readouterr().err
    assert "resuming at input" in err and "building the replacement" not in err, err
    assert verify_corpus(out).ok and Corpus(out).n_cells == 1000
    assert corpus_main(["verify", str(out)]) == 0


def test_kill_during_overwrite_leaves_the_old_corpus(inputs, tmp_path, capsys):
    out = tmp_path / "mine"
    assert build_main([*_args([inputs["b"]], out), "--quiet"]) == 0
    before = _snapshot(out)
    new = [*_args([inputs["a"], inputs["b"]], out, shard_size=50), "--overwrite"]
    _kill_when(new, lambda: list(tmp_path.glob(".mine.*.tmp/.journal/" + STATE_NAME)), min_shards=2)
    assert _snapshot(out) == before and verify_corpus(out).ok
    (leftover,) = tmp_path.glob(".mine.*.tmp")
    capsys.readouterr()
    assert build_main(new) == 0
    err = capsys.readouterr().err
    assert f"note: {leftover} is left over from an interrupted --overwrite run" in err, err
    assert Corpus(out).n_cells == 1000 and verify_corpus(out).ok
