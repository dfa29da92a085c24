"""User-facing errors: one hierarchy, raised where the problem is found.

Every :class:`AlignkitError` carries a message that names the config key or file at fault and
what to do about it; the command line prints it as one line (``--debug`` for the traceback).
Anything else that escapes is an internal bug and keeps its traceback.
"""
from __future__ import annotations


class AlignkitError(Exception):
    """Base class of the errors a user can fix (bad config, bad data, a busy or broken run folder)."""

    exit_code = 2


class ConfigError(AlignkitError, ValueError):
    """A config problem; the message names the key (or file) to fix."""


class DataError(AlignkitError, ValueError):
    """Unusable input data; the message names the file (and line or field)."""


class ModelLoadError(AlignkitError, OSError):
    """A model, tokenizer or teacher cannot be loaded (missing file, offline hub id, ...)."""


class RunDirError(AlignkitError):
    """A run or cache folder cannot be used: held by another process, not writable, a dead end."""


class CheckpointError(AlignkitError):
    """A checkpoint cannot be written (disk full, read-only) or read (corrupt, missing parts)."""


class Interrupted(AlignkitError):
    """Training stopped on SIGINT/SIGTERM after writing a consistent checkpoint.

    Exit code 128 + signal number, as shells report a process ended by that signal, so a
    scheduler's requeue logic can tell it from a failure."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class MissingFile(AlignkitError, FileNotFoundError):
    """A file or folder named in the config does not exist."""


class MissingPackage(AlignkitError, ImportError):
    """An optional package the config asks for is not installed (the message says what to install)."""
