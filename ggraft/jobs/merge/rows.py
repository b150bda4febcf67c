"""Tensors as rows, read a chunk at a time, and the one arithmetic every method ends in.

Inputs are read as "rows" (a tensor flattened to ``(n_rows, row_len)``) a chunk at a time;
chunks do not depend on each other, so they can be computed by several threads, and a merge
needs a few chunks in memory, not whole tensors.
"""
from __future__ import annotations

from typing import Iterator, Protocol, Sequence

import numpy as np

from .buffers import Scratch

CHUNK_ELEMENTS = 1 << 19  # 2 MB of float32 per chunk and model (fastest measured: benchmarks/bench_merge.py)


class TensorRows(Protocol):
    """One model's copy of one tensor, as ``n_rows`` rows of ``row_len`` values."""

    n_rows: int
    row_len: int

    def read(self, first: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``first:stop`` as float32 values: written into ``out`` (C-contiguous, of shape
        ``(stop - first, row_len)``) and returned when given; else an array to treat as
        read-only, valid until the same thread reads this model again."""

    def release(self, first: int, stop: int) -> None:
        """Rows ``first:stop`` will not be read again (their memory may be handed back)."""


class ArrayRows:
    """``TensorRows`` over an in-memory array (tests, and small tensors)."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array)
        self.n_rows = self.array.shape[0] if self.array.ndim > 1 else 1
        self.row_len = self.array.size // self.n_rows if self.n_rows else 0
        self._rows = self.array.reshape(self.n_rows, self.row_len)

    def read(self, first: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            return self._rows[first:stop]
        out[...] = self._rows[first:stop]
        return out

    def release(self, first: int, stop: int) -> None:
        pass


def chunk_rows(row_len: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // max(row_len, 1))


def spans(n_rows: int, step: int) -> Iterator[tuple[int, int]]:
    for first in range(0, n_rows, step):
        yield first, min(first + step, n_rows)


_SUM, _TERM = Scratch(), Scratch()


def linear_combination(sources: Sequence[TensorRows], coefficients: Sequence[float], first: int,
                       stop: int) -> np.ndarray:
    """``Σ cᵢ·xᵢ`` over rows ``first:stop`` in float32, skipping zero coefficients (in this
    thread's scratch: valid until its next call).  Each term is read into a buffer it owns and
    scaled there, so a chunk makes two float32 arrays, not three (a third less memory traffic)."""
    terms = [(s, np.float32(c)) for s, c in zip(sources, coefficients) if c != 0.0]
    shape = (stop - first, sources[0].row_len)
    acc = _SUM.array(shape, np.float32)
    if not terms:
        acc[...] = 0
        return acc
    np.multiply(terms[0][0].read(first, stop), terms[0][1], out=acc)
    term = _TERM.array(shape, np.float32)
    for source, c in terms[1:]:
        source.read(first, stop, out=term)
        term *= c
        acc += term
    return acc
