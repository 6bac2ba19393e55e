"""The loader at the paper's scale (issue #27 item 4): the simulated-corpus benchmark keeps working, a reader's open
shard files are bounded (they grew with the corpus), a corpus with a dataset-level split streams (it raised), and the
resume state stays a few hundred bytes whatever the corpus size, with resume still exact."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.corpora import _adata, make_stream_corpus

from data_modules.store.convert import Source, convert_sources
from data_modules.store.reader import Corpus
from data_modules.store.synthetic import simulate_corpus, write_tiny_corpus
from data_modules.stream import CellStream, Cursor, StreamLoader

ROOT = Path(__file__).resolve().parents[1]
TOK = {"layout": {"max_seq_len": 33}}
SPLITS = ("train", "val")
LAYOUT = dict(batch_size=16, block_size=64, buffer_blocks=2, lanes=4, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """20,000 tiny cells in real shards of 4,096 (5 shards)."""
    return write_tiny_corpus(tmp_path_factory.mktemp("tiny") / "base", 20_000, shard_size=4096)


@pytest.fixture(scope="module")
def stream_corpus(tmp_path_factory) -> Path:
    return make_stream_corpus(tmp_path_factory.mktemp("scale_stream") / "corpus")


def test_tiny_corpus_is_a_real_corpus_and_the_simulated_one_repeats_its_shards(tiny, tmp_path):
    base = Corpus(tiny)
    block = base.read_cells(0, base.n_cells)  # every block checked against its checksum on the way
    lengths = np.diff(block.indptr)
    assert base.n_cells == 20_000 and lengths.min() >= 4 and lengths.max() <= 12
    sim = Corpus(simulate_corpus(tmp_path / "sim", tiny, 100_000))
    assert sim.n_cells == 100_000 and sim.n_shards == 25  # the 5 base shards, 5 times
    again = sim.read_block(7, 0, 100)  # shard 7 is base shard 2: same rows, its own global cell ids
    ref = base.read_block(2, 0, 100)
    assert np.array_equal(again.gene_ids, ref.gene_ids) and np.array_equal(again.counts, ref.counts)
    assert again.cell_index[0] == sim.shard_offsets[7]


def test_simulate_cells_command_reports_within_the_targets(tiny, tmp_path):
    """`scripts/bench_loader.py --simulate-cells` end to end on a small simulated corpus (seconds)."""
    spec = importlib.util.spec_from_file_location("bench_loader", ROOT / "scripts" / "bench_loader.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--simulate-cells", "60000", "--base-cells", "20000", "--ranks", "2", "--workers", "2"]
    result = bench.main([*argv, "--forked-batches", "1", "--cache", str(tmp_path), "--json", str(tmp_path / "r.json")])
    assert result["simulated_cells"] >= 60_000 and result["resume_exact"]
    assert result["end_to_end"]["exactly_once"]  # a whole epoch of the base corpus, every training cell once
    assert all(r["resume_state_bytes"] < 1024 and r["plan_mb"] < 200 for r in result["per_rank"])
    assert (
        result["open_shards"]["simulated_bounded"]["open_shards"]
        <= result["open_shards"]["simulated_bounded"]["shards"]
    )


def test_open_shard_files_are_bounded_and_reads_do_not_change(tiny, stream_corpus):
    bounded, free = Corpus(tiny, max_open_shards=2), Corpus(tiny)
    spans = [(s, 64 * k, 64 * k + 128) for k, s in enumerate([3, 0, 4, 1, 3, 2, 0])]
    a, _ = bounded.read_spans(spans)
    b, _ = free.read_spans(spans)
    for name in ("indptr", "gene_ids", "counts", "cell_index"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert np.array_equal(a.obs["dataset"], b.obs["dataset"])
    assert bounded.n_open_shards == 2 and free.n_open_shards == 5
    # a whole epoch through a stream whose corpus keeps one shard open: the same batches
    reference = [b.cell_index.numpy() for b in StreamLoader(stream(stream_corpus))]
    s = stream(stream_corpus)
    s.corpus = Corpus(stream_corpus, max_open_shards=1)
    got = [b.cell_index.numpy() for b in StreamLoader(s)]
    assert len(got) == len(reference) and all(np.array_equal(x, y) for x, y in zip(got, reference, strict=True))
    assert s.corpus.n_open_shards <= 1 < s.corpus.n_shards


def stream(corpus_dir, split: str = "train", **kw) -> CellStream:
    return CellStream(str(corpus_dir), split, tokenizer=TOK, **{**LAYOUT, **kw})


def test_a_corpus_split_by_dataset_streams_its_training_datasets(tmp_path):
    rng = np.random.default_rng(1)
    out = tmp_path / "corpus"
    convert_sources(
        [Source("a", _adata(rng, 300, 50, "a")), Source("b", _adata(rng, 200, 50, "b"))],
        out,
        obs_columns=["cell_type"],
        shard_size=128,
        split={"strategy": "dataset", "val_datasets": ["b"]},
    )
    ids = {split: np.concatenate([b.cell_index.numpy() for b in StreamLoader(stream(out, split))]) for split in SPLITS}
    assert sorted(ids["train"]) == list(range(300)) and sorted(ids["val"]) == list(range(300, 500))


@pytest.mark.parametrize("n_cells", [40_000, 2_000_000])
def test_resume_state_does_not_grow_with_the_corpus_and_resume_is_exact(tiny, tmp_path, n_cells):
    """A checkpoint's stream state is the global cursor (a few scalars): the same keys and < 1 KB for a corpus of
    40k or 2M cells; resumed at a late position, the next batch equals the uninterrupted run's."""
    corpus = simulate_corpus(tmp_path / "sim", tiny, n_cells)
    s = stream(corpus, batch_size=32, block_size=512, buffer_blocks=4, lanes=8, rank=1, world_size=4)
    whole = s.schedule()
    consumed = whole.n_rr_steps - 3
    state = s.state_dict(whole.cursor_after(consumed))
    assert len(pickle.dumps(state)) < 1024
    assert all(isinstance(v, int | str | bool | None) for part in state.values() for v in part.values())
    resumed = stream(corpus, batch_size=32, block_size=512, buffer_blocks=4, lanes=8, rank=1, world_size=4)
    resumed.load_state_dict(pickle.loads(pickle.dumps(state)))
    first = next(resumed.worker_batches(0, 1))  # the resumed rank's next batch
    expected = s.to_batch(s.encode_batch(whole, s.lane_reader(whole), consumed))
    for name in ("cell_index", "gene_ids", "values", "target_values", "gen_mask"):
        assert torch.equal(getattr(first, name), getattr(expected, name))
    assert resumed.cursor == Cursor(**state["cursor"])
