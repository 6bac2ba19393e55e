"""Multi-omic data (RNA + protein, RNA + ATAC, mosaic) as tokens of one cell: reading, per-modality recipes,
one vocabulary, tokenization with modality ids, and the Lightning DataModule (docs/multiomic.md)."""

from data_modules.multiomic.datamodule import MultiomicDataModule
from data_modules.multiomic.inputs import MultiomicInputError, read_multiomic
from data_modules.multiomic.recipes import ModalityRecipe, process_modality
from data_modules.multiomic.tokens import TokenTable, tokenize_cells
from data_modules.multiomic.vocab import build_vocab, modality_vocab

__all__ = [
    "ModalityRecipe",
    "MultiomicDataModule",
    "MultiomicInputError",
    "TokenTable",
    "build_vocab",
    "modality_vocab",
    "process_modality",
    "read_multiomic",
    "tokenize_cells",
]
