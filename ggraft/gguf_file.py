"""Reading GGUF files: a validated structural index first, one clear error for a damaged file.

``scan_gguf`` walks the header, every key/value and every tensor info of a memory-mapped file
with bounds checks before anything is trusted (the rules are llama.cpp's own ``gguf.cpp``:
no nested arrays, general.alignment a u32 power of two, at most 4 dims, rows a whole number
of blocks, tensor data laid out in order at aligned offsets, inside the file).  Values are
decoded on demand and string arrays are only walked, so a 150k-token vocab costs ~15 ms and a
multi-GB file is never read beyond its header; gguf-py's ``GGUFReader`` builds two numpy views
per vocab string (~12 s for a 131k-token vocab), which is why ``check`` reads through the index.
``open_gguf`` still returns a ``gguf.GGUFReader`` — after the same validation.

Type codes, sizes and quantization come from gguf-py (``GGUFValueType``, ``GGML_QUANT_SIZES``,
``gguf.quants.dequantize``).
"""
from __future__ import annotations

import mmap
import struct
from array import array
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

from .errors import InputError

VT = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: tensor names are at most 63 bytes
_NUMPY_SCALARS = gguf.GGUFReader.gguf_scalar_to_np  # GGUFValueType -> numpy scalar type
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, >= 1 byte of key, type, >= 1 byte of value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


class _Malformed(Exception):
    """A structural problem, raised while scanning and turned into one InputError line."""


