"""The one family of exceptions for a user's input that cannot be used as given.

:class:`UserInputError` is the base of every refusal of an input (a file, a cell, a gene, an obs column, a config
value, an AnnData argument of :mod:`scgpt_train.api`): the message names what is wrong and what to do. It derives
from ``ValueError``, so code that caught ``ValueError`` keeps working; the project's own input errors
(``VocabError``, ``ValueTypeError``, ``CorpusFormatError``, ``EmbedInputError``, ``MultiomicInputError``, ...)
derive from it, so ``except UserInputError`` catches them all.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """An input that cannot be used as given; the message names the file / cell / gene / key and what to do."""
