"""The exceptions of a run that stop it on purpose, in one place.

- ``UserInputError`` (defined in ``data_modules.errors`` so the data layer's errors derive from it too): a refusal of
  something the user gave (a config value, a file, a checkpoint, a run dir). ``train.py`` prints its message alone
  and exits 2; nothing half-written stays behind.
- ``ConfigValueError``, ``CheckpointPathError``, ``RunDirInUseError`` (a ``LockHeldError``, as a corpus build's
  refusal of a locked ``--out``), ``OutputPathError`` (an output location that cannot be written),
  ``NoSpaceLeftError``: the refusals of the training entry point, each a ``UserInputError``.
- ``RunInterrupted``: the run was stopped by a preemption signal after saving its checkpoint; ``exit_code`` is what
  ``train.py`` exits with (128 + the signal number, as a shell reports a process that signal ended).
"""

from __future__ import annotations

from data_modules.errors import LockHeldError, OutputPathError, UserInputError

__all__ = [
    "CheckpointPathError",
    "ConfigValueError",
    "LockHeldError",
    "OutputPathError",
    "NoSpaceLeftError",
    "RunDirInUseError",
    "RunInterrupted",
    "UserInputError",
    "find_user_input_error",
]


class ConfigValueError(UserInputError):
    """A config value of the wrong type or out of range (``trainer.max_steps=abc``, ``model.net.d_model=-1``)."""


class CheckpointPathError(UserInputError):
    """``ckpt_path=`` names no file, or a file that is not a training checkpoint of this project."""


class RunDirInUseError(LockHeldError):
    """Another job holds the run dir's lock (``scgpt_train.run_lock``)."""


class NoSpaceLeftError(UserInputError):
    """The file system of the run dir filled up while a file was written; the partial file was removed."""

    def __init__(self, path, detail: str = ""):
        self.path = str(path)
        super().__init__(
            f"no space left on device while writing {path}: free space or choose another hydra.run.dir; nothing "
            f"was kept{f' ({detail})' if detail else ''}"
        )


class RunInterrupted(RuntimeError):
    """A preemption signal stopped the run after its checkpoint was written; rerunning the command resumes it."""

    def __init__(self, message: str, exit_code: int, checkpoint: str | None = None):
        super().__init__(message)
        self.exit_code = int(exit_code)
        self.checkpoint = checkpoint


def find_user_input_error(exc: BaseException | None) -> UserInputError | None:
    """The ``UserInputError`` that ``exc`` is or wraps (Hydra's ``instantiate`` wraps a constructor's error in an
    ``InstantiationException`` whose ``__cause__`` is the original), or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserInputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
