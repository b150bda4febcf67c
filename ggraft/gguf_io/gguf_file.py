"""Reading GGUF files: a validated structural index first, one clear error for a damaged file.

``scan_gguf`` memory-maps a file and checks its layout (``gguf_layout``: the header, every
key/value and every tensor info, by llama.cpp's own rules) before anything is trusted.  Values
are decoded on demand, so a 150k-token vocab costs ~15 ms and a multi-GB file is never read
beyond its header; gguf-py's ``GGUFReader`` builds two numpy views
per vocab string (~12 s for a 131k-token vocab), which is why ``check`` reads through the index.
``open_gguf`` still returns a ``gguf.GGUFReader`` — after the same validation.  Only regular
files are opened (a FIFO would block).  Values are typed by whoever wrote the file: the typed
accessors (``string``, ``integer``, ``number``, ``flag``, ``integers``, ``numbers_of``,
``string_list``) turn a key stored with another type into one InputError naming the file, the key,
the stored type and the expected one; ``value`` returns whatever is stored.

Type codes, sizes and quantization come from gguf-py (``GGUFValueType``, ``GGML_QUANT_SIZES``,
``gguf.quants.dequantize``).
"""
from __future__ import annotations

import mmap
import struct
from bisect import bisect_left
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np

from ggraft.errors import InputError, input_file
from .gguf_layout import FLOAT_TYPES, INT_TYPES, Q, VT, Field, Layout, Malformed, TensorInfo, _NUMPY_SCALARS, scan_layout


