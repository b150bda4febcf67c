"""ggraft inspect FILE.gguf"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import output
from .options import Json


def inspect(file: Annotated[Path, typer.Argument(help="A GGUF file (text model or mmproj).")],
            json: Json = False) -> None:
    """Show what a GGUF file is.

    Architecture, type, widths, projector, tensors by type and ggraft provenance, from the header."""
    from ggraft.jobs.inspect import inspect_gguf

    report = inspect_gguf(file)
    if json:
        output.emit_json(report.to_dict())
    else:
        render(report)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _flat(values: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in values.items():
        rows += _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)]
    return rows


def render(r) -> None:
    from rich.table import Table

    out = output.stdout
    out.print(output.styled("[bold]{}[/]  GGUF v{}, {}", r.path, r.version, _size(r.size_bytes)))
    about = Table(show_header=False, box=None, pad_edge=False)
    about.add_column(style="dim")
    about.add_column(overflow="fold")
    rows = [("architecture", r.architecture), ("general.type", r.type), ("name", r.name), ("file type", r.file_type),
            *_flat(r.widths), *_flat(r.projector, "projector."), *_flat(r.tokenizer, "tokenizer."),
            *_flat(r.split, "split."), ("keys", r.key_count),
            *_flat(r.provenance, "ggraft.")]
    for key, value in rows:
        if value is not None:
            about.add_row(key, str(value))
    out.print(about)
    tensors = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    tensors.add_column("tensor type")
    tensors.add_column("count", justify="right")
    tensors.add_column("size", justify="right")
    for name, t in r.tensor_types.items():
        tensors.add_row(name, str(t["count"]), _size(t["bytes"]))
    tensors.add_row(*(output.styled("[bold]{}[/]", v) for v in ("total", r.tensor_count, _size(r.tensor_bytes))))
    out.print(tensors)
