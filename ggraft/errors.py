"""Errors raised by ggraft's library code.

Library code raises these; only the CLI prints them and picks exit codes
(see ``ggraft.cli.main``).  Each carries a one-line message and an optional hint.
"""
from __future__ import annotations


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
