"""The adversarial test matrix (issue #25): every entry point x every fault that applies to it.

The rows and their expected outcomes are ``tests/adversarial/entry_points.py``, the faults
``tests/adversarial/faults.py``; each cell runs the entry point in this process on tiny real-format inputs built
once per module (the official tiny checkpoint in tests/fixtures/official, real gene symbols, counts or
log-normalized values as each entry point expects; runs stop after one training step). The tables in
docs/reliability.md ("The adversarial matrix") are generated from the same rows
(``python tests/test_adversarial_matrix.py --write-docs``; ``test_docs_table_is_current`` fails when they are stale).
Adding an entry point = one ``EntryPoint`` row.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:  # run as a program (--write-docs)
    sys.path.insert(0, str(ROOT / "tests"))
from adversarial import table  # noqa: E402
from adversarial.entry_points import ENTRY_POINTS, PRETRAIN_ROW, _train_main, as_input, pretrain_run  # noqa: E402
from adversarial.faults import (  # noqa: E402
    CORPUS_FAULTS,
    FAULTS,
    FILE_FAULTS,
    N_GENES,
    base_adata,
    vocab_genes,
    write_fault,
)

# what the Python API writes its arguments to (a message naming these names a temporary file, not the argument)
API_TEMP_NAMES = re.compile(r"scgpt_(embed|refmap|annotation|integration)_|[/ ](input|query|reference)\.h5ad")


@pytest.fixture(scope="module")
def aux(tmp_path_factory) -> dict:
    """Valid companion inputs: a labelled reference (file and AnnData), a GMT, a TF-target table."""
    d = tmp_path_factory.mktemp("aux")
    genes = vocab_genes()[:N_GENES]
    reference = d / "reference.h5ad"
    base_adata("counts").write_h5ad(reference)
    gmt = d / "sets.gmt"
    gmt.write_text("".join(f"SET_{i}\tna\t" + "\t".join(genes[i * 6 : i * 6 + 6]) + "\n" for i in range(5)))
    tf_targets = d / "tf.tsv"
    edges = [(genes[0], genes[j]) for j in range(1, 8)] + [(genes[1], genes[j]) for j in range(8, 14)]
    pd.DataFrame(edges, columns=["source", "target"]).to_csv(tf_targets, sep="\t", index=False)
    return {"reference": reference, "reference_adata": base_adata("counts"), "gmt": gmt, "tf_targets": tf_targets}


def _mount(where: Path, options: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (id -u is not 0)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mount not permitted here: {done.stderr.decode().strip()}")


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    """A 16 kB tmpfs: room for a lock and a small record, not for an output file."""
    mnt = tmp_path_factory.mktemp("full_disk")
    _mount(mnt, "size=16k")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def read_only(tmp_path_factory):
    """A directory nobody can write in: a read-only tmpfs as root (who ignores permission bits), else mode 555."""
    d = tmp_path_factory.mktemp("read_only")
    if os.geteuid() == 0:
        _mount(d, "ro,size=64k")
        yield d
        subprocess.run(["umount", "-l", str(d)], check=False)
    else:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)


def cells() -> list:
    return [
        pytest.param(e, f, outcome, id=f"{e.name.strip('`')}-{f}".replace(" ", "_").replace("`", ""))
        for e in ENTRY_POINTS
        for f, outcome in e.faults.items()
        if outcome != "shared"
    ]


@pytest.mark.parametrize("entry, fault_name, outcome", cells())
def test_matrix_cell(entry, fault_name, outcome, aux, request, tmp_path, capsys, caplog):
    fault = FAULTS[fault_name]
    out_parent = tmp_path
    if fault_name == "disk_full":
        out_parent = request.getfixturevalue("full_disk") / tmp_path.name
        out_parent.mkdir()
    elif fault_name == "out_unwritable":
        out_parent = request.getfixturevalue("read_only") / "sub"
    out = out_parent / ("out_dir" if entry.out_is_dir else "out.h5ad")
    path = write_fault(fault, entry.kind, tmp_path / f"input_{fault_name}.h5ad")
    try:
        code, message = entry.run(as_input(fault_name, path, entry), out, {**aux, "fault": fault_name})
        err = message + "\n" + capsys.readouterr().err + caplog.text
        what = f"{entry.name} on {fault.description}"
        if outcome in ("ok", "warned"):
            assert code == 0, f"{what}: exit {code}\n{err[-3000:]}"
            missing = [n for n in fault.names() if n not in err] if outcome == "warned" else []
            assert not missing, f"{what}: no warning naming {missing}:\n{err[-3000:]}"
            return
        assert code == 2, f"{what}: exit {code}, expected 2\n{err[-3000:]}"
        assert "Traceback" not in err, err[-3000:]
        if fault_name == "disk_full":
            named = ["no space left on device", str(out_parent)]
        elif fault_name == "out_unwritable":
            named = ["cannot write", str(out_parent.parent)]
        else:
            names_file = entry.argument is None or fault_name in FILE_FAULTS or fault_name == "duplicate_files"
            named = [path.name if names_file else entry.argument, *fault.names()]
            named += [entry.key] if fault_name == "missing_column" and entry.key else []
        missing = [n for n in named if not any(alternative in err for alternative in n.split("|"))]
        assert not missing, f"{what}: the message does not name {missing}:\n{err[-3000:]}"
        if entry.argument is not None:
            assert not API_TEMP_NAMES.search(message), f"{what}: names the API's temporary file:\n{message}"
        # a build's finished shards stay, as does the run dir of a run that had started (the rerun resumes)
        resumable = fault_name == "disk_full" and ((out / ".journal").is_dir() or (out / "config.yaml").is_file())
        half_written = out.exists() and (not entry.out_is_dir or any(out.iterdir())) and not resumable
        assert not half_written, f"{what} left {out} behind"
        if fault_name == "disk_full":
            assert [p for p in out_parent.rglob("*") if p.suffix == ".tmp"] == [], "a temporary file stayed"
    finally:
        if fault_name == "disk_full":
            shutil.rmtree(out_parent, ignore_errors=True)  # the next cell gets the space back


# ---------------------------------------------------------------------------------------------------------------
# pretraining on a corpus


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    from data_modules.store.cli import build_main

    d = tmp_path_factory.mktemp("tiny_corpus")
    base_adata("counts").write_h5ad(d / "cells.h5ad")
    assert build_main(["h5ad", str(d / "cells.h5ad"), "--out", str(d / "corpus"), "--val-fraction", "0.25",
                       "--quiet"]) == 0  # fmt: skip
    return d / "corpus"


@pytest.mark.parametrize("fault_name", list(PRETRAIN_ROW.faults))
def test_corpus_cell(fault_name, tiny_corpus, tmp_path):
    fault = CORPUS_FAULTS[fault_name]
    corpus = fault.make(tiny_corpus, tmp_path / "corpus")
    out = tmp_path / "run"
    code, message = PRETRAIN_ROW.run(corpus, out, {"fault": fault_name})
    assert code == 2, f"pretraining on {fault.description}: exit {code}"
    missing = [n for n in fault.names(corpus) if n not in message]
    assert not missing, f"pretraining on {fault.description}: the message does not name {missing}:\n{message}"
    assert not out.exists(), "a refused run left its run dir behind"


# ---------------------------------------------------------------------------------------------------------------
# faults of the process: a second writer (the other rows of the process table run in the tests they name)

HOLD = (
    "import sys, time\n"
    "from data_modules.store.lock import exclusive_lock\n"
    "from scgpt_train.run_lock import RunDirLock\n"
    "held = exclusive_lock(sys.argv[2]) if sys.argv[1] == 'build' else RunDirLock(sys.argv[2])\n"
    "held.__enter__()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.mark.parametrize("what", ["build_corpus", "train"])
def test_concurrent_writer_is_refused(what, aux, tiny_corpus, tmp_path, capsys):
    """Another process holds the output (a corpus build its --out, a job its run dir): exit 2 naming its PID; the
    holder's lock and record stay as they were."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, "build" if what == "build_corpus" else "run", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted((p.name, p.read_bytes()) for p in tmp_path.rglob("*.json"))
        if what == "build_corpus":
            from data_modules.store.cli import build_main

            assert build_main(["h5ad", str(aux["reference"]), "--out", str(out), "--quiet"]) == 2
            err = capsys.readouterr().err
            assert not out.exists()
        else:
            code, _ = _train_main([f"hydra.run.dir={out}", "data=corpus", f"data.corpus_dir={tiny_corpus}"])
            assert code == 2  # before Hydra writes its records into the holder's run dir
            err = capsys.readouterr().err
            code, message = pretrain_run(tiny_corpus, out, {"fault": "concurrent_writer"})  # the pipeline's own lock
            assert code == 2 and f"PID {holder.pid}" in message
            assert not (out / ".hydra").exists() and not (out / "config.yaml").exists()
        assert f"PID {holder.pid}" in err and "in use by another job" in err and "Traceback" not in err
        assert sorted((p.name, p.read_bytes()) for p in tmp_path.rglob("*.json")) == before
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


def test_process_table_names_tests_that_exist():
    for cells_ in table.PROCESS.values():
        for _, test in cells_.values():
            file, name = test.split("::")
            name = name.split("[")[0]
            assert f"def {name}(" in (ROOT / file).read_text(), f"docs/reliability.md names {test}, which is missing"


def test_docs_table_is_current():
    assert table.current() == table.render(), "run: python tests/test_adversarial_matrix.py --write-docs"


if __name__ == "__main__":
    if "--write-docs" in sys.argv:
        table.write()
        print(f"wrote the matrix into {table.DOC}")
