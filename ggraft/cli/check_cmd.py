"""ggraft check TEXT.gguf MMPROJ.gguf"""
from __future__ import annotations

import typer

from . import output
from .options import Json, MmprojGguf, TextGguf

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def register(app: typer.Typer) -> None:
    @app.command()
    def check(text: TextGguf, mmproj: MmprojGguf, json: Json = False) -> None:
        """Check that a text GGUF and an mmproj GGUF work together, from their headers.
        Exit 0 compatible (warnings allowed), 1 incompatible, 2 an input cannot be read."""
        from ..check import check_pair

        report = check_pair(text, mmproj)
        if json:
            output.emit_json(report.to_dict())
        else:
            render(report)
        raise typer.Exit(0 if report.ok else 1)


def render(report) -> None:
    from rich.markup import escape
    from rich.table import Table

    t, m = report.text, report.mmproj
    output.stdout.print(f"text:   {escape(t['path'])} ({t['architecture']}, width {t['embedding_length']}, "
                        f"{t['vocab_size']} tokens)")
    output.stdout.print(f"mmproj: {escape(m['path'])} (projector {m['projector_type']}, "
                        f"width {m['projection_width']})")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("severity")
    table.add_column("code")
    table.add_column("finding", overflow="fold")
    order = {"error": 0, "warning": 1, "info": 2}
    for f in sorted(report.findings, key=lambda f: order.get(f.severity, 3)):
        text = escape(f.message) + (f"\n[dim]hint: {escape(f.hint)}[/]" if f.hint else "")
        table.add_row(f"[{SEVERITY_STYLE.get(f.severity, '')}]{f.severity}[/]", f.code, text)
    output.stdout.print(table)
    errors = sum(f.severity == "error" for f in report.findings)
    warnings = sum(f.severity == "warning" for f in report.findings)
    if errors:
        output.stdout.print(f"[bold red]incompatible[/]: {errors} error(s), {warnings} warning(s)")
    else:
        output.stdout.print(f"[green]compatible[/]" + (f", {warnings} warning(s)" if warnings else ""))
