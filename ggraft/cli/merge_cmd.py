"""ggraft merge CONFIG.yaml -o OUT"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import output
from .options import OUTTYPE_CHOICES, Force, Json, Threads


def merge(config: Annotated[Path, typer.Argument(help="Merge config (mergekit's YAML).")],
          out: Annotated[Path, typer.Option("-o", "--output", help="A GGUF file, or a folder (HF merge).")],
          outtype: Annotated[Optional[str], typer.Option(
              "--outtype", help=f"{OUTTYPE_CHOICES} (GGUF only). Default: the config's dtype, "
                                "else the metadata source's type.")] = None,
          force: Force = False,
          embed_common: Annotated[bool, typer.Option(
              "--embed-common", help="Merge embeddings of different vocabulary sizes over the rows "
                                     "they share.")] = False,
          check_with: Annotated[Optional[Path], typer.Option(
              "--check-with", help="After a GGUF merge, check the result with this mmproj (as "
                                   "'ggraft check' does).")] = None,
          threads: Threads = None, json: Json = False) -> None:
    """Merge models with a mergekit config (linear, task_arithmetic, ties, dare_linear, dare_ties,
    slerp, passthrough; models, slices or modules): GGUF text models, also of sibling
    architectures with metadata_source, or Hugging Face VLMs and LLMs, module by module.
    Exit 1 when --check-with finds the pair incompatible."""
    from ggraft.jobs.merge import merge as run

    result = run(config, out, outtype=outtype.lower() if outtype else None, force=force,
                 embed_common=embed_common, check_with=check_with, threads=threads)
    for warning in result.warnings:
        output.note(f"warning: {warning}")
    if json:
        output.emit_json(result.to_dict())
    else:
        output.stdout.print(f"wrote {result.output} ({result.method} of {len(result.models)} models, "
                            f"{result.tensors} tensors merged, {result.outtype}, {result.bytes / 1e6:.1f} MB, "
                            f"{result.seconds:.1f} s)")
        if result.check is not None:
            render_check(result.check)
    raise typer.Exit(0 if result.check is None or result.check.ok else 1)


def render_check(report) -> None:
    verdict = "compatible" if report.ok else "NOT compatible"
    output.stdout.print(f"check with {report.mmproj.get('path')}: {verdict}")
    for f in report.findings:
        output.stdout.print(f"  {f.severity}: {f.message}" + (f" (hint: {f.hint})" if f.hint else ""))
