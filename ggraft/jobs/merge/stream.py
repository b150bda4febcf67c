"""The stream of merged rows for one output tensor, computed by worker threads and handed to a
writer: what both input kinds (GGUF, Hugging Face) share once a merge is planned (``plan.py``).

With ``--embed-common`` a vocabulary tensor is merged over the rows every model has
(``plan.shared_rows``) and the reference's remaining rows are kept as they are.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import gguf
import numpy as np

from ggraft.gguf_io import numeric
from .buffers import Buffer, BufferPool, Scratch
from .methods import ChunkFunction, Contribution, MergeMethod, Settings
from .rows import CHUNK_ELEMENTS, TensorRows, chunk_rows, spans


class Workers:
    """Threads that compute chunks (numpy releases the GIL in its loops); one thread: no pool."""

    def __init__(self, threads: int | None = None):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.threads = max(1, threads or cores or 1)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ggraft-merge") if self.threads > 1 else None
        self.buffers = BufferPool()  # shared by every tensor of the merge

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class Head:
    """The first ``n_rows`` rows of a ``TensorRows`` (the shared vocabulary)."""

    def __init__(self, rows: TensorRows, n_rows: int):
        self.rows, self.n_rows, self.row_len = rows, n_rows, rows.row_len

    def read(self, first: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        return self.rows.read(first, stop, out)

    def release(self, first: int, stop: int) -> None:
        self.rows.release(first, min(stop, self.n_rows))


#: encodes float32 rows into the output type; ``out(shape, dtype)`` gives a reusable array to
#: encode into
Encoder = Callable[[np.ndarray, Callable[..., np.ndarray]], np.ndarray]


def encoder(qtype: gguf.GGMLQuantizationType) -> Encoder:
    """Encoding into ``qtype`` (float32: a copy out of the computing thread's scratch)."""

    def encode(rows: np.ndarray, out: Callable[..., np.ndarray]) -> np.ndarray:
        return numeric.quantize(rows, qtype, out(*numeric.encoded_layout(rows.shape, qtype)))

    return encode


@dataclass(frozen=True)
class TensorMerge:
    """One output tensor's merge as chunks: ``(compute, first, stop)`` computes rows
    ``first:stop`` (in any order, on any thread), reading ``sources``."""

    chunks: list[tuple[ChunkFunction, int, int]]
    sources: list[TensorRows]

    def release(self, first: int, stop: int) -> None:
        """Rows ``first:stop`` are merged: the inputs' memory for them may be handed back."""
        for source in self.sources:
            source.release(first, stop)


def tensor_merge(method: MergeMethod, plan, reference: TensorRows, base: TensorRows | None,
                 models: Sequence[Contribution], settings: Settings,
                 chunk_elements: int = CHUNK_ELEMENTS) -> TensorMerge:
    """The chunks of ``plan``'s tensor (its ``name`` and ``shared_rows``; for TIES and SLERP, after
    the whole-tensor pass)."""
    shared = reference.n_rows if plan.shared_rows is None else plan.shared_rows
    if plan.shared_rows is not None:  # every model read over the shared rows only
        base = Head(base, shared) if base is not None else None
        models = [Contribution(Head(m.rows, shared), m.weight, m.density) for m in models]
    merge_chunk = method.prepare(plan.name, base, models, settings, chunk_elements)

    def kept(first: int, stop: int) -> np.ndarray:  # rows only the reference has
        return np.asarray(reference.read(first, stop), np.float32)

    step = chunk_rows(reference.row_len, chunk_elements)
    chunks = [(merge_chunk, first, stop) for first, stop in spans(shared, step)]
    chunks += [(kept, first, min(first + step, reference.n_rows)) for first in range(shared, reference.n_rows, step)]
    return TensorMerge(chunks, [reference, *([base] if base is not None else []), *(m.rows for m in models)])


def merged_rows(merge: TensorMerge, encode: Encoder = encoder(gguf.GGMLQuantizationType.F32),
                workers: Workers | None = None) -> Iterator[np.ndarray]:
    """The ``encode``d chunks, in order, for a writer that takes them one after another;
    computed by ``workers``' threads when given, a few chunks ahead of the writer.  A chunk is
    valid until the next one is asked for (its buffer is then reused)."""
    pool = workers.buffers if workers is not None else BufferPool()

    def encoded(compute: ChunkFunction, first: int, stop: int) -> tuple[np.ndarray, Buffer]:
        buffer = pool.take()
        return encode(compute(first, stop), buffer.array), buffer

    def hand_out(chunk: np.ndarray, buffer: Buffer, first: int, stop: int) -> Iterator[np.ndarray]:
        yield chunk
        pool.give(buffer)  # the writer is done with it
        merge.release(first, stop)

    if workers is None or workers.pool is None:
        for compute, first, stop in merge.chunks:
            yield from hand_out(*encoded(compute, first, stop), first, stop)
        return
    pending: deque[tuple[Future, int, int]] = deque()
    for compute, first, stop in merge.chunks:
        pending.append((workers.pool.submit(encoded, compute, first, stop), first, stop))
        if len(pending) >= 2 * workers.threads:
            future, done_first, done_stop = pending.popleft()
            yield from hand_out(*future.result(), done_first, done_stop)
    while pending:
        future, done_first, done_stop = pending.popleft()
        yield from hand_out(*future.result(), done_first, done_stop)


def write_merged(merge: TensorMerge, encode: Encoder, write_at: Callable[[int, np.ndarray], None],
                 workers: Workers | None = None) -> Iterator[int]:
    """Every chunk computed, encoded and written by one thread, ``write_at(first_row, encoded)``,
    so that writing runs in parallel too (the writer must take chunks in any order); yields each
    chunk's byte count once it is written, in order."""
    scratch = Scratch()

    def run(compute: ChunkFunction, first: int, stop: int) -> int:
        encoded = encode(compute(first, stop), scratch.array)
        merge.release(first, stop)
        write_at(first, encoded)
        return encoded.nbytes

    if workers is None or workers.pool is None:
        for compute, first, stop in merge.chunks:
            yield run(compute, first, stop)
        return
    futures = [workers.pool.submit(run, compute, first, stop) for compute, first, stop in merge.chunks]
    for future in futures:
        yield future.result()
