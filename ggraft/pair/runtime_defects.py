"""Known ways the llama.cpp runtime itself departs from transformers, per projector type.

Each family declares its own (``Converter.runtime_defects``, see ``ggraft.mmproj.facts``); found
by ``ggraft verify`` on this project's fixtures (see the README's "Known llama.cpp deviations").
``ggraft check`` warns about them while the installed llama-cpp-python is one of the releases they
were seen in.  No file can compensate for these; they need llama.cpp fixes.
"""
from __future__ import annotations

from typing import Any, Callable

from ggraft.mmproj.facts import RuntimeDefect, runtime_defects


def defects_for(projector: str | None, has_tensor: Callable[[str], bool], installed: str,
                value: Callable[[str], Any] = lambda key: None) -> list[RuntimeDefect]:
    """The known defects that apply to an mmproj (``has_tensor(name)``, ``value(key)``) on ``installed``."""
    return [d for d in runtime_defects() if d.applies(projector, has_tensor, value, installed)]
