"""What reading costs a process: its resident memory, and the shard files it holds open after visiting every shard
(``scripts/bench_loader.py --simulate-cells``; imports nothing heavier than the reader, so a fresh interpreter
started for one measurement is quick)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from data_modules.store.reader import Corpus


def rss_mb(pid: int | str = "self") -> dict:
    """Rss / Pss / private memory (MB) of a process, from /proc/<pid>/smaps_rollup (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) / 1024
    return {
        "rss": fields["Rss"],
        "pss": fields["Pss"],
        "private": fields["Private_Clean"] + fields["Private_Dirty"],
    }


def open_every_shard(corpus_dir: str, max_open_shards: int) -> dict:
    """Read 64 cells of every shard (as a loader worker that visits them all) with at most ``max_open_shards``
    open: the shards then open, the descriptors and the memory the reads added."""
    corpus = Corpus(corpus_dir, max_open_shards=max_open_shards)
    corpus.read_spans([(0, 0, 1)])
    before = rss_mb()["rss"]
    for shard in range(corpus.n_shards):
        corpus.read_spans([(shard, 0, min(64, int(corpus.shards[shard]["n_cells"])))])
    return {
        "shards": corpus.n_shards,
        "open_shards": corpus.n_open_shards,
        "open_fds": len(os.listdir("/proc/self/fd")),
        "rss_growth_mb": rss_mb()["rss"] - before,
    }


def open_every_shard_fresh(corpus_dir: str, max_open_shards: int) -> dict:
    """``open_every_shard`` in a fresh interpreter (a forked one would reuse memory its parent freed)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "data_modules.store.probe", str(corpus_dir), str(max_open_shards)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(open_every_shard(sys.argv[1], int(sys.argv[2]))))
