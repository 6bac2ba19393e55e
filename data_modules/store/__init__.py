"""Sharded HDF5 corpus store: manifest.json + vocab.json + shards/*.h5 (CSR rows + obs codes)."""

from data_modules.store.format import FORMAT_VERSION, CorpusFormatError
from data_modules.store.reader import CellBlock, Corpus
from data_modules.store.split import split_membership
from data_modules.store.writer import CorpusWriter

__all__ = ["FORMAT_VERSION", "CorpusFormatError", "CellBlock", "Corpus", "CorpusWriter", "split_membership"]