class GGUFIndex:
    """A validated, memory-mapped view of a GGUF file's keys and tensor infos."""

    def __init__(self, path: Path, buf: mmap.mmap, layout: Layout):
        self.path, self._buf, self.order, self.version = path, buf, layout.order, layout.version
        self.fields, self.tensors = layout.fields, layout.tensors
        self.alignment, self.data_offset = layout.alignment, layout.data_offset
        self.size = len(buf)
        self._by_name = {t.name: t for t in self.tensors}

    def value(self, key: str, default: Any = None, raw_strings: bool = False) -> Any:
        """A key's value as Python values; strings decoded (invalid UTF-8 replaced), or as the
        stored bytes with ``raw_strings`` (to copy them exactly)."""
        field = self.fields.get(key)
        if field is None:
            return default
        if field.type != VT.ARRAY:
            return self._scalar(field.type, field.offset, raw_strings)
        if field.item_type == VT.STRING:
            return self.strings(field, raw_strings)
        return self.numbers(field).tolist()

    # -- typed accessors: a key stored with another type than its reader needs is one InputError
    def _typed(self, key: str, types: frozenset, expected: str, array: bool = False) -> Field | None:
        field = self.fields.get(key)
        if field is None:
            return None
        if array:
            self._require_items(field, types, expected)
        elif field.type not in types:
            self._wrong_type(field, expected)
        return field

    def _require_items(self, field: Field, types: set, expected: str) -> None:
        if field.type != VT.ARRAY or field.item_type not in types:
            self._wrong_type(field, expected)

    def _wrong_type(self, field: Field, expected: str) -> None:
        kind = f"an array of {field.item_type.name}" if field.type == VT.ARRAY else field.type.name
        raise InputError(f"{self.path}: key {field.name} is stored as {kind}; expected {expected}")

    def string(self, key: str, default: str | None = None) -> str | None:
        """A STRING key's value (invalid UTF-8 replaced)."""
        field = self._typed(key, frozenset({VT.STRING}), "a string")
        return default if field is None else self._scalar(VT.STRING, field.offset)

    def integer(self, key: str, default: int | None = None) -> int | None:
        """An integer key's value (any of GGUF's integer types)."""
        field = self._typed(key, INT_TYPES, "an integer")
        return default if field is None else self._scalar(field.type, field.offset)

    def number(self, key: str, default: float | None = None) -> float | None:
        """A numeric key's value (integer or float types), as stored."""
        field = self._typed(key, INT_TYPES | FLOAT_TYPES, "a number")
        return default if field is None else self._scalar(field.type, field.offset)

    def flag(self, key: str, default: bool | None = None) -> bool | None:
        """A BOOL key's value."""
        field = self._typed(key, frozenset({VT.BOOL}), "a bool")
        return default if field is None else bool(self._scalar(VT.BOOL, field.offset))

    def integers(self, key: str, default: list[int] | None = None) -> list[int] | None:
        """An array of integers (or of bools, read as 0/1)."""
        field = self._typed(key, INT_TYPES | {VT.BOOL}, "an array of integers", array=True)
        return default if field is None else [int(x) for x in self.numbers(field).tolist()]

    def numbers_of(self, key: str, default: list[float] | None = None) -> list[float] | None:
        """An array of numbers (integer or float items)."""
        field = self._typed(key, INT_TYPES | FLOAT_TYPES, "an array of numbers", array=True)
        return default if field is None else self.numbers(field).tolist()

    def string_list(self, key: str, default: list[str] | None = None) -> list[str] | None:
        """An array of strings (invalid UTF-8 replaced)."""
        field = self._typed(key, frozenset({VT.STRING}), "an array of strings", array=True)
        return default if field is None else self.strings(field)

    def strings(self, field: Field, raw: bool = False) -> list[str] | list[bytes]:
        """Every string of a string array (each one's length is where the next one starts)."""
        self._require_items(field, {VT.STRING}, "an array of strings")
        if not field.count:
            return []
        starts = field.string_offsets.tolist()
        last = starts[-1]
        ends = starts[1:] + [last + 8 + struct.unpack_from(self.order + "Q", self._buf, last)[0]]
        buf = self._buf
        items = [buf[start + 8:end] for start, end in zip(starts, ends)]
        return items if raw else [b.decode("utf-8", errors="replace") for b in items]

    def numbers(self, field: Field) -> np.ndarray:
        """A numeric array's items as a numpy array (a view of the file)."""
        self._require_items(field, INT_TYPES | FLOAT_TYPES | {VT.BOOL}, "an array of numbers")
        dtype = np.dtype(_NUMPY_SCALARS[field.item_type]).newbyteorder(self.order)
        return np.frombuffer(self._buf, dtype=dtype, count=field.count, offset=field.offset + 12)

    def string_at(self, field: Field, i: int, raw: bool = False) -> str | bytes:
        self._require_items(field, {VT.STRING}, "an array of strings")
        start = int(field.string_offsets[i])
        (n,) = struct.unpack_from(self.order + "Q", self._buf, start)
        data = self._buf[start + 8:start + 8 + n]
        return data if raw else data.decode("utf-8", errors="replace")

    def find_strings(self, key: str, wanted: list[str], last: bool = False) -> dict[str, int]:
        """Index of each of ``wanted`` in the string array ``key`` (exact match; absent ones left out;
        the first occurrence, or the last with ``last``).  Searches the raw bytes, so a 150k-token
        vocab is not decoded."""
        field = self.fields.get(key)
        if field is None or field.item_type != VT.STRING or not field.count:
            return {}
        starts = field.string_offsets
        end = int(starts[-1]) + 8 + struct.unpack_from(self.order + "Q", self._buf, int(starts[-1]))[0]
        found = {}
        for text in dict.fromkeys(wanted):
            raw = text.encode()
            pattern = struct.pack(self.order + "Q", len(raw)) + raw
            search = self._buf.rfind if last else self._buf.find
            lo, hi = int(starts[0]), end
            pos = search(pattern, lo, hi)
            while pos >= 0:
                i = bisect_left(starts, pos)
                if i < len(starts) and starts[i] == pos:
                    found[text] = i
                    break
                lo, hi = (lo, pos + len(pattern) - 1) if last else (pos + 1, hi)
                pos = search(pattern, lo, hi)
        return found

    def tensor(self, name: str) -> TensorInfo | None:
        return self._by_name.get(name)

    def raw(self, t: TensorInfo, first_row: int = 0, rows: int | None = None) -> np.ndarray:
        """Rows of a tensor's bytes, shaped (rows, bytes per row); only those bytes are touched."""
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        row_bytes = (t.shape[0] if t.shape else 1) // block * type_size
        n_rows = t.n_elements // max(t.shape[0] if t.shape else 1, 1)
        rows = n_rows - first_row if rows is None else rows
        data = np.frombuffer(self._buf, np.uint8, count=rows * row_bytes, offset=t.offset + first_row * row_bytes)
        return data.reshape(rows, row_bytes)

    def drop_pages(self, start: int, stop: int) -> None:
        """Unmap bytes ``start:stop`` of the file (widened to whole pages) from this process, where
        the OS can; the page cache keeps them, and reading them again maps them again."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        low = max(0, start - start % mmap.PAGESIZE)
        if low < self.size and stop > low:
            self._buf.madvise(mmap.MADV_DONTNEED, low, stop - low + -stop % mmap.PAGESIZE)

    def _scalar(self, vtype: VT, offset: int, raw_strings: bool = False) -> Any:
        if vtype == VT.STRING:
            (n,) = struct.unpack_from(self.order + "Q", self._buf, offset)
            data = self._buf[offset + 8:offset + 8 + n]
            return data if raw_strings else data.decode("utf-8", errors="replace")
        dtype = np.dtype(_NUMPY_SCALARS[vtype]).newbyteorder(self.order)
        return np.frombuffer(self._buf, dtype=dtype, count=1, offset=offset)[0].item()

    def close(self) -> None:
        try:
            self._buf.close()
        except BufferError:  # a numpy view of the file is still alive; the mapping goes with it
            pass


def scan_gguf(path: str | Path, what: str = "GGUF file") -> GGUFIndex:
    """The validated structural index of a GGUF file, or an InputError naming the file and the problem."""
    path = input_file(path, what)
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) == 0:
                raise InputError(f"{path}: not a valid {what}: the file is empty")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return GGUFIndex(path, buf, scan_layout(buf))
    except Malformed as e:
        buf.close()
        raise InputError(f"{path}: not a valid {what}: {e}") from None


def open_gguf(path: str | Path, what: str = "GGUF file") -> gguf.GGUFReader:
    """gguf-py's memory-mapped reader, after ``scan_gguf`` has validated the structure."""
    scan_gguf(path, what).close()
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, KeyError, IndexError, OverflowError, MemoryError, TypeError, AssertionError,
            UnicodeDecodeError) as e:  # not expected after the scan; still one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a valid {what}: {first}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None


