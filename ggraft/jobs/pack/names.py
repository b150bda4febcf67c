"""Names a package may take: folder names safe on every OS, Ollama model names, and the
defaults and file-name labels taken from a GGUF's header."""
from __future__ import annotations

import re
from pathlib import Path
import unicodedata

import gguf

from ggraft.errors import InputError
from ggraft.gguf_io import gguf_file

#: characters no folder name may hold on Windows, where LM Studio and Ollama also run
NOT_IN_FOLDER_NAMES = set('<>:"/\\|?*')
#: Ollama's model-name rule (types/model/name.go): letters, digits, '_', '-', '.'; 1-80 long
OLLAMA_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")


def validate_name(value: str, what: str) -> str:
    """A NAME or PUBLISHER that is safe as one folder name on every OS, or an InputError."""
    if not value or not value.strip():
        raise InputError(f"{what} is empty")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in value):
        raise InputError(f"{what} {value!r}: contains control characters")
    if "/" in value or "\\" in value:
        raise InputError(f"{what} {value!r}: must not contain path separators", "give one folder name, not a path")
    if ".." in value or value.startswith("."):
        raise InputError(f"{what} {value!r}: must not contain '..' or start with '.'")
    if value != value.strip():
        raise InputError(f"{what} {value!r}: must not start or end with spaces")
    bad = sorted(set(value) & NOT_IN_FOLDER_NAMES)
    if bad:
        raise InputError(f"{what} {value!r}: must not contain {' '.join(bad)} (not allowed in folder names on Windows)")
    return value


def validate_ollama_name(value: str) -> str:
    validate_name(value, "NAME")
    if not OLLAMA_NAME.fullmatch(value):
        raise InputError(f"NAME {value!r}: not a valid Ollama model name",
                         "use letters, digits, '_', '-' and '.', starting with a letter, digit or '_' (at most 80)")
    return value


def default_name(text: gguf_file.Reader, text_path: Path) -> str:
    """The text model's general.name (or file stem) made into a valid folder/Ollama name."""
    raw = str(gguf_file.value(text, gguf.Keys.General.NAME) or text_path.stem)
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.-]+", "-", raw)).strip("-.")[:80].rstrip("-.")
    return name or "model"


def type_label(reader: gguf_file.Reader) -> str:
    """The file's tensor type as GGUF file names carry it (F16, Q8_0, Q4_K_M, ...)."""
    ft = gguf_file.value(reader, gguf.Keys.General.FILE_TYPE)
    try:
        name = gguf.LlamaFileType(int(ft)).name if ft is not None else ""
    except (ValueError, TypeError):
        name = ""
    if name and name != "GUESSED":
        return name.removeprefix("ALL_").removeprefix("MOSTLY_")
    sizes: dict[str, int] = {}
    for t in gguf_file.tensors(reader):  # no file type: the type holding most bytes of the matrices
        if len(t.shape) > 1:
            sizes[t.tensor_type.name] = sizes.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return max(sizes, key=sizes.get) if sizes else "F32"
