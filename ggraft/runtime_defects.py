"""Data: known ways the llama.cpp runtime itself departs from transformers, per projector type.

Found by ``ggraft verify`` on this project's fixtures (see the README's "Known llama.cpp
deviations"); ``ggraft check`` warns about them while the installed llama-cpp-python is one
of the releases they were seen in.  No file can compensate for these; they need llama.cpp fixes.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeDefect:
    projector: str
    #: the defect shows only when the mmproj has this tensor ("" = always)
    with_tensor: str
    summary: str
    reference: str
    #: newest llama-cpp-python release it was seen in (older ones share the code)
    seen_up_to: str


DEFECTS: tuple[RuntimeDefect, ...] = (
    RuntimeDefect("mlp", "v.class_embd",
                  "llama.cpp's llava graph puts CLS after the patches: every patch gets its neighbour's position "
                  "embedding, patch 0 is dropped and the projected CLS is fed to the model",
                  "ggml-org/llama.cpp#25814", "0.3.36"),
    RuntimeDefect("pixtral", "",
                  "llama.cpp builds the [IMG_BREAK] rows it inserts from an unwritten buffer times 0, so they "
                  "often hold NaN entries",
                  "ggraft README, Known llama.cpp deviations", "0.3.36"),
)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def defects_for(projector: str | None, has_tensor, installed: str) -> list[RuntimeDefect]:
    """The known defects that apply to an mmproj (``has_tensor(name) -> bool``) on ``installed``."""
    if not installed[:1].isdigit():
        return []
    return [d for d in DEFECTS if d.projector == projector and (not d.with_tensor or has_tensor(d.with_tensor))
            and _version(installed) <= _version(d.seen_up_to)]