@dataclass(frozen=True)
class Field:
    """One key/value: where its value starts, its type, and (for arrays) the item type and count."""

    name: str
    type: VT
    offset: int
    item_type: VT | None = None
    count: int = 1
    string_offsets: array | None = None  # start of every string of a string array


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: ``shape`` in ggml order (ne0 = row length, as gguf-py's ReaderTensor.shape)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Q
    offset: int  # absolute byte offset of the data
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class GGUFIndex:
    """A validated, memory-mapped view of a GGUF file's keys and tensor infos."""

    def __init__(self, path: Path, buf: mmap.mmap, order: str, version: int, fields: dict[str, Field],
                 tensors: list[TensorInfo], alignment: int, data_offset: int):
        self.path, self._buf, self.order, self.version = path, buf, order, version
        self.fields, self.tensors = fields, tensors
        self.alignment, self.data_offset = alignment, data_offset
        self.size = len(buf)
        self._by_name = {t.name: t for t in tensors}

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

    def strings(self, field: Field, raw: bool = False) -> list[str] | list[bytes]:
        """Every string of a string array (each one's length is where the next one starts)."""
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
        dtype = np.dtype(_NUMPY_SCALARS[field.item_type]).newbyteorder(self.order)
        return np.frombuffer(self._buf, dtype=dtype, count=field.count, offset=field.offset + 12)

    def string_at(self, field: Field, i: int, raw: bool = False) -> str | bytes:
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


class _Scanner:
    """Walks a GGUF file's structure with a bounds check before every read."""

    def __init__(self, buf: mmap.mmap):
        self.buf, self.size, self.pos, self.order = buf, len(buf), 0, "<"

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise _Malformed(f"{what} at byte {self.pos} needs {n} bytes but the file ends at byte {self.size} "
                             "(truncated?)")

    def read(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, what: str) -> bytes:
        n = self.read("Q", f"length of {what}")
        if n > self.size - self.pos:
            raise _Malformed(f"{what} claims {n} bytes but only {self.size - self.pos} remain in the file")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def name(self, what: str) -> str:
        raw = self.string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed(f"{what} is not valid UTF-8: {raw[:40]!r}") from None

    def value_type(self, key: str, what: str = "value type") -> VT:
        code = self.read("I", f"{what} of key {key!r}")
        try:
            return VT(code)
        except ValueError:
            raise _Malformed(f"key {key!r} has unknown {what} {code}") from None

    def skip_value(self, key: str, vtype: VT) -> Field:
        start = self.pos
        if vtype == VT.STRING:
            self.string(f"string value of key {key!r}")
            return Field(key, vtype, start)
        if vtype != VT.ARRAY:
            self.need(np.dtype(_NUMPY_SCALARS[vtype]).itemsize, f"value of key {key!r}")
            self.pos += np.dtype(_NUMPY_SCALARS[vtype]).itemsize
            return Field(key, vtype, start)
        item = self.value_type(key, "array item type")
        count = self.read("Q", f"array length of key {key!r}")
        if item == VT.ARRAY:
            raise _Malformed(f"key {key!r} is an array of arrays, which llama.cpp does not read")
        min_item = 8 if item == VT.STRING else np.dtype(_NUMPY_SCALARS[item]).itemsize
        if count > (self.size - self.pos) // min_item:
            raise _Malformed(f"key {key!r} claims an array of {count} items "
                             f"but only {self.size - self.pos} bytes remain")
        if item != VT.STRING:
            self.pos += count * min_item
            return Field(key, vtype, start, item, count)
        offsets = array("Q")  # grows only as strings are really found: bounded by the file's size
        unpack, append = struct.Struct(self.order + "Q").unpack_from, offsets.append
        buf, size, pos = self.buf, self.size, self.pos
        for i in range(count):
            if pos + 8 > size:
                raise _Malformed(f"string {i} of array {key!r} at byte {pos} runs past the end of the file "
                                 "(truncated?)")
            append(pos)
            (n,) = unpack(buf, pos)
            pos += 8 + n
        if pos > size:
            raise _Malformed(f"the last string of array {key!r} runs past the end of the file (truncated?)")
        self.pos = pos
        return Field(key, vtype, start, item, count, offsets)

    def tensor_info(self, i: int, seen: set[str]) -> tuple[str, tuple[int, ...], Q, int]:
        name = self.name(f"name of tensor {i}")
        if len(name.encode()) >= MAX_NAME:
            raise _Malformed(f"tensor {i} name is {len(name.encode())} bytes long; llama.cpp allows {MAX_NAME - 1}")
        if name in seen:
            raise _Malformed(f"duplicate tensor {name!r}")
        seen.add(name)
        n_dims = self.read("I", f"dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise _Malformed(f"tensor {name!r} has {n_dims} dimensions; GGUF allows at most {MAX_DIMS}")
        shape = tuple(self.read("q", f"dimension {d} of tensor {name!r}") for d in range(n_dims))
        if any(n < 0 for n in shape):
            raise _Malformed(f"tensor {name!r} has a negative dimension {shape}")
        if int(np.prod([max(n, 1) for n in shape], dtype=object)) >= 2 ** 63:
            raise _Malformed(f"tensor {name!r} shape {shape} has more than 2^63 elements")
        code = self.read("I", f"type of tensor {name!r}")
        try:
            qtype = Q(code)
            block, _ = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Malformed(f"tensor {name!r} has unknown type {code}") from None
        if (shape[0] if shape else 1) % block:
            raise _Malformed(f"tensor {name!r} of type {qtype.name} has rows of {shape[0]} values, "
                             f"not a multiple of its block size {block}")
        offset = self.read("Q", f"data offset of tensor {name!r}")
        return name, shape, qtype, offset


def _scan(path: Path, buf: mmap.mmap) -> GGUFIndex:
    s = _Scanner(buf)
    if s.size < 4:
        raise _Malformed(f"only {s.size} bytes long, too short for a GGUF header")
    magic = bytes(buf[:4])
    if struct.unpack("<I", magic)[0] != gguf.GGUF_MAGIC:
        raise _Malformed(f"bad magic {magic!r}, expected b'GGUF' (not a GGUF file)")
    s.pos = 4
    version = s.read("I", "version")
    if version & 0xFFFF == 0 and version:  # written on a machine of the other byte order
        s.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in READER_SUPPORTED_VERSIONS:
        readable = ", ".join(map(str, READER_SUPPORTED_VERSIONS))
        raise _Malformed(f"unsupported GGUF version {version} (readable: {readable})")
    n_tensors = s.read("q", "tensor count")
    n_kv = s.read("q", "key/value count")
    if n_tensors < 0 or n_kv < 0:
        raise _Malformed(f"negative counts in the header: {n_tensors} tensors, {n_kv} keys")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > s.size - s.pos:
        raise _Malformed(f"header claims {n_kv} keys and {n_tensors} tensors, more than a file of {s.size} bytes "
                         "can hold (truncated?)")

    fields: dict[str, Field] = {}
    for i in range(n_kv):
        key = s.name(f"key {i}")
        if not key:
            raise _Malformed(f"key {i} is empty")
        if key in fields:
            raise _Malformed(f"duplicate key {key!r}")
        fields[key] = s.skip_value(key, s.value_type(key))

    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    align_field = fields.get(gguf.Keys.General.ALIGNMENT)
    if align_field is not None:
        if align_field.type != VT.UINT32:
            raise _Malformed(f"{gguf.Keys.General.ALIGNMENT} must be a UINT32, not {align_field.type.name}")
        (alignment,) = struct.unpack_from(s.order + "I", buf, align_field.offset)
        if alignment == 0 or alignment & (alignment - 1):
            raise _Malformed(f"{gguf.Keys.General.ALIGNMENT} {alignment} is not a power of two")

    infos, seen = [], set()
    for i in range(n_tensors):
        infos.append(s.tensor_info(i, seen))
    data_offset = s.pos + (-s.pos) % alignment

    tensors, expected = [], 0
    for name, shape, qtype, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_bytes = (int(np.prod(shape, dtype=object)) if shape else 1) // block * type_size
        if offset != expected:
            why = "not aligned" if offset % alignment else "each tensor's data must follow the previous one's"
            raise _Malformed(f"tensor {name!r} has data offset {offset}, expected {expected} ({why})")
        end = data_offset + offset + n_bytes
        if end > s.size:
            raise _Malformed(f"tensor {name!r} data ends at byte {end}, past the end of the file "
                             f"({s.size} bytes; truncated?)")
        tensors.append(TensorInfo(name, shape, qtype, data_offset + offset, n_bytes))
        expected = offset + n_bytes + (-n_bytes) % alignment
    return GGUFIndex(path, buf, s.order, version, fields, tensors, alignment, data_offset)


def scan_gguf(path: str | Path, what: str = "GGUF file") -> GGUFIndex:
    """The validated structural index of a GGUF file, or an InputError naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a {what}")
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) == 0:
                raise InputError(f"{path}: not a valid {what}: the file is empty")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return _scan(path, buf)
    except _Malformed as e:
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
