"""Reading GGUF files with gguf-py: one clear error for a damaged file, typed key access,
and single rows of (possibly quantized) tensors without loading whole tensors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .errors import InputError


def open_gguf(path: str | Path, what: str = "GGUF file") -> gguf.GGUFReader:
    """A memory-mapped reader, or an InputError naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a {what}")
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, KeyError, IndexError, OverflowError, MemoryError, TypeError, AssertionError) as e:
        raise InputError(f"{path}: not a valid {what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None


def value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """A key's value as a Python value (str, int, float, bool or list), or ``default``."""
    field = reader.get_field(key)
    if field is None:
        return default
    try:
        return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        return default


def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All keys except the large arrays of a vocab (tokens, scores, types, merges)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if key.startswith("tokenizer.ggml.") and field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        out[key] = value(reader, key)
    return out


def tensor(reader: gguf.GGUFReader, name: str) -> gguf.ReaderTensor | None:
    for t in reader.tensors:
        if t.name == name:
            return t
    return None


def tensor_row(reader: gguf.GGUFReader, name: str, row: int) -> np.ndarray:
    """Row ``row`` of a 2-D tensor (e.g. one token's embedding) as float32, dequantized."""
    t = tensor(reader, name)
    if t is None:
        raise InputError(f"{reader.path}: has no tensor {name!r}")
    n_rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
    if not 0 <= row < n_rows:
        raise InputError(f"{reader.path}: row {row} is outside {name!r} ({n_rows} rows)")
    data = t.data  # rows x bytes-per-row (quantized) or rows x values
    raw = np.asarray(data[row]).reshape(1, -1) if data.ndim > 1 else np.asarray(data).reshape(1, -1)
    return gguf.quants.dequantize(raw, t.tensor_type).reshape(-1).astype(np.float32)


def tensor_values(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    """A whole tensor as float32 in numpy (row-major, HF) shape."""
    t = tensor(reader, name)
    if t is None:
        raise InputError(f"{reader.path}: has no tensor {name!r}")
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
