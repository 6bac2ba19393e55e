"""Vectorized tokenization of cells into model batches (binning, sampling, masking, padding)."""

from data_modules.tokenize.binning import bin_values
from data_modules.tokenize.dense import tokenize_with_zeros
from data_modules.tokenize.layout import TokenLayout
from data_modules.tokenize.tokenizer import Tokenizer, TokenizerConfig, pad_fraction

__all__ = ["TokenLayout", "Tokenizer", "TokenizerConfig", "bin_values", "pad_fraction", "tokenize_with_zeros"]
