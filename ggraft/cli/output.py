"""Shared CLI output: data on stdout, diagnostics on stderr, JSON for scripts.

Neither console reads rich markup or emoji codes from what it prints: paths, names and metadata
come from users and files, so ``[bold]x.gguf`` or ``:cat:`` is printed as is.  The few styled
pieces are built explicitly (``styled``) from ggraft's own markup with user text escaped.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text

stdout = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)
stderr = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)


def styled(markup: str, *values: Any) -> Text:
    """ggraft's own rich ``markup`` with ``{}`` fields filled by ``values``, escaped:
    ``styled("[bold]{}[/]", path)``."""
    return Text.from_markup(markup.format(*(escape(str(v)) for v in values)), emoji=False)


def one_line(text: str) -> str:
    """``text`` on one line: line breaks shown as ``\\n`` (a message may quote a file's strings)."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def error(message: str, hint: str | None = None) -> None:
    stderr.print(Text.assemble(("Error:", "bold red"), " ", one_line(message)))
    if hint:
        stderr.print(Text.assemble(("Hint:", "dim"), " ", one_line(hint)))


def note(message: str) -> None:
    stderr.print(message)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
