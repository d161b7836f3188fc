"""Exceptions with messages a thesis student can act on.

Every error raised for bad input names the file (or parameter), the entry / key, and the fix.
They derive from ``ValueError`` so generic callers still catch them.
"""

from __future__ import annotations


class TfgError(ValueError):
    """Base class of the project's user-facing errors."""


class DataError(TfgError):
    """A dataset file, annotation or image is malformed or missing."""


class ConfigError(TfgError):
    """A parameter file or notebook parameter is unknown, nested, mistyped or out of range."""


class CheckpointError(TfgError):
    """A checkpoint is missing, of another architecture, or of another number of classes."""


class TrainingError(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the last good checkpoint is kept."""


class NonFiniteError(TrainingError):
    """A model output or loss term holds NaN / inf. ``what`` names it (e.g. ``aux_outputs[1].pred_boxes``);
    the training loop re-raises it as a :class:`TrainingError` with the epoch, step and fixes."""

    def __init__(self, message: str, what: str = ""):
        super().__init__(message)
        self.what = what


class StorageError(TfgError):
    """A write failed because the disk is full, over quota, read-only or failing. The message names the file, its
    folder, the bytes it needed (when known) and the free bytes there, and the fix; what was written before stays
    valid (every write is atomic)."""


class RunLocked(TfgError):
    """Another process holds the run folder (its lock names the process, the host and since when)."""


class OfflineError(TfgError):
    """A hub download was needed but there is no network; the message says how to use a local copy."""
