"""ggraft check TEXT.gguf MMPROJ.gguf"""
from __future__ import annotations

import typer

from . import output
from .options import Json, MmprojGguf, TextGguf

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def check(text: TextGguf, mmproj: MmprojGguf, json: Json = False) -> None:
    """Check that a text GGUF and an mmproj GGUF work together, from their headers.

    Exit 0 compatible (warnings allowed), 1 incompatible, 2 an input cannot be read."""
    from ggraft.pair.check import check_pair

    report = check_pair(text, mmproj)
    if json:
        output.emit_json(report.to_dict())
    else:
        render(report)
    raise typer.Exit(0 if report.ok else 1)


def render(report) -> None:
    from rich.table import Table

    t, m = report.text, report.mmproj
    output.stdout.print(f"text:   {t['path']} ({t['architecture']}, width {t['embedding_length']}, "
                        f"{t['vocab_size']} tokens)")
    output.stdout.print(f"mmproj: {m['path']} (projector {m['projector_type']}, width {m['projection_width']})")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("severity")
    table.add_column("code")
    table.add_column("finding", overflow="fold")
    order = {"error": 0, "warning": 1, "info": 2}
    for f in sorted(report.findings, key=lambda f: order.get(f.severity, 3)):
        text = output.styled("{}" + ("\n[dim]hint: {}[/]" if f.hint else ""), f.message, f.hint)
        table.add_row(output.styled(f"[{SEVERITY_STYLE.get(f.severity, '')}]{{}}[/]", f.severity), f.code, text)
    output.stdout.print(table)
    errors = sum(f.severity == "error" for f in report.findings)
    warnings = sum(f.severity == "warning" for f in report.findings)
    if errors:
        output.stdout.print(output.styled("[bold red]incompatible[/]: {} error(s), {} warning(s)", errors, warnings))
    else:
        output.stdout.print(output.styled("[green]compatible[/]") + (f", {warnings} warning(s)" if warnings else ""))
