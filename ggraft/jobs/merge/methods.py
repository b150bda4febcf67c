"""Merge methods, computed chunk by chunk in float32; each one small class that declares its
parameters, as mergekit's do (``parameters()``: shared by the tensor's inputs;
``tensor_parameters()``: given per input model).

- ``linear``: a weighted average of the models themselves.
- ``slerp``: spherical interpolation between the base model and one other.
- ``passthrough``: one model's tensors as they are (layer stacking with ``slices``).
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
- SLERP (mergekit's ``slerp``) normalizes each whole tensor: with ``a``, ``b`` the base's and the
  other model's tensors, ``cos Ω = ⟨a, b⟩ / (|a|·|b|)`` (a norm ≤ 1e-8 is taken as 1), and
  ``θ = sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b``; where ``|cos Ω| > 0.9995`` the two are
  nearly parallel and ``θ = (1 − t)·a + t·b``.  The sums are taken in float64.

Everything but TIES and SLERP reads each input once; those two read it twice (thresholds and
norms need the whole tensor first), and TIES holds one float32 copy of a task vector's magnitudes.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np

from .parameters import Parameter
from .rows import CHUNK_ELEMENTS, ArrayRows, TensorRows, chunk_rows, linear_combination, spans  # noqa: F401
from .sparsify import KeepAll, RandomDrop, TopMagnitude


@dataclass(frozen=True)
class Contribution:
    """A non-base model's part in one tensor's merge: its rows and its resolved tensor parameters."""

    rows: TensorRows
    weight: float = 1.0
    density: float = 1.0


@dataclass(frozen=True)
class Settings:
    """One tensor's shared parameters, resolved (declared name -> value), and the merge's seed."""

    values: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


#: rows ``first:stop`` of a tensor's merge, computable in any order and from any thread; the
#: array returned may be the thread's scratch, valid until the thread's next chunk
ChunkFunction = Callable[[int, int], np.ndarray]


class MergeMethod:
    """A merge method: its name, its paper, what it declares, and how it merges one tensor."""

    name: ClassVar[str]
    reference: ClassVar[str]
    needs_base: ClassVar[bool] = False
    #: parameters shared by the inputs of a tensor (mergekit's ``parameters()``)
    parameters: tuple[Parameter, ...] = ()
    #: parameters given per input model (mergekit's ``tensor_parameters()``)
    tensor_parameters: tuple[Parameter, ...] = ()
    #: how many models it merges besides the base: (fewest, most or None)
    model_count: ClassVar[tuple[int, int | None]] = (1, None)
    uses_seed: ClassVar[bool] = False
    #: what the base model is to the method (for messages)
    base_role: ClassVar[str] = "the model the task vectors are taken from"

    def settings(self, values: Mapping[str, Any] | None = None, seed: int = 0) -> Settings:
        """Settings with the declared defaults for what ``values`` leaves out."""
        given = dict(values or {})
        return Settings({p.name: given.get(p.name, p.default) for p in self.parameters}, seed)

    def prepare(self, tensor: str, base: TensorRows | None, models: Sequence[Contribution],
                settings: Settings, chunk_elements: int = CHUNK_ELEMENTS) -> ChunkFunction:
        """Whatever needs the whole tensor first (TIES' thresholds, SLERP's angle), then the
        chunk function."""
        raise NotImplementedError

    def merge(self, tensor: str, base: TensorRows | None, models: Sequence[Contribution],
              settings: Settings, chunk_elements: int = CHUNK_ELEMENTS) -> Iterator[np.ndarray]:
        """float32 chunks of merged rows, in order, covering the tensor's rows."""
        rows = base if base is not None else models[0].rows
        chunk = self.prepare(tensor, base, models, settings, chunk_elements)
        for first, stop in spans(rows.n_rows, chunk_rows(rows.row_len, chunk_elements)):
            yield chunk(first, stop).copy()


def _combination(sources: Sequence[TensorRows], coefficients: Sequence[float]) -> ChunkFunction:
    return lambda first, stop: linear_combination(sources, coefficients, first, stop)


WEIGHT = Parameter("weight", required=True)
DENSITY = Parameter("density", "fraction", default=1.0)


class Linear(MergeMethod):
    """A weighted average of the models (model soups: Wortsman et al., 2022,
    https://arxiv.org/abs/2203.05482).  ``θ = Σ wᵢθᵢ / Σ wᵢ`` (``/ Σ wᵢ`` only with normalize)."""

    name = "linear"
    reference = "https://arxiv.org/abs/2203.05482"
    parameters = (Parameter("normalize", "flag", default=True),)
    tensor_parameters = (WEIGHT,)

    def prepare(self, tensor, base, models, settings, chunk_elements=CHUNK_ELEMENTS):
        total = sum(m.weight for m in models) if settings["normalize"] else 1.0
        return _combination([m.rows for m in models], [m.weight / total for m in models])


