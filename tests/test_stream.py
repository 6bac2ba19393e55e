"""CellStream: exactly-once over DDP ranks x workers, worker-count independence, exact resume."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.corpora import make_stream_corpus, split_ids

from data_modules.store.reader import Corpus
from data_modules.stream import CellStream, Cursor, StreamLoader, final_sizes

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "helpers" / "stream_rank.py"
TOK = {"layout": {"max_seq_len": 33}}
LAYOUT = dict(batch_size=16, block_size=40, buffer_blocks=3, lanes=4, seed=7)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_stream_corpus(tmp_path_factory.mktemp("stream") / "corpus")


def train_ids(corpus_dir: Path) -> np.ndarray:
    return split_ids(corpus_dir, "train")


def stream(corpus_dir, **kw) -> CellStream:
    return CellStream(str(corpus_dir), "train", tokenizer=TOK, **{**LAYOUT, **kw})


def collect(loader, stop: int | None = None) -> list:
    out = []
    for batch in loader:
        out.append(batch)
        if stop is not None and len(out) == stop:
            break
    return out


def cells_of(batches) -> list[np.ndarray]:
    return [b.cell_index.numpy() for b in batches]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(corpus_dir: Path, out: Path, world: int, workers: int, **extra) -> list[dict]:
    """Launch ``world`` real processes that form a gloo group, each with ``workers`` loader workers."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "corpus": str(corpus_dir),
        "world_size": world,
        "port": _free_port(),
        "num_workers": workers,
        "out_dir": str(out),
        "tokenizer": TOK,
        **LAYOUT,
        **extra,
    }
    cfg_path = out / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    procs = [
        subprocess.Popen(
            [sys.executable, str(HELPER), str(cfg_path), str(r)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=180)
        assert p.returncode == 0, output[-4000:]
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(world)]


@pytest.mark.slow
def test_exactly_once_two_ddp_ranks_two_workers(corpus, tmp_path):
    ranks = run_ranks(corpus, tmp_path / "full", world=2, workers=2)
    all_cells = np.concatenate([r["cells"] for r in ranks])
    np.testing.assert_array_equal(np.sort(all_cells), train_ids(corpus))  # every train cell, once
    assert len(ranks[0]["lengths"]) == len(ranks[1]["lengths"])  # DDP: same number of steps on every rank
    assert ranks[0]["lengths"].max() <= LAYOUT["batch_size"]


@pytest.mark.slow
def test_restart_at_another_world_size_no_repeat_no_skip(corpus, tmp_path):
    """2 ranks x 2 workers stop after 9 steps; the job resumes with 3 ranks x 1 worker."""
    before = run_ranks(corpus, tmp_path / "before", world=2, workers=2, stop_after=9)
    state = tmp_path / "before" / "state.json"
    after = run_ranks(corpus, tmp_path / "after", world=3, workers=1, load_state=str(state))
    seen = np.concatenate([r["cells"] for r in before + after])
    np.testing.assert_array_equal(np.sort(seen), train_ids(corpus))
    assert len({len(r["lengths"]) for r in after}) == 1


def test_same_order_with_0_1_2_workers(corpus):
    runs = {w: collect(StreamLoader(stream(corpus), num_workers=w)) for w in (0, 1, 2)}
    for w in (1, 2):
        assert len(runs[w]) == len(runs[0])
        for a, b in zip(runs[0], runs[w], strict=True):
            np.testing.assert_array_equal(a.cell_index.numpy(), b.cell_index.numpy())
            np.testing.assert_array_equal(a.gene_ids.numpy(), b.gene_ids.numpy())  # same tokenization RNG too
            np.testing.assert_array_equal(a.gen_mask.numpy(), b.gen_mask.numpy())


def test_epochs_differ_and_each_covers_all(corpus):
    loader = StreamLoader(stream(corpus), num_workers=0)
    e0, e1 = cells_of(collect(loader)), cells_of(collect(loader))
    for epoch in (e0, e1):
        np.testing.assert_array_equal(np.sort(np.concatenate(epoch)), train_ids(corpus))
    assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))


