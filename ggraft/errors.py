"""Errors raised by ggraft's library code.

Library code raises these; only the CLI prints them and picks exit codes
(see ``ggraft.cli.main``).  Each carries a one-line message and an optional hint.
``input_file`` is the one check before an input file is opened (regular files only).
"""
from __future__ import annotations

import stat
from pathlib import Path


class GgraftError(Exception):
    """Base of every error ggraft reports to a user."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class InputError(GgraftError):
    """An input cannot be read or is not what the command needs (exit 2)."""


class UnsupportedModelError(InputError):
    """The checkpoint's architecture or layout has no converter."""


class OutputExistsError(InputError):
    """The output path exists and --force was not given."""


class EngineError(GgraftError):
    """llama.cpp refused an input or failed while running it."""


class IncompatibleError(GgraftError):
    """Two inputs cannot work together (exit 1)."""

    exit_code = 1


class DependencyError(GgraftError):
    """An installed dependency is not a version ggraft was written against (exit 2)."""


def input_file(path: str | Path, what: str = "file") -> Path:
    """``path`` as a ``Path`` if it is a regular file (through symlinks), else the InputError a user
    should see.  Only regular files are opened: a FIFO or a device would block or never end."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: no such file" + (" (a dangling symlink)" if path.is_symlink() else "")) from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    article = "an" if what[:1].lower() in "aeio" else "a"
    if stat.S_ISDIR(mode):
        raise InputError(f"{path}: is a directory, expected {article} {what}")
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: is not a regular file (a FIFO, socket or device), expected {article} {what}")
    return path
