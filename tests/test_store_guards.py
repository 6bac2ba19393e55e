"""Guards of a corpus build and of reading a corpus (issue #25 A1, B3-B8): one writer per --out, per-block
checksums checked on every read, digests over every file a corpus depends on, duplicate inputs, option checks
before any write, a full disk, and the file modes of finished files."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_modules.atomic import write_json_atomic
from data_modules.store.checksums import set_checksums
from data_modules.store.cli import build_main, corpus_main
from data_modules.store.format import CHECKSUM, DATA, MANIFEST_DIGEST, CorpusFormatError
from data_modules.store.integrity import check_shard_files, verify_checksums
from data_modules.store.lock import lock_paths
from data_modules.store.reader import Corpus
from data_modules.store.synthetic import make_synthetic_h5ad
from data_modules.stream import CellStream

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_corpus.py"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("guard_inputs")
    return [
        make_synthetic_h5ad(d / "a.h5ad", n_cells=600, nnz_per_cell=30, n_genes=200, seed=1),
        make_synthetic_h5ad(d / "b.h5ad", n_cells=400, nnz_per_cell=30, n_genes=200, seed=2),
    ]


def _args(inputs, out, *extra) -> list[str]:
    return ["h5ad", *map(str, inputs), "--out", str(out), "--shard-size", "100", "--chunk-size", "50", *extra]


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("guard_corpus") / "corpus"
    assert build_main([*_args(inputs, out), "--quiet"]) == 0
    return out


def _copy(built: Path, tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    shutil.copytree(built, root)
    return root


# ---------------------------------------------------------------------------------------------------------------
# A1: one writer per --out


def _wait_for(predicate, proc, timeout=60.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the first build never got going"
        time.sleep(0.05)


def test_second_writer_is_refused_and_a_dead_holder_is_taken_over(inputs, tmp_path, capsys):
    out = tmp_path / "corpus"
    env = {**os.environ, "SCGPT_CORPUS_PAUSE_S": "5"}  # the first build holds the lock, paused after a shard
    first = subprocess.Popen(
        [sys.executable, str(SCRIPT), *_args(inputs, out), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    lock, holder = lock_paths(out)
    try:
        _wait_for(lambda: (out / ".journal" / "state.json").exists(), first)
        # another writer, other inputs, same --out (this pytest process is the second real process)
        assert build_main([*_args(inputs[:1], out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"host {socket.gethostname()}, PID {first.pid}, started " in err and "in use by another job" in err
        assert str(lock) in err and "delete" in err
        assert first.poll() is None  # the holder was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert holder.exists()  # a killed holder leaves its record: the next build finds it stale and takes over
    assert build_main(_args(inputs, out)) == 0
    err = capsys.readouterr().err
    assert f"taking over the stale lock left by host {socket.gethostname()}, PID {first.pid}" in err
    assert "no longer running" in err and "resuming at input" in err
    assert not lock.exists() and not holder.exists()
    assert Corpus(out).n_cells == 1000
    assert corpus_main(["verify", str(out)]) == 0


def test_a_lock_recorded_by_another_host_is_reported_not_broken(inputs, tmp_path, capsys):
    out = tmp_path / "corpus"
    _, holder = lock_paths(out)
    record = {"host": "node-17.cluster", "pid": 4242, "started_unix": time.time() - 60, "command": "build_corpus.py"}
    write_json_atomic(holder, record)
    assert build_main([*_args(inputs, out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "another host (host node-17.cluster, PID 4242" in err and "not broken" in err and f"delete {holder}" in err
    assert json.loads(holder.read_text()) == record and not out.exists()
    from data_modules.errors import LockHeldError, UserInputError
    from scgpt_train import api

    with pytest.raises(LockHeldError) as refused:  # the API: the one family of refusals (was a RuntimeError)
        api.build_corpus([inputs[0]], out)
    assert isinstance(refused.value, UserInputError) and json.loads(holder.read_text()) == record


def test_overwrite_staging_is_covered_by_the_lock(inputs, built, tmp_path, capsys):
    """A second --overwrite while the first builds its replacement in the staging sibling is refused."""
    out = _copy(built, tmp_path)
    env = {**os.environ, "SCGPT_CORPUS_PAUSE_S": "5"}
    first = subprocess.Popen(
        [sys.executable, str(SCRIPT), *_args(inputs[:1], out), "--overwrite", "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(lambda: any(tmp_path.glob(".corpus.*.tmp/.journal/state.json")), first)
        assert build_main([*_args(inputs[1:], out), "--overwrite", "--quiet"]) == 2
        assert f"PID {first.pid}" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert Corpus(out).n_cells == 1000  # the old corpus is untouched


# ---------------------------------------------------------------------------------------------------------------
# B3: per-block checksums, checked on every read


def _flip_data_byte(root: Path, shard: int = 0) -> tuple[Path, int]:
    corpus = Corpus(root)
    path = corpus.shard_path(shard)
    corpus.close()
    with h5py.File(path, "r") as f:
        offset = f[DATA].id.get_offset() + 20 * f[DATA].dtype.itemsize  # entry 20: block 0, the first cells' counts
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x40]))
    return path, offset


def test_flipped_byte_in_shard_data_is_refused_on_read(built, tmp_path):
    root = _copy(built, tmp_path)
    assert all(s.get("checksums") == CHECKSUM for s in Corpus(root).shards)
    path, _ = _flip_data_byte(root)
    check_shard_files(Corpus(root))  # same size: the cheap always-on check cannot see it ...
    with pytest.raises(CorpusFormatError, match=rf"shard {path} rows 0:100: block 0 of data fails its {CHECKSUM}"):
        Corpus(root).read_block(0, 0, 100)  # ... the read does
    with pytest.raises(CorpusFormatError, match="checksum"):
        for _ in CellStream(str(root), "train", batch_size=16, block_size=20, buffer_blocks=2, shuffle=False):
            pass
    assert Corpus(root).read_block(1, 0, 100).counts.size  # other shards read as before


def test_corpus_without_checksums_loads_says_so_once_and_gets_them(built, tmp_path, caplog, capsys):
    root = _copy(built, tmp_path)
    set_checksums(root, on=False)  # the layout of a corpus written before checksums existed
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.pop(MANIFEST_DIGEST)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="data_modules.store.reader"):
        corpus = Corpus(root)
        reference = corpus.read_block(0, 0, 100)
        unaligned = corpus.read_cells(37, 555)  # spans shards, starts and ends inside 64-cell checksum blocks
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "without per-block checksums" in lines[0] and "--write-checksums" in lines[0]
    assert corpus_main(["verify", str(root), "--write-checksums"]) == 0
    assert "checksums written into 10 shard(s)" in capsys.readouterr().err
    upgraded = Corpus(root)
    assert all(s.get("checksums") == CHECKSUM for s in upgraded.shards)
    again = upgraded.read_block(0, 0, 100)
    np.testing.assert_array_equal(again.counts, reference.counts)
    np.testing.assert_array_equal(again.gene_ids, reference.gene_ids)
    widened = upgraded.read_cells(37, 555)  # read through buffers widened to whole blocks
    for field in ("indptr", "gene_ids", "counts", "cell_index"):
        np.testing.assert_array_equal(getattr(widened, field), getattr(unaligned, field))
    assert widened.obs.keys() == unaligned.obs.keys()
    for k in widened.obs:
        np.testing.assert_array_equal(widened.obs[k], unaligned.obs[k])
    upgraded.close()  # HDF5 shares an open file (and its cached bytes) with a later open in the same process
    _flip_data_byte(root)
    with pytest.raises(CorpusFormatError, match="checksum"):
        Corpus(root).read_block(0, 0, 100)


def test_write_checksums_refuses_a_shard_already_damaged(built, tmp_path, capsys):
    root = _copy(built, tmp_path)
    set_checksums(root, on=False)
    path = Corpus(root).shard_path(3)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert corpus_main(["verify", str(root), "--write-checksums"]) == 2
    assert f"shard 3 ({path}): its sha256 differs" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# B4: every file a corpus depends on is covered by the manifest's digests


def test_vocab_with_two_ids_swapped_is_refused_naming_the_file(built, tmp_path, capsys):
    root = _copy(built, tmp_path)
    vocab = json.loads((root / "vocab.json").read_text())
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (root / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(CorpusFormatError, match=rf"{root / 'vocab.json'}: its sha256 differs"):
        check_shard_files(Corpus(root))  # always on (every training run, data.verify or not)
    with pytest.raises(CorpusFormatError, match="vocab.json"):
        verify_checksums(Corpus(root))  # data.verify=true
    assert corpus_main(["verify", str(root)]) == 1
    assert f"{root / 'vocab.json'}: its sha256 differs" in capsys.readouterr().err


def test_edited_manifest_tables_are_refused_by_verify(built, tmp_path, capsys):
    root = _copy(built, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    table = manifest["obs_columns"]["dataset"]
    table[0], table[1] = table[1], table[0]  # datasets' names swapped: every cell labelled as the other
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorpusFormatError, match=rf"{root / 'manifest.json'}: its content differs"):
        verify_checksums(Corpus(root))  # data.verify=true
    assert corpus_main(["verify", str(root), "--no-checksums"]) == 1
    assert "manifest.json: its content differs" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# B5, B6: inputs and options checked before anything is written


def test_same_input_twice_is_refused_naming_the_file(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    alias = tmp_path / "alias.h5ad"
    alias.symlink_to(inputs[0])
    for twice in ([inputs[0], inputs[0]], [inputs[0], inputs[1], alias]):
        assert build_main([*_args(twice, out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "given twice" in err and str(twice[-1]) in err
        assert not out.exists()


def test_duplicate_cell_names_warn_with_count_and_examples(tmp_path, capsys):
    import anndata as ad

    path = make_synthetic_h5ad(tmp_path / "dup.h5ad", n_cells=120, nnz_per_cell=20, n_genes=100, seed=3)
    adata = ad.read_h5ad(path)
    adata.obs_names = [f"cell{i % 100}" for i in range(120)]  # 20 names twice
    adata.write_h5ad(path)
    assert build_main(["h5ad", str(path), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {path}: 20 cells have a name" in err and "'cell0'" in err and "--allow-duplicate-cells" in err
    assert build_main(["h5ad", str(path), "--out", str(tmp_path / "b"), "--quiet", "--allow-duplicate-cells"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value",
    [("--chunk-size", "0"), ("--shard-size", "0"), ("--shard-size", "-5"), ("--min-genes", "-1"),
     ("--val-fraction", "1.5")],
)  # fmt: skip
def test_bad_option_is_refused_before_anything_is_written(inputs, tmp_path, capsys, option, value):
    out = tmp_path / "sub" / "out"
    rc = build_main(["h5ad", str(inputs[0]), "--out", str(out), option, value, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{option} {value}: must be" in err, err
    assert not (tmp_path / "sub").exists()


def test_input_with_no_cells_is_refused_naming_it(inputs, tmp_path, capsys):
    import anndata as ad

    empty = tmp_path / "empty.h5ad"
    ad.read_h5ad(inputs[1])[:0].copy().write_h5ad(empty)
    assert build_main(["h5ad", str(inputs[0]), str(empty), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert f"{empty}: holds 0 cells" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# B7: a full disk while building


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mount not permitted here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_names_the_file_exits_2_and_the_rerun_resumes(small_tmpfs, tmp_path, capsys):
    big = make_synthetic_h5ad(tmp_path / "big.h5ad", n_cells=3000, nnz_per_cell=100, n_genes=400, seed=4)  # ~1.3 MB
    args = ["h5ad", str(big), "--shard-size", "500", "--chunk-size", "250"]
    out = small_tmpfs / "corpus"
    assert build_main([*args, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error: no space left on device while writing " + str(out) in err, err
    assert "free space or choose another --out" in err and "Traceback" not in err
    leftovers = [p for p in small_tmpfs.rglob("*") if p.name.endswith(".tmp") or ".lock" in p.name]
    assert leftovers == []  # no half-written file, no lock
    subprocess.run(["mount", "-o", "remount,size=32m", str(small_tmpfs)], check=True)
    assert build_main([*args, "--out", str(out)]) == 0
    assert "resuming at input" in capsys.readouterr().err
    assert corpus_main(["verify", str(out)]) == 0
    assert build_main([*args, "--out", str(tmp_path / "reference"), "--quiet"]) == 0
    got, want = Corpus(out), Corpus(tmp_path / "reference")
    assert got.n_cells == want.n_cells == 3000
    a, b = got.read_cells(0, 3000), want.read_cells(0, 3000)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.gene_ids, b.gene_ids)


# ---------------------------------------------------------------------------------------------------------------
# B8: finished files get the mode an ordinary write gives


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_finished_files_get_the_mode_the_umask_gives(inputs, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        out = tmp_path / "corpus"
        assert build_main(["h5ad", str(inputs[1]), "--out", str(out), "--shard-size", "200", "--quiet"]) == 0
        written = write_json_atomic(tmp_path / "summary.json", {"a": 1})  # what checkpoints' metadata goes through
    finally:
        os.umask(old)
    files = [out / "manifest.json", out / "vocab.json", *sorted((out / "shards").iterdir()), written]
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in files} == {str(p): oct(mode) for p in files}
    existing = tmp_path / "shared.json"
    existing.write_text("{}")
    existing.chmod(0o664)  # replacing a file keeps its mode, as an ordinary write would
    write_json_atomic(existing, {"b": 2})
    assert existing.stat().st_mode & 0o777 == 0o664


def test_a_forked_worker_reads_through_its_own_handles(built):
    """The reader caches h5py datasets per shard; a forked DataLoader worker must drop the parent's and open its own
    (HDF5 handles shared across fork corrupt reads)."""
    corpus = Corpus(built)
    expected = int(corpus.cell_lengths(0).sum())  # the parent's cache is warm
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            got = int(corpus.cell_lengths(0).sum())
            os.write(w, json.dumps([got, corpus._pid == os.getpid()]).encode())
        finally:
            os._exit(0)
    os.close(w)
    got, own = json.loads(os.read(r, 1000).decode())
    os.waitpid(pid, 0)
    assert got == expected and own
