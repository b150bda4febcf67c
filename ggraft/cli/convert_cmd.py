"""ggraft convert HF_DIR -o mmproj.gguf"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import output
from .options import DEFAULT_OUTTYPE, Force, Json, Output, OutType


def convert(hf_dir: Annotated[Path, typer.Argument(help="Checkpoint folder: Hugging Face (config.json) or "
                                                    "Mistral native (params.json).")],
            out: Output, outtype: OutType = DEFAULT_OUTTYPE, force: Force = False, json: Json = False) -> None:
    """Convert a checkpoint's vision encoder + projector into an mmproj GGUF."""
    from ggraft.hf.checkpoint import open_checkpoint
    from ggraft.mmproj.converter import converter_for
    from ggraft.mmproj.writer import convert as write

    conv = converter_for(open_checkpoint(hf_dir))
    path = write(conv, out, outtype=outtype, force=force)
    info = {"output": str(path), "family": conv.family, "projector_type": conv.projector_type,
            "outtype": outtype, "bytes": path.stat().st_size}
    if json:
        output.emit_json(info)
    else:
        output.stdout.print(f"wrote {path} ({conv.family}, projector {conv.projector_type}, {outtype}, "
                            f"{info['bytes'] / 1e6:.1f} MB)")
