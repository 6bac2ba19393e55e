"""data_modules/atomic.py is the project's one write-then-rename mechanism."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from data_modules.atomic import atomic_dir, atomic_path, write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("data_modules", "scgpt_train", "scripts")
HAND_ROLLED = re.compile(r"\bos\.replace\(|\bos\.rename\(|\btempfile\.mkstemp\(|\bmkstemp\(")
# path -> lines that may keep a hand-rolled rename, and why
ALLOWED = {
    "data_modules/atomic.py": None,  # the mechanism itself
    "scgpt_train/fault_tolerance.py": None,  # being migrated by its owner
    # resumable downloads: <file>.part must survive a failure so the next run resumes it with a Range request,
    # which atomic_path (removes its temp file on error) cannot do
    "scgpt_train/resources/download.py": {"os.replace(part, dest)"},
}


class Boom(RuntimeError):
    pass


def test_atomic_path_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(Boom), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("half written")
        raise Boom
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_path_success_replaces(tmp_path):
    target = tmp_path / "sub" / "out.h5ad"
    with atomic_path(target, suffix=".h5ad") as tmp:
        assert tmp.suffix == ".h5ad"
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert write_text_atomic(tmp_path / "t.txt", "x").read_text() == "x"
    assert write_json_atomic(tmp_path / "j.json", {"a": 1}).read_text() == '{\n "a": 1\n}'
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["out.h5ad"]


def test_atomic_dir(tmp_path):
    out = tmp_path / "corpus"
    with pytest.raises(Boom), atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
        raise Boom
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with atomic_dir(out) as tmp:  # a finished directory already there wins
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]


def test_no_hand_rolled_write_then_rename():
    offenders = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            allowed = ALLOWED.get(rel, set())
            if allowed is None:
                continue
            for no, line in enumerate(path.read_text().splitlines(), 1):
                if HAND_ROLLED.search(line) and not any(a in line for a in allowed):
                    offenders.append(f"{rel}:{no}: {line.strip()}")
    assert not offenders, "use data_modules.atomic (atomic_path / atomic_dir / write_*_atomic):\n" + "\n".join(
        offenders
    )
