"""Streaming safetensors output.

Every tensor's dtype and shape are known before any data is computed, so each shard's header
is written first and the tensors' bytes follow as they are produced (a merged tensor a chunk
of rows at a time, a copied one straight from its source file).  Past ``max_shard_bytes`` the
checkpoint is split into ``model-0000i-of-0000n.safetensors`` shards with the usual
``model.safetensors.index.json``.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from ggraft.errors import InputError

ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
DEFAULT_SHARD_BYTES = 5 * 1024**3
COPY_PIECE = 16 * 1024 * 1024


@dataclass
class OutTensor:
    """A tensor to write: its header entry and a producer of its bytes, in order."""

    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    produce: Callable[[], Iterator[np.ndarray | bytes]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ITEM_SIZES[self.dtype]


def file_bytes(path: Path, start: int, nbytes: int) -> Callable[[], Iterator[bytes]]:
    """A producer that copies ``nbytes`` of ``path`` from ``start`` unchanged."""

    def produce() -> Iterator[bytes]:
        with open(path, "rb") as f:
            f.seek(start)
            left = nbytes
            while left:
                piece = f.read(min(left, COPY_PIECE))
                if not piece:
                    raise InputError(f"{path}: ended while copying (truncated?)")
                left -= len(piece)
                yield piece

    return produce


def shard(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _write_file(f: BinaryIO, tensors: list[OutTensor], metadata: dict[str, str],
                progress: Callable[[int], None]) -> None:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for t in tensors:
        written = 0
        for piece in t.produce():
            if isinstance(piece, np.ndarray):
                piece = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
            data = piece
            f.write(data)
            written += len(data)
            progress(len(data))
        if written != t.nbytes:
            raise InputError(f"tensor {t.name!r}: produced {written} bytes, expected {t.nbytes}")


def write_checkpoint(folder: Path, tensors: list[OutTensor], metadata: dict[str, str],
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     progress: Callable[[int], None] = lambda n: None) -> list[str]:
    """Write ``tensors`` into ``folder``; returns the file names written."""
    shards = shard(tensors, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, part in zip(names, shards):
        with open(folder / name, "wb") as f:
            _write_file(f, part, metadata, progress)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: name for name, part in zip(names, shards) for t in part}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        names.append("model.safetensors.index.json")
    return names
