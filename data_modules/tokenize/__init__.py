"""Vectorized tokenization of cells into model batches (binning, sampling, masking, padding)."""

from data_modules.tokenize.binning import bin_values
from data_modules.tokenize.tokenizer import Tokenizer, TokenizerConfig, pad_fraction

__all__ = ["Tokenizer", "TokenizerConfig", "bin_values", "pad_fraction"]
