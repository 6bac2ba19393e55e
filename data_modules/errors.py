"""The one base class of every refusal of a user's input (a file, a config value, a checkpoint to resume from).

It lives in the lowest layer so that ``data_modules``' own errors can derive from it (``data_modules`` never imports
``scgpt_train``); ``scgpt_train.errors`` re-exports it for the API and the entry points. ``train.py`` prints such an
error as one message and exits 2; the Python API raises it (catch ``scgpt_train.errors.UserInputError``).
"""

from __future__ import annotations


class UserInputError(ValueError):
    """A refusal of something the user gave: the message names the file, cell, gene or key and what to do."""
