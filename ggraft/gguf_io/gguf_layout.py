"""The layout of a GGUF file, walked with a bounds check before every read.

``scan_layout`` reads the header, every key/value and every tensor info of a memory-mapped file
and checks them by llama.cpp's own rules (``gguf.cpp``): no nested arrays, general.alignment a
u32 power of two, at most 4 dims, rows a whole number of blocks, tensor data laid out in order at
aligned offsets, inside the file.  Values are not decoded here; string arrays are only walked
(the offset of each string is kept), so a 150k-token vocab costs ~15 ms.  ``gguf_file.GGUFIndex``
is the reading API on top.  Type codes and sizes come from gguf-py.
"""
from __future__ import annotations

import mmap
import struct
from array import array
from dataclasses import dataclass

import gguf
import numpy as np
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

VT = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: tensor names are at most 63 bytes
_NUMPY_SCALARS = gguf.GGUFReader.gguf_scalar_to_np  # GGUFValueType -> numpy scalar type
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, >= 1 byte of key, type, >= 1 byte of value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
INT_TYPES = frozenset({VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64})
FLOAT_TYPES = frozenset({VT.FLOAT32, VT.FLOAT64})


class Malformed(Exception):
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


@dataclass(frozen=True)
class Layout:
    """Where everything of a GGUF file is: byte order, version, keys, tensors, alignment, data start."""

    order: str
    version: int
    fields: dict[str, Field]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int


class _Scanner:
    """Walks a GGUF file's structure with a bounds check before every read."""

    def __init__(self, buf: mmap.mmap):
        self.buf, self.size, self.pos, self.order = buf, len(buf), 0, "<"

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise Malformed(f"{what} at byte {self.pos} needs {n} bytes but the file ends at byte {self.size} "
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
            raise Malformed(f"{what} claims {n} bytes but only {self.size - self.pos} remain in the file")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def name(self, what: str) -> str:
        raw = self.string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed(f"{what} is not valid UTF-8: {raw[:40]!r}") from None

    def value_type(self, key: str, what: str = "value type") -> VT:
        code = self.read("I", f"{what} of key {key!r}")
        try:
            return VT(code)
        except ValueError:
            raise Malformed(f"key {key!r} has unknown {what} {code}") from None

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
            raise Malformed(f"key {key!r} is an array of arrays, which llama.cpp does not read")
        min_item = 8 if item == VT.STRING else np.dtype(_NUMPY_SCALARS[item]).itemsize
        if count > (self.size - self.pos) // min_item:
            raise Malformed(f"key {key!r} claims an array of {count} items "
                             f"but only {self.size - self.pos} bytes remain")
        if item != VT.STRING:
            self.pos += count * min_item
            return Field(key, vtype, start, item, count)
        offsets = array("Q")  # grows only as strings are really found: bounded by the file's size
        unpack, append = struct.Struct(self.order + "Q").unpack_from, offsets.append
        buf, size, pos = self.buf, self.size, self.pos
        for i in range(count):
            if pos + 8 > size:
                raise Malformed(f"string {i} of array {key!r} at byte {pos} runs past the end of the file "
                                 "(truncated?)")
            append(pos)
            (n,) = unpack(buf, pos)
            pos += 8 + n
        if pos > size:
            raise Malformed(f"the last string of array {key!r} runs past the end of the file (truncated?)")
        self.pos = pos
        return Field(key, vtype, start, item, count, offsets)

    def tensor_info(self, i: int, seen: set[str]) -> tuple[str, tuple[int, ...], Q, int]:
        name = self.name(f"name of tensor {i}")
        if len(name.encode()) >= MAX_NAME:
            raise Malformed(f"tensor {i} name is {len(name.encode())} bytes long; llama.cpp allows {MAX_NAME - 1}")
        if name in seen:
            raise Malformed(f"duplicate tensor {name!r}")
        seen.add(name)
        n_dims = self.read("I", f"dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise Malformed(f"tensor {name!r} has {n_dims} dimensions; GGUF allows at most {MAX_DIMS}")
        shape = tuple(self.read("q", f"dimension {d} of tensor {name!r}") for d in range(n_dims))
        if any(n < 0 for n in shape):
            raise Malformed(f"tensor {name!r} has a negative dimension {shape}")
        if int(np.prod([max(n, 1) for n in shape], dtype=object)) >= 2 ** 63:
            raise Malformed(f"tensor {name!r} shape {shape} has more than 2^63 elements")
        code = self.read("I", f"type of tensor {name!r}")
        try:
            qtype = Q(code)
            block, _ = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise Malformed(f"tensor {name!r} has unknown type {code}") from None
        if (shape[0] if shape else 1) % block:
            raise Malformed(f"tensor {name!r} of type {qtype.name} has rows of {shape[0]} values, "
                             f"not a multiple of its block size {block}")
        offset = self.read("Q", f"data offset of tensor {name!r}")
        return name, shape, qtype, offset


def scan_layout(buf: mmap.mmap) -> Layout:
    """The checked layout of the GGUF bytes in ``buf``, or ``Malformed`` naming the first problem."""
    s = _Scanner(buf)
    if s.size < 4:
        raise Malformed(f"only {s.size} bytes long, too short for a GGUF header")
    magic = bytes(buf[:4])
    if struct.unpack("<I", magic)[0] != gguf.GGUF_MAGIC:
        raise Malformed(f"bad magic {magic!r}, expected b'GGUF' (not a GGUF file)")
    s.pos = 4
    version = s.read("I", "version")
    if version & 0xFFFF == 0 and version:  # written on a machine of the other byte order
        s.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in READER_SUPPORTED_VERSIONS:
        readable = ", ".join(map(str, READER_SUPPORTED_VERSIONS))
        raise Malformed(f"unsupported GGUF version {version} (readable: {readable})")
    n_tensors = s.read("q", "tensor count")
    n_kv = s.read("q", "key/value count")
    if n_tensors < 0 or n_kv < 0:
        raise Malformed(f"negative counts in the header: {n_tensors} tensors, {n_kv} keys")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > s.size - s.pos:
        raise Malformed(f"header claims {n_kv} keys and {n_tensors} tensors, more than a file of {s.size} bytes "
                         "can hold (truncated?)")

    fields: dict[str, Field] = {}
    for i in range(n_kv):
        key = s.name(f"key {i}")
        if not key:
            raise Malformed(f"key {i} is empty")
        if key in fields:
            raise Malformed(f"duplicate key {key!r}")
        fields[key] = s.skip_value(key, s.value_type(key))

    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    align_field = fields.get(gguf.Keys.General.ALIGNMENT)
    if align_field is not None:
        if align_field.type != VT.UINT32:
            raise Malformed(f"{gguf.Keys.General.ALIGNMENT} must be a UINT32, not {align_field.type.name}")
        (alignment,) = struct.unpack_from(s.order + "I", buf, align_field.offset)
        if alignment == 0 or alignment & (alignment - 1):
            raise Malformed(f"{gguf.Keys.General.ALIGNMENT} {alignment} is not a power of two")

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
            raise Malformed(f"tensor {name!r} has data offset {offset}, expected {expected} ({why})")
        end = data_offset + offset + n_bytes
        if end > s.size:
            raise Malformed(f"tensor {name!r} data ends at byte {end}, past the end of the file "
                             f"({s.size} bytes; truncated?)")
        tensors.append(TensorInfo(name, shape, qtype, data_offset + offset, n_bytes))
        expected = offset + n_bytes + (-n_bytes) % alignment
    return Layout(s.order, version, fields, tensors, alignment, data_offset)
