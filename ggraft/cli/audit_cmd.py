"""ggraft audit TEXT.gguf|HF_DIR"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import output
from .options import Json

SHOWN_PER_FAMILY_PATTERN = 3  # numbered tile tokens (<row_i_col_j>): show a few, count the rest


def audit(source: Annotated[Path, typer.Argument(help="A text GGUF, or a Hugging Face folder with its tokenizer.")],
          json: Json = False) -> None:
    """List the latent vision tokens in a tokenizer and the converters that could donate a tower.

    Each token is shown with the family convention it belongs to."""
    from ggraft.jobs.audit import audit as run

    report = run(source)
    if json:
        output.emit_json(report.to_dict())
    else:
        render(report)


def render(report) -> None:
    from rich.table import Table

    out = output.stdout
    out.print(f"{report.source}: {report.vocab_size} tokens ({report.tokenizer})")
    if not report.tokens:
        out.print("latent vision tokens: none found")
        return
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in ("token", "id", "kind", "family"):
        table.add_column(col, justify="right" if col == "id" else "left")
    tiles = [t for t in report.tokens if "_col_" in t.token]
    for t in [t for t in report.tokens if t not in tiles] + tiles[:SHOWN_PER_FAMILY_PATTERN]:
        table.add_row(t.token, str(t.id), t.kind, ", ".join(t.families))
    if len(tiles) > SHOWN_PER_FAMILY_PATTERN:
        table.add_row(f"… {len(tiles) - SHOWN_PER_FAMILY_PATTERN} more tile tokens", "", "", "")
    out.print(table)
    for f in report.families:
        converters = report.donors.get(f["family"]) or []
        donors = ", ".join(converters) if converters else "no ggraft converter for this family yet"
        out.print(f"{f['family']} ({f['found']} of {f['expected']} tokens): donors: {donors}")