class Slerp(MergeMethod):
    """Spherical linear interpolation from the base model (``t = 0``) to one other (``t = 1``),
    over whole tensors (mergekit's ``slerp``; see the module docstring)."""

    name = "slerp"
    reference = "https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/slerp.py"
    needs_base = True
    parameters = (Parameter("t", required=True),)
    model_count = (0, 1)
    base_role = "the end at t = 0"
    DOT_THRESHOLD, EPS = 0.9995, 1e-8

    def prepare(self, tensor, base, models, settings, chunk_elements=CHUNK_ELEMENTS):
        if not models:
            return _combination([base], [1.0])
        other, t = models[0].rows, settings["t"]
        squares_a = squares_b = dot = 0.0
        for first, stop in spans(base.n_rows, chunk_rows(base.row_len, chunk_elements)):
            a = base.read(first, stop).astype(np.float64)  # a copy: ``other`` may share the scratch
            b = other.read(first, stop).astype(np.float64)
            squares_a, squares_b = squares_a + np.dot(a.ravel(), a.ravel()), squares_b + np.dot(b.ravel(), b.ravel())
            dot += np.dot(a.ravel(), b.ravel())
        norm_a, norm_b = math.sqrt(squares_a), math.sqrt(squares_b)
        cos = dot / (norm_a if norm_a > self.EPS else 1.0) / (norm_b if norm_b > self.EPS else 1.0)
        if abs(cos) > self.DOT_THRESHOLD:
            return _combination([base, other], [1.0 - t, t])
        omega = math.acos(cos)
        s0, s1 = math.sin((1.0 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
        return _combination([base, other], [s0, s1])


class Passthrough(MergeMethod):
    """One model's tensors as they are, times ``scale`` when given (mergekit's ``passthrough``);
    with ``slices``, how layer ranges are stacked into a deeper model."""

    name = "passthrough"
    reference = "https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/passthrough.py"
    parameters = (Parameter("scale", default=None),)
    model_count = (1, 1)

    def prepare(self, tensor, base, models, settings, chunk_elements=CHUNK_ELEMENTS):
        scale = settings["scale"]
        return _combination([models[0].rows], [1.0 if scale is None else scale])


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
    def parameters(self) -> tuple[Parameter, ...]:
        extra = (Parameter("rescale", "flag", default=True),) if self.sparsification == "random" else ()
        return (Parameter("normalize", "flag", default=self.default_normalize), Parameter("lambda", default=1.0),
                *extra)

    @property
    def tensor_parameters(self) -> tuple[Parameter, ...]:
        return (WEIGHT, DENSITY) if self.sparsification else (WEIGHT,)

    @property
    def uses_seed(self) -> bool:
        return self.sparsification == "random"

    def prepare(self, tensor, base, models, settings, chunk_elements=CHUNK_ELEMENTS):
        if base is None:
            raise ValueError(f"{self.name} needs a base model")
        if self.sparsification is None and not self.consensus:
            return self._plain(base, models, settings)
        step = chunk_rows(base.row_len, chunk_elements)
        masks = [self._sparsifier(tensor, i, m, base, settings, step) for i, m in enumerate(models)]
        weights = np.array([m.weight for m in models], np.float32)
        consensus, normalize, lam = self.consensus, settings["normalize"], np.float32(settings["lambda"])

        def chunk(first: int, stop: int) -> np.ndarray:
            b = base.read(first, stop).astype(np.float32)
            deltas = np.stack([m.rows.read(first, stop).astype(np.float32) - b for m in models])
            for delta, mask in zip(deltas, masks):
                mask.apply(delta, first * base.row_len)
            weighted = deltas * weights[:, None, None]
            if consensus:
                majority = np.where(weighted.sum(0) >= 0, np.float32(1), np.float32(-1))
                agree = np.sign(weighted) == majority
                mixed = np.where(agree, weighted, 0).sum(0)
                divisor = np.where(agree, weights[:, None, None], 0).sum(0)
                divisor[divisor == 0] = 1
            else:
                mixed = weighted.sum(0)
                divisor = weights.sum()
                divisor = divisor if abs(divisor) >= 1e-8 else np.float32(1)
            if normalize:
                mixed /= divisor
            mixed *= lam
            mixed += b
            return mixed

        return chunk

    def _plain(self, base, models, settings):
        """Task arithmetic proper is linear in the inputs: (1 − Σcᵢ)·θ_base + Σ cᵢθᵢ with
        cᵢ = λwᵢ/D, which reads each input once per chunk."""
        total = sum(m.weight for m in models)
        divisor = total if settings["normalize"] and abs(total) >= 1e-8 else 1.0
        coefficients = [settings["lambda"] * m.weight / divisor for m in models]
        return _combination([base, *(m.rows for m in models)], [1.0 - sum(coefficients), *coefficients])

    def _sparsifier(self, tensor, index, model, base, settings, step):
        if self.sparsification is None or model.density >= 1.0:
            return KeepAll()
        if self.sparsification == "random":
            return RandomDrop([settings.seed, index, zlib.crc32(tensor.encode())], model.density, settings["rescale"])
        return TopMagnitude.of(model.rows, model.density, base, step)


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
        Slerp(),
        Passthrough(),
    )
}


def known_parameters() -> tuple[dict[str, Parameter], dict[str, Parameter]]:
    """Every parameter some method declares: (shared ones, per-model ones), by name."""
    shared: dict[str, Parameter] = {}
    per_model: dict[str, Parameter] = {}
    for method in METHODS.values():
        for p in method.parameters:
            shared.setdefault(p.name, p)
        for p in method.tensor_parameters:
            per_model.setdefault(p.name, p)
    return shared, per_model