Reader = GGUFIndex | gguf.GGUFReader


def value(reader: Reader, key: str, default: Any = None) -> Any:
    """A key's value as a Python value (str, int, float, bool or list), or ``default``."""
    if isinstance(reader, GGUFIndex):
        return reader.value(key, default)
    field = reader.get_field(key)
    if field is None:
        return default
    try:
        return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        return default


def _is_vocab_array(key: str, vtype: VT) -> bool:
    return key.startswith("tokenizer.ggml.") and vtype == VT.ARRAY


def metadata(reader: Reader) -> dict[str, Any]:
    """All keys except the large arrays of a vocab (tokens, scores, types, merges)."""
    if isinstance(reader, GGUFIndex):
        return {k: reader.value(k) for k, f in reader.fields.items() if not _is_vocab_array(k, f.type)}
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or (field.types and _is_vocab_array(key, field.types[0])):
            continue
        out[key] = value(reader, key)
    return out


def tensor(reader: Reader, name: str) -> TensorInfo | gguf.ReaderTensor | None:
    if isinstance(reader, GGUFIndex):
        return reader.tensor(name)
    return next((t for t in reader.tensors if t.name == name), None)


def tensors(reader: Reader) -> Iterator[TensorInfo | gguf.ReaderTensor]:
    return iter(reader.tensors)


def _dequantize(reader: Reader, raw: np.ndarray, qtype: Q, name: str) -> np.ndarray:
    try:
        return gguf.quants.dequantize(raw, qtype).astype(np.float32)
    except NotImplementedError:
        raise InputError(f"{reader.path}: tensor {name!r} is {qtype.name}, which gguf-py cannot dequantize") from None


def tensor_row(reader: Reader, name: str, row: int) -> np.ndarray:
    """Row ``row`` of a tensor (e.g. one token's embedding) as float32, dequantized; 1-D tensors have one row."""
    t = tensor(reader, name)
    if t is None:
        raise InputError(f"{reader.path}: has no tensor {name!r}")
    shape = [int(n) for n in t.shape]
    n_rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if not 0 <= row < n_rows:
        raise InputError(f"{reader.path}: row {row} is outside {name!r} ({n_rows} rows)")
    if isinstance(reader, GGUFIndex):
        raw = reader.raw(t, row, 1)
    else:
        data = t.data.reshape(n_rows, -1)
        raw = np.asarray(data[row]).reshape(1, -1)
        if t.tensor_type not in (Q.F32, Q.F16):
            raw = raw.view(np.uint8)
    return _dequantize(reader, raw, t.tensor_type, name).reshape(-1)


def tensor_values(reader: Reader, name: str) -> np.ndarray:
    """A whole tensor as float32 in numpy (row-major, HF) shape."""
    t = tensor(reader, name)
    if t is None:
        raise InputError(f"{reader.path}: has no tensor {name!r}")
    if isinstance(reader, GGUFIndex):
        values = _dequantize(reader, reader.raw(t), t.tensor_type, name)
        return values.reshape(tuple(reversed(t.shape)) if t.shape else ())
    return _dequantize(reader, t.data, t.tensor_type, name)
