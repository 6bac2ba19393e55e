"""A damaged shard is named when it is read: CSR structure errors never surface as a bare IndexError."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from data_modules.store.checksums import set_checksums
from data_modules.store.format import INDICES, INDPTR, CorpusFormatError
from data_modules.store.reader import Corpus
from data_modules.stream import CellStream


def _damaged_copy(demo_corpus, tmp_path, damage):
    root = tmp_path / "corpus"
    shutil.copytree(demo_corpus, root)
    set_checksums(root, on=False)  # the CSR checks below are what guards a corpus without per-block checksums
    corpus = Corpus(root)
    path = corpus.shard_path(0)
    corpus.close()
    with h5py.File(path, "r+") as f:
        damage(f, len(corpus.vocab))
    return root, path


def _gene_out_of_vocab(f, vocab_size):
    f[INDICES][3] = vocab_size + 5


def _indptr_backwards(f, vocab_size):
    ip = f[INDPTR][:]
    f[INDPTR][2] = ip[3] + 10  # row 1 ends after row 2 ends: not monotonic


@pytest.mark.parametrize(
    "damage, what", [(_gene_out_of_vocab, "outside the vocabulary"), (_indptr_backwards, "not monotonic")]
)
def test_damaged_shard_is_named_with_its_rows(demo_corpus, tmp_path, damage, what):
    root, path = _damaged_copy(demo_corpus, tmp_path, damage)
    with pytest.raises(CorpusFormatError, match=rf"{path}.*rows \d+:\d+: .*{what}.*corpus.py verify"):
        Corpus(root).read_block(0, 0, 16)
    with pytest.raises(CorpusFormatError, match=what):  # at start (the stream warms up on cell 0) or when read
        stream = CellStream(str(root), "train", batch_size=8, block_size=16, buffer_blocks=2, shuffle=False)
        for _ in stream:
            pass


def test_intact_corpus_reads_the_same_through_both_paths(demo_corpus):
    corpus = Corpus(demo_corpus)
    block = corpus.read_block(0, 0, 16)
    spans, first = corpus.read_spans([(0, 0, 8), (0, 8, 16)])
    np.testing.assert_array_equal(block.indptr, spans.indptr)
    np.testing.assert_array_equal(block.gene_ids, spans.gene_ids)
    assert first.tolist() == [0, 8]
