"""What the installed llama.cpp knows: the projector names compiled into llama-cpp-python's
libmtmd, and the version of llama-cpp-python it came with (found without importing llama_cpp)."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import gguf

from .boundary_tokens import BOUNDARY_TOKENS


@functools.cache
def _libmtmd() -> tuple[bytes, str] | None:
    """The bytes of llama-cpp-python's libmtmd (found without importing llama_cpp) and its version."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for lib in sorted((Path(folder) / "lib").glob("*mtmd*")):
            if lib.suffix in (".so", ".dylib", ".dll"):
                from importlib.metadata import PackageNotFoundError, version

                try:
                    installed = version("llama_cpp_python")
                except PackageNotFoundError:
                    installed = "unknown"
                return lib.read_bytes(), installed
    return None


def llama_cpp_knows(projector: str) -> bool | None:
    """Whether the installed libmtmd has ``projector`` among its projector names (None: no libmtmd found).

    The names are string literals of clip-impl.h's PROJECTOR_TYPE_NAMES compiled into the library;
    the linker may store one as the tail of a longer literal ("mlp" inside "adapter_mlp"), so a
    tail match counts for names gguf-py or the boundary table also know."""
    lib = _libmtmd()
    if lib is None:
        return None
    name = projector.encode()
    if b"\0" + name + b"\0" in lib[0]:
        return True
    ecosystem = set(vars(gguf.VisionProjectorType).values()) | set(BOUNDARY_TOKENS)
    return projector in ecosystem and name + b"\0" in lib[0]


def installed_llama_cpp_python() -> str:
    lib = _libmtmd()
    return lib[1] if lib else "not found"
