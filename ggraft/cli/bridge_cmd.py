"""ggraft bridge --mmproj DONOR --donor-text DONOR_TEXT.gguf --text RECIPIENT.gguf -o OUT.gguf"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import output
from .options import DEFAULT_OUTTYPE, OUTTYPE_CHOICES, Json, Output

#: check findings that tell a user what the bridged pair still needs (the rest: ggraft check)
TOLD = ("boundary-", "chat-template", "text-architecture", "img-break", "width")


def bridge(mmproj: Annotated[Path, typer.Option("--mmproj", metavar="PATH", help="The donor's mmproj GGUF, or its "
                                                "checkpoint folder (converted on the way).")],
           donor_text: Annotated[Path, typer.Option("--donor-text", metavar="FILE", help="The donor's text GGUF: the "
                                                    "model whose input embeddings the mmproj feeds.")],
           text: Annotated[Path, typer.Option("--text", metavar="FILE", help="The recipient's text GGUF.")],
           out: Output,
           outtype: Annotated[Optional[str], typer.Option("--outtype", metavar="TYPE", help=f"Tensor type: {OUTTYPE_CHOICES} "
                              f"(default: the donor's own types; {DEFAULT_OUTTYPE} from a checkpoint).")] = None,
           force: Annotated[bool, typer.Option("--force", help="Write even when the fit is poor, and overwrite the "
                                               "output if it exists.")] = False,
           json: Json = False) -> None:
    """Re-target a donor's mmproj to a text model of another width and vocabulary, without images.

    A linear map between the two text models' token embeddings, fitted on the tokens they share
    (ridge, float64; 10% held out), is composed into the projector's last layer. Prints the fit;
    refuses a held-out top-1 retrieval below 50% (exit 1) unless --force; then checks the pair."""
    from ggraft.jobs.bridge import bridge as run

    report = run(mmproj, donor_text, text, out, outtype=outtype, force=force)
    if json:
        output.emit_json(report.to_dict())
        return
    f, widths = report.fit, report.widths
    output.stdout.print(f"fit: {f.shared} shared tokens ({report.donor_text} -> {report.recipient}), "
                        f"{f.fitted} fitted, {f.held_out} held out")
    output.stdout.print(f"  held-out top-1 retrieval {f.top1:.1%}, mean cosine {f.mean_cosine:.3f} "
                        f"(mean-row baseline {f.baseline_cosine:.3f}), ridge {f.ridge:g}")
    layer = report.last_layer
    parts = " + ".join(p for p in (layer["weight"], layer["bias"]) if p)
    output.stdout.print(f"last layer ({report.projector_type}): {parts} composed with {layer['map']}, "
                        f"{widths['donor']} -> {widths['recipient']} wide")
    for name, source in report.rows.items():
        output.stdout.print(f"  {name} <- {source}")
    output.stdout.print(f"wrote {report.output}")
    for note in report.notes:
        output.note(f"note: {note}")
    render_check(report.check)


def render_check(check) -> None:
    """The check findings a user of the bridged pair must know, and whether the pair passes."""
    told = [f for f in check.findings if f.code.startswith(TOLD) or f.severity != "info"]
    if told:
        output.stdout.print("what to know about the pair (ggraft check):")
    for f in told:
        output.stdout.print(f"  {f.severity}: {f.message}")
    if not check.ok:
        errors = sum(f.severity == "error" for f in check.findings)
        output.note(f"Warning: the bridged pair does not pass ggraft check yet ({errors} error(s)); "
                    "ggraft run refuses it until they are resolved")
