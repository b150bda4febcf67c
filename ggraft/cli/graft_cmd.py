"""ggraft graft --donor DONOR --text RECIPIENT.gguf -o mmproj.gguf"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import output
from .options import DEFAULT_OUTTYPE, OUTTYPE_CHOICES, Force, Json, Output


def graft(donor: Annotated[Path, typer.Option("--donor", metavar="PATH", help="Checkpoint folder (transformers or Mistral "
                                              "native) or mmproj GGUF whose vision tower to use.")],
          text: Annotated[Path, typer.Option("--text", metavar="FILE", help="The recipient's text GGUF.")],
          out: Output,
          outtype: Annotated[Optional[str], typer.Option("--outtype", metavar="TYPE", help=f"Tensor type: {OUTTYPE_CHOICES} "
                             f"(default: {DEFAULT_OUTTYPE} from a checkpoint, the donor's own types from an mmproj).")] = None,
          allow_token_remap: Annotated[bool, typer.Option("--allow-token-remap", help="Accept image tokens at "
                                       "other ids than the donor's (they must still be special tokens).")] = False,
          force: Force = False, json: Json = False) -> None:
    """Fit a donor's vision tower and projector to a text-only model.

    Rows that belong to the language model (Pixtral's [IMG_BREAK]) come from the recipient;
    widths and image tokens are checked first."""
    from ggraft.jobs.graft import graft as run

    report = run(donor, text, out, outtype=outtype, force=force, allow_token_remap=allow_token_remap)
    if json:
        output.emit_json(report.to_dict())
        return
    output.stdout.print(f"wrote {report.output} ({report.projector_type}): {report.donor}'s vision tower "
                        f"for {report.recipient}")
    for name, source in report.rows.items():
        output.stdout.print(f"  {name} <- {source}")
    tokens = ", ".join(f"{t}={ids['recipient']}" for t, ids in report.tokens.items())
    output.stdout.print(f"  image tokens: {tokens}")
    for note in report.notes:
        output.note(f"note: {note}")
