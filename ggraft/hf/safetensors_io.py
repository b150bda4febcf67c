"""Memory-mapped, validated reading of safetensors files.

The header is parsed and checked here (sizes, offsets, dtypes) so that a damaged file is
reported in one line before any tensor is touched; tensor bytes are read lazily through
``mmap``, one tensor at a time (pages handed back after each).  BF16 (which numpy lacks) is widened to F32 on
load.  ``safetensors`` itself cannot hand bf16 to numpy, hence this small reader.
"""
from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ggraft.errors import InputError, input_file

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
_MAX_DIM = 2 ** 63 - 1  # a dimension numpy (and GGUF's int64) can hold


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen bf16 bit patterns (stored as uint16) to float32."""
    wide = raw.astype(np.uint32)
    wide <<= 16
    return wide.view(np.float32)


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
        self._mmap: mmap.mmap | None = None
        self._parse_header()

    def _fail(self, why: str) -> InputError:
        return InputError(f"{self.path}: not a valid safetensors file: {why}")

    def _parse_header(self) -> None:
        size = input_file(self.path, "safetensors file").stat().st_size
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
        except RecursionError:
            raise self._fail("header is nested too deeply") from None
        except ValueError as e:  # e.g. an integer of more digits than Python converts
            raise self._fail(f"header is not JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        data_start = 8 + hlen
        for name, info in header.items():
            if name == "__metadata__":
                self.metadata = info if isinstance(info, dict) else {}
                continue
            self.entries[name] = self._entry(name, info, data_start, size)

    def _entry(self, name: str, info: object, data_start: int, size: int) -> TensorEntry:
        """One header entry checked: a known dtype, a shape of non-negative integers, and data
        offsets that match the shape exactly and lie inside the file (sizes in Python integers,
        so no shape can wrap around a check)."""
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError, IndexError):
            raise self._fail(f"tensor {name!r} has a malformed entry (expected dtype, shape, data_offsets)") from None
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise self._fail(f"tensor {name!r} has unsupported dtype {json.dumps(dtype)[:40]}")
        if not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape):
            raise self._fail(f"tensor {name!r} has a bad shape {json.dumps(shape)[:80]} "
                             "(expected non-negative integers)")
        expected = math.prod(shape) * _DTYPES[dtype][1]
        if type(begin) is not int or type(end) is not int or begin < 0 or end - begin != expected:
            raise self._fail(f"tensor {name!r} has data offsets {json.dumps([begin, end])[:80]} that disagree "
                             f"with its shape {shape} ({expected} bytes)")
        if end > size - data_start:
            raise self._fail(f"tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes (truncated?)")
        return TensorEntry(name, self.path, dtype, tuple(shape), data_start + begin, expected)

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mmap

    def _read(self, start: int, nbytes: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        """A byte range of the mapping as a new array; the range's pages are then given back, so
        reading a model tensor by tensor keeps only the current tensor resident."""
        storage = _DTYPES[dtype][0]
        view = np.frombuffer(self._map(), dtype=storage, count=nbytes // storage.itemsize, offset=start)
        out = bf16_to_f32(view) if dtype == "BF16" else view.copy()
        del view
        if hasattr(mmap, "MADV_DONTNEED") and nbytes:
            first = start - start % mmap.PAGESIZE
            self._mmap.madvise(mmap.MADV_DONTNEED, first, start + nbytes - first)
        return out.reshape(shape)

    def load(self, name: str) -> np.ndarray:
        """The tensor's values (bf16 widened to f32)."""
        e = self.entries[name]
        return self._read(e.start, e.nbytes, e.dtype, e.shape)

    def load_rows(self, name: str, first: int, count: int = 1) -> np.ndarray:
        """Rows ``first:first+count`` of a tensor, reading only those bytes."""
        e = self.entries[name]
        if not e.shape or not (0 <= first and first + count <= e.shape[0]):
            raise InputError(f"{self.path}: row {first} is outside tensor {name!r} of shape {list(e.shape)}")
        row_bytes = int(np.prod(e.shape[1:], dtype=np.int64)) * _DTYPES[e.dtype][1]
        return self._read(e.start + first * row_bytes, count * row_bytes, e.dtype, (count, *e.shape[1:]))
