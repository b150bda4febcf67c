"""Typed options shared by several commands, written once."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ggraft.gguf_io.output_types import CHOICES as OUTTYPE_CHOICES, DEFAULT as DEFAULT_OUTTYPE

Force = Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
OutType = Annotated[str, typer.Option("--outtype", metavar="TYPE", help=f"Tensor type of the output: {OUTTYPE_CHOICES}.")]
Output = Annotated[Path, typer.Option("-o", "--output", metavar="FILE", help="Output file.")]
Threads = Annotated[int | None, typer.Option("--threads", metavar="N", help="CPU threads (default: all cores).")]
TextGguf = Annotated[Path, typer.Argument(help="The text model GGUF.")]
MmprojGguf = Annotated[Path, typer.Argument(help="The mmproj GGUF.")]
ExtraBufts = Annotated[bool | None, typer.Option(
    "--extra-bufts/--no-extra-bufts",
    help="Weight repacking for the text model (llama.cpp's extra buffer types). Default: off on CPUs where "
         "llama.cpp reports AMX (its AMX kernels crash on quantized models), on elsewhere; the environment "
         "variable GGRAFT_EXTRA_BUFTS=1 or 0 sets the default.")]
