"""User-facing errors.

A :class:`BenchError` is a mistake the user can fix (an unknown name, a bad eps, a missing
file). The CLI prints its message on one line to stderr and exits with status 2, without a
traceback. Internal invariants use ``assert`` or ordinary exceptions instead.
"""

from __future__ import annotations


class BenchError(Exception):
    """An error caused by user input; shown as one line, exit status 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = " ".join(str(message).split())  # always one line

    def __str__(self) -> str:
        return self.message


class UnknownNameError(BenchError, KeyError):
    """A registry lookup failed."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.message


class CheckpointError(BenchError):
    """A checkpoint file is missing, unreadable, unsafe or does not fit the model."""


class DatasetNotFoundError(BenchError):
    """A dataset's files are not where they must be."""


class StoreError(BenchError):
    """The result store cannot be opened or is inconsistent."""


class AttackNotApplicable(BenchError):
    """An attack cannot run on this model (too few classes for its loss, a multilabel model...).

    The harness records the stage as skipped, with this message as the reason, and goes on.
    """
