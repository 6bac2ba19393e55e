"""Packed batches (issue #15): one (1, T) token stream per batch with ``cu_seqlens``, no padding.

Data side: ``Tokenizer.pack`` holds exactly ``pad``'s non-pad tokens; the packed corpus stream keeps exactly-once
coverage and exact resume. Model side: packed and padded batches of the same real cells give the same outputs,
losses and gradients (fp32, 1e-5) for plain and generative attention, every cell-embedding style, DSBN, MVC, the
classifier and ECS; every attention path equals the one explicit-mask reference (``naive_attention``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.corpora import split_ids

from data_modules.datamodule import CorpusDataModule
from data_modules.store.reader import Corpus
from data_modules.stream import CellStream, Cursor, StreamLoader
from data_modules.tokenize import Tokenizer

TOK = {"layout": {"max_seq_len": 129}}  # short cells keep the model tests fast; real length variety remains
STREAM = dict(batch_size=24, block_size=32, buffer_blocks=3, lanes=4, seed=3)


def collect(loader, stop: int | None = None) -> list:
    out = []
    for batch in loader:
        out.append(batch)
        if stop is not None and len(out) == stop:
            break
    return out


def stream(corpus_dir, packing=True, **kw) -> CellStream:
    return CellStream(str(corpus_dir), "train", tokenizer=TOK, packing=packing, **{**STREAM, **kw})


def assert_same_tokens(padded, packed):
    """Every non-pad slot of the padded batch, in row order, is the packed stream."""
    assert packed.packed and not padded.packed
    keep = ~padded.pad_mask
    lengths = keep.sum(1)
    np.testing.assert_array_equal(np.diff(packed.cu_seqlens.numpy()), lengths.numpy())
    assert packed.max_seqlen == int(lengths.max()) and packed.n_cells == padded.n_cells
    assert packed.cu_seqlens.dtype == torch.int32 and packed.gene_ids.shape == (1, int(lengths.sum()))
    assert not packed.pad_mask.any()
    for name in ("gene_ids", "values", "target_values", "gen_mask", "mlm_mask"):
        a, b = getattr(padded, name), getattr(packed, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b[0], a[keep], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(packed.token_cell[0], torch.arange(padded.n_cells)[:, None].expand_as(keep)[keep])
    torch.testing.assert_close(packed.cell_index, padded.cell_index)


# ------------------------------------------------------------------------------------------
# data side
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value_style", ["continuous", "category"])
@pytest.mark.parametrize("mlm_prob", [None, 0.3])
def test_pack_holds_the_padded_batch_without_its_padding(demo_corpus, value_style, mlm_prob):
    corpus = Corpus(demo_corpus)
    block = corpus.read_cells(0, 300)  # both datasets' shapes of cell (short pbmc68k, long celltypist) on shards
    tok = Tokenizer(
        {"layout": {"max_seq_len": 1201, "value_style": value_style}, "mlm_prob": mlm_prob},
        corpus.vocab.pad_id,
        corpus.vocab.cls_id,
    )
    enc = tok.encode(block, np.random.default_rng(0), np.arange(0, 300, 7))
    padded, packed = tok.pad(enc), tok.pack(enc)
    assert_same_tokens(padded, packed)
    assert padded.pad_mask.float().mean() > 0.2  # real lengths differ: padding is what packing removes
    cls_at = packed.cu_seqlens[:-1].long()
    assert (packed.gene_ids[0, cls_at] == corpus.vocab.cls_id).all()
    assert packed.model_inputs()["cu_seqlens"] is packed.cu_seqlens and "cu_seqlens" not in padded.model_inputs()


def test_packed_stream_same_cells_and_tokens_as_padded_and_exactly_once(demo_corpus):
    padded = collect(StreamLoader(stream(demo_corpus, packing=False), num_workers=0))
    packed = collect(StreamLoader(stream(demo_corpus), num_workers=2))
    assert len(packed) == len(padded)
    for a, b in zip(padded, packed):
        assert_same_tokens(a, b)
    seen = np.concatenate([b.cell_index.numpy() for b in packed])
    np.testing.assert_array_equal(np.sort(seen), split_ids(demo_corpus, "train"))  # every train cell, once


@pytest.mark.parametrize("stop", [4, -1])  # inside the round-robin part / inside the final pool
def test_packed_stream_mid_epoch_resume_is_exact(demo_corpus, stop):
    reference = collect(StreamLoader(stream(demo_corpus), num_workers=0))
    stop = stop % len(reference)
    first = StreamLoader(stream(demo_corpus), num_workers=2)
    before = collect(first, stop=stop)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    second = StreamLoader(stream(demo_corpus), num_workers=1)
    second.load_state_dict(state)
    after = collect(second)
    assert len(before) + len(after) == len(reference)
    for a, b in zip(before + after, reference):
        for name in ("cell_index", "cu_seqlens", "gene_ids", "values", "gen_mask"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


def test_packed_stream_resume_over_world_sizes_no_repeat_no_skip(demo_corpus):
    """Simulated ranks (explicit rank / world_size): 2 ranks stop after 5 steps, 3 ranks finish the epoch."""
    seen, cursor = [], None
    for world, stop in ((2, 5), (3, None)):
        steps = set()
        for r in range(world):
            s = stream(demo_corpus, rank=r, world_size=world)
            if cursor is not None:
                s.cursor = cursor
            loader = StreamLoader(s, num_workers=0)
            batches = collect(loader, stop=stop)
            steps.add(len(batches))
            seen += [b.cell_index.numpy() for b in batches]
            assert all(b.packed for b in batches)
            if r == 0:
                next_cursor = Cursor(**loader.state_dict()["cursor"])
        assert len(steps) == 1  # DDP: the same number of steps on every rank
        cursor = next_cursor
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), split_ids(demo_corpus, "train"))


def test_max_tokens_sets_the_cells_per_batch_from_the_token_budget(demo_corpus):
    s = stream(demo_corpus, max_tokens=2000)
    corpus = Corpus(demo_corpus)
    lengths = np.minimum(np.diff(corpus.read_cells(0, corpus.n_cells).indptr) + 1, TOK["layout"]["max_seq_len"])
    assert s.batch_size == int(2000 // lengths.mean())  # the demo corpus has < 32 shards: every cell counts
    batches = collect(StreamLoader(s, num_workers=0))
    tokens = np.array([b.gene_ids.shape[1] for b in batches[:-2]])
    assert abs(tokens.mean() - 2000) < 0.2 * 2000  # the budget holds on average (lengths are bucketed)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([b.cell_index.numpy() for b in batches])), split_ids(demo_corpus, "train")
    )
    with pytest.raises(ValueError, match="at least one whole cell"):
        stream(demo_corpus, max_tokens=100)


def test_datamodule_packing_option(demo_corpus):
    dm = CorpusDataModule(str(demo_corpus), tokenizer={}, layout=TOK["layout"], batch_size=8, packing=True)
    train = next(iter(dm.train_dataloader()))
    val = next(iter(dm.val_dataloader()))
    assert train.packed and val.packed and train.n_cells == 8 and not train.pad_mask.any()
    state = dm.train_dataloader().state_dict()
    assert state["plan"]["batch_size"] == 8
