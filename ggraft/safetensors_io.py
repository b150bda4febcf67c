"""Memory-mapped, validated reading of safetensors files.

The header is parsed and checked here (sizes, offsets, dtypes) so that a damaged file is
reported in one line before any tensor is touched; tensor bytes are read lazily through
``numpy.memmap``, one tensor at a time.  BF16 (which numpy lacks) is widened to F32 on
load.  ``safetensors`` itself cannot hand bf16 to numpy, hence this small reader.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

# safetensors dtype -> (numpy storage dtype, bytes per element)
_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen bf16 bit patterns (stored as uint16) to float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and byte range."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int

    @property
    def numpy_dtype(self) -> np.dtype:
        """The dtype ``load`` returns."""
        return np.dtype(np.float32) if self.dtype == "BF16" else _DTYPES[self.dtype][0]


class SafetensorsFile:
    """One .safetensors file: its validated header and lazy access to each tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        self._mmap: np.memmap | None = None
        self._parse_header()

    def _fail(self, why: str) -> InputError:
        return InputError(f"{self.path}: not a valid safetensors file: {why}")

    def _parse_header(self) -> None:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._fail("shorter than its 8-byte header length")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > _MAX_HEADER or 8 + hlen > size:
                raise self._fail(f"header length {hlen} does not fit in a file of {size} bytes (truncated?)")
            raw = f.read(hlen)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"header is not JSON ({e.__class__.__name__})") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        data_start = 8 + hlen
        data_len = size - data_start
        for name, info in header.items():
            if name == "__metadata__":
                self.metadata = info if isinstance(info, dict) else {}
                continue
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._fail(f"tensor {name!r} has a malformed entry") from None
            if dtype not in _DTYPES:
                raise self._fail(f"tensor {name!r} has unsupported dtype {dtype}")
            if any((not isinstance(d, int)) or d < 0 for d in shape):
                raise self._fail(f"tensor {name!r} has a bad shape {list(shape)}")
            expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][1]
            if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != expected or begin < 0:
                raise self._fail(f"tensor {name!r} has data offsets that disagree with its shape")
            if end > data_len:
                raise self._fail(
                    f"tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes (truncated?)"
                )
            self.entries[name] = TensorEntry(name, self.path, dtype, shape, data_start + begin, expected)

    def _map(self) -> np.memmap:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap

    def load(self, name: str) -> np.ndarray:
        """The tensor's values (read-only view for native dtypes, a new array for bf16)."""
        e = self.entries[name]
        storage, _ = _DTYPES[e.dtype]
        buf = self._map()[e.start : e.start + e.nbytes]
        arr = np.frombuffer(buf, dtype=storage).reshape(e.shape)
        return bf16_to_f32(arr) if e.dtype == "BF16" else arr

    def load_rows(self, name: str, first: int, count: int = 1) -> np.ndarray:
        """Rows ``first:first+count`` of a tensor, reading only those bytes."""
        e = self.entries[name]
        if not e.shape or not 0 <= first and first + count <= e.shape[0]:
            raise InputError(f"{self.path}: row {first} is outside tensor {name!r} of shape {list(e.shape)}")
        storage, width = _DTYPES[e.dtype]
        row_bytes = int(np.prod(e.shape[1:], dtype=np.int64)) * width
        start = e.start + first * row_bytes
        buf = self._map()[start : start + count * row_bytes]
        arr = np.frombuffer(buf, dtype=storage).reshape((count, *e.shape[1:]))
        return bf16_to_f32(arr) if e.dtype == "BF16" else np.array(arr)
