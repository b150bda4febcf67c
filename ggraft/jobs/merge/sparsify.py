"""How task vectors are sparsified before they are mixed (TIES: by magnitude; DARE: at random).

Each sparsifier ``apply(delta, offset)``s itself to one chunk of a task vector in place,
``offset`` being the chunk's first element in the flattened tensor, so that the result does
not depend on the chunking.
"""
from __future__ import annotations

import numpy as np

from .rows import TensorRows, spans


class KeepAll:
    def apply(self, delta: np.ndarray, offset: int) -> None:
        pass


class RandomDrop:
    """DARE: drop each element with probability ``1 − density``, rescale the rest by ``1/density``
    (Yu et al., 2023, "Language Models are Super Mario", https://arxiv.org/abs/2311.03099).
    Element k uses the k-th draw of its stream (PCG64 can jump ahead), whatever the chunking."""

    def __init__(self, entropy: list[int], density: float, rescale: bool):
        self.entropy, self.density, self.rescale = entropy, density, rescale

    def apply(self, delta: np.ndarray, offset: int) -> None:
        stream = np.random.PCG64(self.entropy)  # what numpy.random.default_rng(entropy) draws from
        stream.advance(offset)
        keep = np.random.Generator(stream).random(delta.size).reshape(delta.shape) < self.density
        delta *= keep
        if self.rescale:
            delta /= np.float32(self.density)


class TopMagnitude:
    """TIES trim: keep the ``int(density·n)`` largest ``|δ|`` of the tensor, ties at the threshold
    broken by position (Yadav et al., 2023, "TIES-Merging", https://arxiv.org/abs/2306.01708).
    Kept: ``|δ| > threshold``, and ``|δ| == threshold`` up to flat index ``last_tie``."""

    def __init__(self, threshold: float, last_tie: float):
        self.threshold, self.last_tie = threshold, last_tie

    @classmethod
    def of(cls, rows: TensorRows, density: float, base: TensorRows, step: int) -> "TopMagnitude":
        n = base.n_rows * base.row_len
        keep = int(density * n)
        if keep <= 0:
            return cls(np.inf, -1)

        def magnitudes(first: int, stop: int) -> np.ndarray:
            return np.abs(rows.read(first, stop).astype(np.float32) - base.read(first, stop)).reshape(-1)

        everything = np.empty(n, np.float32)  # the one whole-tensor buffer of a TIES merge
        for first, stop in spans(base.n_rows, step):
            everything[first * base.row_len : stop * base.row_len] = magnitudes(first, stop)
        everything.partition(n - keep)
        threshold = everything[n - keep]
        ties_kept = keep - int(np.count_nonzero(everything > threshold))
        if ties_kept == int(np.count_nonzero(everything == threshold)):
            return cls(threshold, np.inf)
        del everything
        seen = 0  # find the position of the last tie kept
        for first, stop in spans(base.n_rows, step):
            ties = np.flatnonzero(magnitudes(first, stop) == threshold)
            if seen + len(ties) >= ties_kept:
                return cls(threshold, first * base.row_len + int(ties[ties_kept - seen - 1]))
            seen += len(ties)
        raise AssertionError("TIES threshold: ties vanished on the second pass")

    def apply(self, delta: np.ndarray, offset: int) -> None:
        magnitude = np.abs(delta).reshape(-1)
        keep = magnitude > self.threshold
        ties = np.flatnonzero(magnitude == self.threshold)
        keep[ties[offset + ties <= self.last_tie]] = True
        delta *= keep.reshape(delta.shape)
