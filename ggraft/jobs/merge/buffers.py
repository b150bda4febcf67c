"""Reusable chunk buffers.

A merge computes thousands of MB-sized chunks.  glibc gives memory blocks of that size straight
back to the kernel when they are freed, so a fresh numpy array per chunk costs a page fault for
every 4 KiB written into it: measured on three 1 GB GGUF inputs, 0.9 million faults and 2-3 s
of system time, more than all the arithmetic.  Chunks are therefore computed in buffers that
live as long as the merge:

- ``Scratch``: one buffer per thread, for a value used and dropped within one chunk
  (an input's rows converted to float32, a running sum);
- ``BufferPool``: buffers that carry an encoded chunk from the thread that computed it to the
  one that writes it, and come back when it is written.
"""
from __future__ import annotations

import queue
import threading

import numpy as np


class Buffer:
    """Bytes that grow to the largest array asked of them; each ``array`` call reuses them."""

    def __init__(self) -> None:
        self.data = np.empty(0, np.uint8)

    def array(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialized array of ``shape`` over the buffer (invalidating earlier ones)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self.data.nbytes < nbytes:
            self.data = np.empty(nbytes, np.uint8)
        return self.data[:nbytes].view(dtype).reshape(shape)


class Scratch(threading.local):
    """A ``Buffer`` per thread: an array from it is valid until the same thread asks again."""

    def __init__(self) -> None:
        self.buffer = Buffer()

    def array(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        return self.buffer.array(shape, dtype)


class BufferPool:
    """Buffers lent to the threads that encode chunks and given back once a chunk is written;
    as many exist as chunks are ever in flight at once."""

    def __init__(self) -> None:
        self._free: queue.SimpleQueue[Buffer] = queue.SimpleQueue()

    def take(self) -> Buffer:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return Buffer()

    def give(self, buffer: Buffer) -> None:
        self._free.put(buffer)
