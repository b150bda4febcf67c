"""ggraft verify HF_DIR MMPROJ.gguf"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ggraft.gguf_io.output_types import bars_described
from . import output
from .options import Json, Threads


def verify(hf_dir: Annotated[Path, typer.Argument(help="Hugging Face checkpoint folder.")],
           mmproj: Annotated[Path, typer.Argument(help="The mmproj GGUF converted from it.")],
           text: Annotated[Optional[Path], typer.Option("--text", metavar="FILE", help="Text GGUF to load alongside.")] = None,
           image_size: Annotated[Optional[str], typer.Option(
               "--image-size", metavar="HxW", help="HEIGHTxWIDTH of the test image (default: the family's, taken without resizing).")] = None,
           threads: Threads = None, json: Json = False) -> None:
    """Compare the mmproj's image embeddings in llama.cpp with transformers' on the same pixels.

    Exit 1 below the bar for the file's type (cosine {bars})."""
    from ggraft.errors import InputError
    from ggraft.jobs.verify import verify as run

    size = None
    if image_size:
        try:
            height, width = (int(x) for x in image_size.lower().split("x"))
            size = (height, width)
        except ValueError:
            raise InputError(f"--image-size {image_size!r}: expected HEIGHTxWIDTH, e.g. 168x224") from None
    report = run(hf_dir, mmproj, text=text, n_threads=threads, image_size=size)
    if json:
        output.emit_json(report.to_dict())
    else:
        render(report)
    raise typer.Exit(0 if report.passed else 1)


verify.__doc__ = (verify.__doc__ or "").format(bars=bars_described())  # the bars of ``output_types``


def render(report) -> None:
    h, w = report.image_size
    output.stdout.print(f"{report.mmproj}: projector {report.projector_type}, {report.outtype}, image {w}x{h}")
    if report.result is None:
        output.stdout.print(f"FAIL: {report.problem}")
        return
    r = report.result
    verdict = "PASS" if report.passed else "FAIL"
    output.stdout.print(f"{verdict}: {r.tokens} tokens, min cosine {r.min_cosine:.6f} (bar {report.bar}), "
                        f"mean {r.mean_cosine:.6f}, max relative error {r.max_rel_error:.2e}")
    if report.nonfinite_outside:
        output.stdout.print(f"warning: llama.cpp emitted {report.nonfinite_outside} non-finite values in rows it adds "
                            "itself (not compared); the text model will see them")
    if report.runtime_note:
        rr = report.runtime_result
        output.stdout.print(f"note: {report.runtime_note}; against transformers run that way: "
                            f"min cosine {rr.min_cosine:.6f}, max relative error {rr.max_rel_error:.2e}")
