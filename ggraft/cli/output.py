"""Shared CLI output: data on stdout, diagnostics on stderr, JSON for scripts."""
from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def error(message: str, hint: str | None = None) -> None:
    stderr.print(f"[bold red]Error:[/] {message}", markup=True, highlight=False)
    if hint:
        stderr.print(f"[dim]Hint:[/] {hint}", markup=True, highlight=False)


def note(message: str) -> None:
    stderr.print(message, markup=False)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