@pytest.mark.parametrize("stop", [5, -1])  # inside the round-robin part / inside the final pool
def test_mid_epoch_resume_is_exact(corpus, stop):
    reference = collect(StreamLoader(stream(corpus), num_workers=2))
    stop = stop % len(reference)
    assert stop == 5 or stop > stream(corpus).schedule().n_rr_steps  # -1 really stops in the final pool
    first = StreamLoader(stream(corpus), num_workers=2)
    before = collect(first, stop=stop)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    second = StreamLoader(stream(corpus), num_workers=1)
    second.load_state_dict(state)
    after = collect(second)
    assert len(before) + len(after) == len(reference)
    for a, b in zip(before + after, reference, strict=True):
        np.testing.assert_array_equal(a.cell_index.numpy(), b.cell_index.numpy())
        np.testing.assert_array_equal(a.values.numpy(), b.values.numpy())


def test_end_of_epoch_state_starts_next_epoch(corpus):
    loader = StreamLoader(stream(corpus), num_workers=0)
    collect(loader)
    state = loader.state_dict()
    assert state["cursor"]["epoch"] == 1 and state["cursor"]["rr_done"] == 0
    expected = cells_of(collect(loader))
    fresh = StreamLoader(stream(corpus), num_workers=0)
    fresh.load_state_dict(state)
    for a, b in zip(cells_of(collect(fresh)), expected, strict=True):
        np.testing.assert_array_equal(a, b)


def _rank_cells(corpus_dir, world: int, cursor: Cursor | None = None, stop: int | None = None):
    """Simulated ranks in this process (explicit rank/world_size): cells and the cursor after ``stop`` steps."""
    cells, state = [], None
    for r in range(world):
        s = stream(corpus_dir, rank=r, world_size=world)
        if cursor is not None:
            s.cursor = cursor
        loader = StreamLoader(s, num_workers=0)
        batches = collect(loader, stop=stop)
        cells += cells_of(batches)
        if r == 0:
            state = Cursor(**loader.state_dict()["cursor"])
    return np.concatenate(cells), state


@pytest.mark.parametrize(
    "worlds,stop", [((2, 1), 4), ((2, 3), 4), ((4, 2), 3), ((2, 3), 10), ((3, 2, 4), 9), ((1, 3), 69)]
)
def test_resume_chain_over_world_sizes(corpus, worlds, stop):
    """Any chain of world sizes, each stopping after ``stop`` steps (the last runs to the end)."""
    if stop == 69:  # world 1 has 68 round-robin steps here: stop inside its final split, re-split over 3
        assert stream(corpus, rank=0, world_size=1).schedule().n_rr_steps == 68
    seen, cursor = [], None
    for i, world in enumerate(worlds):
        last = i == len(worlds) - 1
        cells, cursor = _rank_cells(corpus, world, cursor, None if last else stop)
        seen.append(cells)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), train_ids(corpus))


def test_final_sizes_even_and_bounded():
    sizes = final_sizes(37, world_size=4, batch_size=8)
    assert sizes.sum() == 37 and len(sizes) % 4 == 0 and sizes.max() - sizes.min() <= 1 and sizes.max() <= 8
    assert list(final_sizes(2, world_size=4, batch_size=8)) == [1, 1, 0, 0]  # 0 = served by one repeated cell


def test_validation_stream_is_deterministic_and_complete(corpus):
    def val_cells():
        s = CellStream(str(corpus), "val", 8, tokenizer=TOK, block_size=40, buffer_blocks=3, lanes=4)
        return collect(StreamLoader(s, num_workers=0))

    a, b = val_cells(), val_cells()
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.values.numpy(), y.values.numpy())
    corpus_ = Corpus(corpus)
    block = corpus_.read_cells(0, corpus_.n_cells)
    expected = np.sort(block.cell_index[corpus_.in_validation(block)])
    np.testing.assert_array_equal(np.sort(np.concatenate(cells_of(a))), expected)


def test_batches_mix_blocks_and_bucketing_cuts_padding(corpus):
    s = stream(corpus)
    batches = collect(StreamLoader(s, num_workers=0))
    blocks_per_batch = [len(np.unique(b.cell_index.numpy() // LAYOUT["block_size"])) for b in batches[:20]]
    assert np.mean(blocks_per_batch) >= 2.5  # a batch draws from a shuffle buffer of several blocks
    plain = collect(StreamLoader(stream(corpus, bucket_batches=1), num_workers=0))
    pad = lambda bs: float(np.mean([b.pad_mask.float().mean() for b in bs]))  # noqa: E731
    assert pad(batches) < pad(plain)
