"""ggraft: assemble multimodal models for llama.cpp from parts."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("ggraft")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from .errors import GgraftError, IncompatibleError, InputError  # noqa: E402

__all__ = ["__version__", "GgraftError", "InputError", "IncompatibleError", "Pair"]


def __getattr__(name: str):
    # Pair pulls in llama-cpp-python; import it only when asked for.
    if name == "Pair":
        from .pair.runtime import Pair

        return Pair
    raise AttributeError(name)
