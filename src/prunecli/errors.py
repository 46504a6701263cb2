"""Exceptions that the command line turns into a one-line ``Error:`` and exit code 1.

Library code raises these (never ``SystemExit``) so that callers of :mod:`prunecli.api` can catch
them; each carries an optional hint that names the fix, as timm's ``ValueError`` messages do.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DataError",
    "InputError",
    "PrunecliError",
    "UnknownNameError",
]


class PrunecliError(Exception):
    """Base class of every error that is the user's input, not a bug.

    Args:
        message: one line saying what is wrong.
        hint: optional one line saying how to fix it.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class CheckpointError(PrunecliError):
    """A checkpoint is missing, corrupt, unsafe, or does not fit its architecture."""


class DataError(PrunecliError):
    """A data spec is unknown, missing on disk, empty, or does not match the model."""


class InputError(PrunecliError):
    """An option value or combination of options is invalid."""


class UnknownNameError(PrunecliError, KeyError):
    """A name looked up in a registry (method, data source, architecture) does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return self.message
