"""The one exception family of the triage core.

Each edge translates these: the SCP into DICOM statuses, the CLI into a
one-line message and a non-zero exit, the worklist into an "unscored: reason"
row.
"""

from __future__ import annotations


class TriageError(Exception):
    """Base class of every error the core raises on purpose."""


class ConfigError(TriageError):
    """The configuration file or an override is invalid; the message names the key."""


class InputError(TriageError):
    """An input (file, dataset, CSV) cannot be used; the message says why."""


class UnscorableError(TriageError):
    """An image cannot be scored; ``reason`` is the short text shown as "unscored: reason"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
