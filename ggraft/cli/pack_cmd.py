"""ggraft pack TEXT.gguf MMPROJ.gguf (--lmstudio DIR | --ollama DIR)"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import output
from .options import Force, Json, MmprojGguf, TextGguf


def pack(text: TextGguf, mmproj: MmprojGguf,
         lmstudio: Annotated[Optional[Path], typer.Option(
             "--lmstudio", metavar="DIR", help="LM Studio models folder: writes DIR/<publisher>/<name>/.")] = None,
         ollama: Annotated[Optional[Path], typer.Option(
             "--ollama", metavar="DIR", help="Writes DIR/<name>/ with the two GGUFs and a Modelfile.")] = None,
         name: Annotated[Optional[str], typer.Option(
             "--name", help="Model name (default: the text model's general.name).")] = None,
         publisher: Annotated[Optional[str], typer.Option(
             "--publisher", help="LM Studio publisher folder (default: ggraft).")] = None,
         copy: Annotated[bool, typer.Option("--copy", help="Copy the GGUFs instead of hard-linking them.")] = False,
         link: Annotated[bool, typer.Option("--link", help="Require hard links; fail where they are impossible.")] = False,
         create: Annotated[bool, typer.Option(
             "--create", help="Ollama: run 'ollama create NAME -f Modelfile' (printed when ollama is absent).")] = False,
         force: Force = False, json: Json = False) -> None:
    """Pack a checked pair for LM Studio or Ollama: GGUFs hard-linked (or copied), plus a model
    card and SHA256SUMS (LM Studio) or a Modelfile (Ollama). Exit 1 if the pair fails check."""
    from ggraft.errors import InputError
    from ggraft.jobs.pack import pack as run
    from ggraft.jobs.pack.targets import ollama_create

    if (lmstudio is None) == (ollama is None):
        raise InputError("give exactly one of --lmstudio DIR or --ollama DIR")
    if copy and link:
        raise InputError("--copy and --link exclude each other")
    if create and ollama is None:
        raise InputError("--create applies to --ollama only")
    layout, out_dir = ("lmstudio", lmstudio) if lmstudio is not None else ("ollama", ollama)
    result = run(text, mmproj, layout, out_dir, name=name, publisher=publisher,
                 link="copy" if copy else "link" if link else "auto", force=force)
    created = ollama_create(result) if create else False
    if json:
        output.emit_json({**result.to_dict(), "created": created})
        return
    render(result, create, created)


def render(result, create: bool, created: bool) -> None:
    out = output.stdout
    warnings = [f for f in result.check["findings"] if f["severity"] == "warning"]
    out.print(f"check: passed ({len(warnings)} warning{'s' * (len(warnings) != 1)})")
    for f in warnings:
        out.print(f"  warning {f['code']}: {f['message']}")
    app = "LM Studio" if result.layout == "lmstudio" else "Ollama"
    out.print(f"packed {result.name} for {app} in {result.folder}")
    for f in result.files:
        out.print(f"  {Path(f.path).name}  ({f.method}, {f.bytes / 1e6:.1f} MB)")
    for fix in result.mmproj_fixes:
        out.print(f"  set in the mmproj copy: {fix}")
    if result.layout == "lmstudio":
        out.print("Or import the files with LM Studio's CLI instead:")
        for command in result.commands:
            out.print(f"  {command}")
        return
    if result.template:
        out.print(f"chat template: {result.template} format, written as TEMPLATE")
    else:
        out.print("chat template: not mapped; Ollama will use the template in the GGUF")
    if created:
        out.print(f"created Ollama model {result.name}: ollama run {result.name}")
    else:
        if create:
            output.note("ollama is not installed here; run this where it is:")
        out.print(f"to create the Ollama model: {result.commands[0]}")
