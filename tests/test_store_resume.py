"""Kill -9 a conversion mid-way (real subprocess), rerun the same command, compare to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_modules.store import Corpus
from data_modules.store.cli import build_main
from data_modules.store.journal import STATE_NAME
from data_modules.store.synthetic import make_synthetic_h5ad

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts/build_corpus.py"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume_inputs")
    a = make_synthetic_h5ad(d / "a.h5ad", n_cells=1500, nnz_per_cell=40, n_genes=400, n_datasets=2, seed=1)
    b = make_synthetic_h5ad(d / "b.h5ad", n_cells=900, nnz_per_cell=40, n_genes=300, seed=2)
    return [a, b]


def _args(inputs, out):
    return [
        "h5ad",
        *map(str, inputs),
        "--out",
        str(out),
        "--shard-size",
        "100",
        "--chunk-size",
        "64",
        "--obs-columns",
        "cell_type",
        "tissue",
        "--val-fraction",
        "0.1",
    ]


def _journal_shards(out: Path) -> int:
    try:
        return len(json.loads((out / ".journal" / STATE_NAME).read_text())["writer"]["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _kill_after(args, out: Path, min_shards: int) -> None:
    env = {**os.environ, "SCGPT_CORPUS_PAUSE_S": "0.3"}  # slow the run so the kill lands mid-way
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 60
    while _journal_shards(out) < min_shards:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "conversion made no progress"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()


def _same_corpus(a: Path, b: Path) -> None:
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]  # byte-identical shards
    for key in ("n_cells", "nnz", "datasets", "obs_columns", "split", "vocab"):
        assert ma[key] == mb[key], key
    ca, cb = Corpus(a), Corpus(b)
    ba, bb = ca.read_cells(0, ca.n_cells), cb.read_cells(0, cb.n_cells)
    np.testing.assert_array_equal(ba.counts, bb.counts)
    np.testing.assert_array_equal(ba.gene_ids, bb.gene_ids)


def test_kill_and_resume_equals_uninterrupted(inputs, tmp_path):
    reference = tmp_path / "reference"
    assert build_main([*_args(inputs, reference), "--quiet"]) == 0

    out = tmp_path / "killed"
    _kill_after(_args(inputs, out), out, min_shards=4)
    done_before = _journal_shards(out)
    # leftovers a crash can leave: a shard written after the last journal save, a temp file
    (out / "shards" / f"shard-{done_before:06d}.h5").write_bytes(b"half a shard")
    (out / "shards" / ".shard-999999.h5.tmp-1").write_bytes(b"junk")

    rerun = subprocess.run(
        [sys.executable, str(SCRIPT), *_args(inputs, out)], capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming at input" in rerun.stderr and f"({done_before} shards done)" in rerun.stderr
    assert not (out / ".journal").exists()
    _same_corpus(reference, out)


def test_kill_during_second_input_then_resume(inputs, tmp_path):
    reference = tmp_path / "reference"
    assert build_main([*_args(inputs, reference), "--quiet"]) == 0
    out = tmp_path / "killed"
    _kill_after(_args(inputs, out), out, min_shards=17)  # past the 1500 cells of the first input
    state = json.loads((out / ".journal" / STATE_NAME).read_text())
    assert state["position"][0] == 1
    assert build_main([*_args(inputs, out), "--quiet"]) == 0
    _same_corpus(reference, out)


def test_resume_with_other_arguments_is_refused(inputs, tmp_path, capsys):
    out = tmp_path / "killed"
    _kill_after(_args(inputs, out), out, min_shards=2)
    other = _args(inputs, out)
    other[other.index("--shard-size") + 1] = "50"
    assert build_main([*other, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unfinished conversion started with different arguments" in err and "shard_size" in err
    assert build_main([*other, "--quiet", "--overwrite"]) == 0
    assert Corpus(out).shards[0]["n_cells"] == 50
