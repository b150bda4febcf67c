"""Merge methods, computed chunk by chunk in float32.

As in mergekit, there are two kinds:

- ``linear``: a weighted average of the models themselves (no base model).
- generalized task arithmetic: each model contributes a *task vector* ``δᵢ = θᵢ − θ_base``;
  task vectors may be sparsified (TIES keeps the largest magnitudes, DARE drops at random),
  their signs may be reconciled (TIES sign election), and the weighted mix is added back to
  the base.  ``task_arithmetic``, ``ties``, ``dare_linear`` and ``dare_ties`` are four
  configurations of this one method.

For one tensor, with weights ``wᵢ``, densities ``dᵢ`` and the global ``lambda`` (λ)::

    δᵢ = sparsify(θᵢ − θ_base, dᵢ)                      (TIES: top-k |δ|; DARE: Bernoulli)
    mᵢ = sign(wᵢδᵢ) == sign(Σⱼ wⱼδⱼ)   (with consensus; else mᵢ = 1)
    θ  = θ_base + λ · Σᵢ mᵢwᵢδᵢ / D    D = Σᵢ mᵢwᵢ if normalize, else 1

Details that a result depends on, fixed here so that a merge is reproducible:

- TIES keeps, per tensor and model, the ``k = int(d·n)`` elements of largest ``|δ|``; ties at
  the threshold are broken by position (the first ones in row-major order are kept).
- DARE keeps an element where ``u < d``, ``u`` being float64 draws from
  ``numpy.random.default_rng([seed, i, crc32(tensor name)])`` (``i``: the model's position
  among the non-base models) taken in row-major order; kept values are divided by ``d``
  when ``rescale`` is on (the paper's ``1/(1 − p)``).
- The sign election counts a zero as a sign of its own, so a zero never votes and never counts
  in ``D`` (as mergekit's ``sign == majority`` mask); the majority of an exact tie is positive.

Inputs are read as "rows" (a tensor flattened to ``(n_rows, row_len)``) a chunk at a time;
chunks do not depend on each other, so they can be computed by several threads, and a merge
needs a few chunks in memory, not whole tensors - except TIES, which needs one float32 copy of
a task vector's magnitudes to find its threshold.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Protocol, Sequence

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


@dataclass(frozen=True)
class Contribution:
    """A non-base model's part in one tensor's merge."""

    rows: TensorRows
    weight: float
    density: float = 1.0


@dataclass(frozen=True)
class Settings:
    """The global parameters (``normalize`` already resolved against the method's default)."""

    normalize: bool
    lam: float = 1.0
    rescale: bool = True
    seed: int = 0


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


#: rows ``first:stop`` of a tensor's merge, computable in any order and from any thread; the
#: array returned may be the thread's scratch, valid until the thread's next chunk
ChunkFunction = Callable[[int, int], np.ndarray]


class MergeMethod:
    """A merge method: its name, its paper, and how it merges one tensor."""

    name: ClassVar[str]
    reference: ClassVar[str]
    needs_base: ClassVar[bool]
    default_normalize: ClassVar[bool]
    #: per-model parameters it uses (``weight`` is always required)
    model_parameters: ClassVar[tuple[str, ...]] = ("weight",)
    #: global parameters it uses
    global_parameters: ClassVar[tuple[str, ...]] = ("normalize",)

    def prepare(self, tensor: str, base: TensorRows | None, models: Sequence[Contribution],
                settings: Settings, chunk_elements: int = CHUNK_ELEMENTS) -> ChunkFunction:
        """Whatever needs the whole tensor first (TIES' thresholds), then the chunk function."""
        raise NotImplementedError

    def merge(self, tensor: str, base: TensorRows | None, models: Sequence[Contribution],
              settings: Settings, chunk_elements: int = CHUNK_ELEMENTS) -> Iterator[np.ndarray]:
        """float32 chunks of merged rows, in order, covering the tensor's rows."""
        rows = base if base is not None else models[0].rows
        chunk = self.prepare(tensor, base, models, settings, chunk_elements)
        for first, stop in spans(rows.n_rows, chunk_rows(rows.row_len, chunk_elements)):
            yield chunk(first, stop).copy()


class Linear(MergeMethod):
    """A weighted average of the models (model soups: Wortsman et al., 2022,
    https://arxiv.org/abs/2203.05482).  ``θ = Σ wᵢθᵢ / Σ wᵢ`` (``/ Σ wᵢ`` only with normalize)."""

    name = "linear"
    reference = "https://arxiv.org/abs/2203.05482"
    needs_base = False
    default_normalize = True

    def prepare(self, tensor, base, models, settings, chunk_elements=CHUNK_ELEMENTS):
        total = sum(m.weight for m in models) if settings.normalize else 1.0
        coefficients = [m.weight / total for m in models]
        sources = [m.rows for m in models]
        return lambda first, stop: linear_combination(sources, coefficients, first, stop)


@dataclass(frozen=True)
class GeneralizedTaskArithmetic(MergeMethod):
    """Task arithmetic with optional sparsification and sign consensus (see module docstring)."""

    name: str
    reference: str
    sparsification: str | None  # None, "magnitude" (TIES) or "random" (DARE)
    consensus: bool
    default_normalize: bool
    needs_base: ClassVar[bool] = True

    @property
    def model_parameters(self) -> tuple[str, ...]:
        return ("weight", "density") if self.sparsification else ("weight",)

    @property
    def global_parameters(self) -> tuple[str, ...]:
        extra = ("rescale",) if self.sparsification == "random" else ()
        return ("normalize", "lambda", *extra)

    def prepare(self, tensor, base, models, settings, chunk_elements=CHUNK_ELEMENTS):
        if base is None:
            raise ValueError(f"{self.name} needs a base model")
        if self.sparsification is None and not self.consensus:
            return self._plain(base, models, settings)
        step = chunk_rows(base.row_len, chunk_elements)
        masks = [self._sparsifier(tensor, i, m, base, settings, step) for i, m in enumerate(models)]
        weights = np.array([m.weight for m in models], np.float32)

        def chunk(first: int, stop: int) -> np.ndarray:
            b = base.read(first, stop).astype(np.float32)
            deltas = np.stack([m.rows.read(first, stop).astype(np.float32) - b for m in models])
            for delta, mask in zip(deltas, masks):
                mask.apply(delta, first * base.row_len)
            weighted = deltas * weights[:, None, None]
            if self.consensus:
                majority = np.where(weighted.sum(0) >= 0, np.float32(1), np.float32(-1))
                agree = np.sign(weighted) == majority
                mixed = np.where(agree, weighted, 0).sum(0)
                divisor = np.where(agree, weights[:, None, None], 0).sum(0)
                divisor[divisor == 0] = 1
            else:
                mixed = weighted.sum(0)
                divisor = weights.sum()
                divisor = divisor if abs(divisor) >= 1e-8 else np.float32(1)
            if settings.normalize:
                mixed /= divisor
            mixed *= np.float32(settings.lam)
            mixed += b
            return mixed

        return chunk

    def _plain(self, base, models, settings):
        """Task arithmetic proper is linear in the inputs: (1 − Σcᵢ)·θ_base + Σ cᵢθᵢ with
        cᵢ = λwᵢ/D, which reads each input once per chunk."""
        total = sum(m.weight for m in models)
        divisor = total if settings.normalize and abs(total) >= 1e-8 else 1.0
        coefficients = [settings.lam * m.weight / divisor for m in models]
        sources = [base, *(m.rows for m in models)]
        all_coefficients = [1.0 - sum(coefficients), *coefficients]
        return lambda first, stop: linear_combination(sources, all_coefficients, first, stop)

    def _sparsifier(self, tensor, index, model, base, settings, step):
        if self.sparsification is None or model.density >= 1.0:
            return KeepAll()
        if self.sparsification == "random":
            return RandomDrop([settings.seed, index, zlib.crc32(tensor.encode())], model.density, settings.rescale)
        return TopMagnitude.of(model, base, step)


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
    def of(cls, model: Contribution, base: TensorRows, step: int) -> "TopMagnitude":
        n = base.n_rows * base.row_len
        keep = int(model.density * n)
        if keep <= 0:
            return cls(np.inf, -1)

        def magnitudes(first: int, stop: int) -> np.ndarray:
            return np.abs(model.rows.read(first, stop).astype(np.float32) - base.read(first, stop)).reshape(-1)

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


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        Linear(),
        # Ilharco et al., 2023, "Editing Models with Task Arithmetic"
        GeneralizedTaskArithmetic("task_arithmetic", "https://arxiv.org/abs/2212.04089", None, False, False),
        # Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging Models"
        GeneralizedTaskArithmetic("ties", "https://arxiv.org/abs/2306.01708", "magnitude", True, True),
        # Yu et al., 2023, "Language Models are Super Mario" (DARE), without and with TIES' sign election
        GeneralizedTaskArithmetic("dare_linear", "https://arxiv.org/abs/2311.03099", "random", False, False),
        GeneralizedTaskArithmetic("dare_ties", "https://arxiv.org/abs/2311.03099", "random", True, False),
    )
}
