"""A merge planned tensor by tensor, before anything is written: for each output tensor, the
models it is made from (under their own names), its method, and its parameters resolved.

A *reference* model fixes the names and shapes of what is not renumbered (GGUF: the metadata
source, by default the base model; HF: the model whose layout the output keeps).  Every other
model must have each of the tensors it contributes, with the same shape; the one exception is
the vocabulary dimension of the embedding and output tensors with ``embed_common``: then the
rows every model has are merged and the reference's remaining rows are kept.

As in mergekit (``MergePlanner``): with whole models, layer ``k`` of ``n`` sits at ``t = k/(n-1)``
for gradients; with ``slices``, each output slice counts its own layers, its sources' layers
``first + k`` make output layer ``k`` after the layers of the slices before it (renumbered), the
tensors before the layers (the embedding) come from the first slice's sources at ``t = 0`` and
those after them (final norm, head) from the last slice's at ``t = 1``.  Parameters are looked
up in the source (model), the slice, the module and the top level, in that order; filters
match the tensor's Hugging Face name (for GGUF: gguf-py's name for it, ``naming.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from ggraft.errors import InputError
from .config import MergeConfig
from .forms import ModuleSpec, SliceSpec, Source
from .methods import MergeMethod, Settings
from .naming import Naming
from .parameters import NoLayer, is_conditional, lookup

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Tensor:
    """One model's tensor: the model's reference and the tensor's name in it."""

    model: str
    name: str


@dataclass(frozen=True)
class Part:
    """A merged model's part in one output tensor, its per-model parameters resolved."""

    tensor: Tensor
    weight: float = 1.0
    density: float = 1.0


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor.  ``shared_rows``: with --embed-common, how many leading rows all models
    share (None: all rows are merged)."""

    name: str
    shape: tuple[int, ...]
    shared_rows: int | None = None
    method: MergeMethod | None = None
    settings: Settings | None = None
    base: Tensor | None = None
    models: tuple[Part, ...] = ()
    reference: Tensor | None = None


@dataclass(frozen=True)
class Layers:
    """What the output's layers are made of: output layer -> (model, its layer)."""

    origin: tuple[tuple[str, int], ...]


def plan_tensors(reference: str, tensors: dict[str, Shapes], vocab_tensors: Sequence[str],
                 embed_common: bool) -> list[TensorPlan]:
    """Names and shapes of whole models lined up: ``tensors`` is model -> {tensor -> shape},
    the reference's among them.  Every mismatch is an InputError naming the tensor and the model."""
    ref = tensors[reference]
    no_extra_tensors(tensors, reference)
    return [TensorPlan(name, tuple(shape), shared_rows(name, {label: s.get(name) for label, s in tensors.items()},
                                                        reference, vocab_tensors, embed_common))
            for name, shape in ref.items()]


def no_extra_tensors(tensors: dict[str, Shapes], reference: str) -> None:
    for label, shapes in tensors.items():
        extra = next((n for n in shapes if n not in tensors[reference]), None)
        if extra is not None:
            raise InputError(f"{label}: has tensor {extra!r}, which {reference} lacks",
                             hint="the models must have the same architecture and tensor set")


def shared_rows(name: str, shapes: dict[str, tuple[int, ...] | None], reference: str, vocab_tensors: Sequence[str],
                embed_common: bool) -> int | None:
    """Check one tensor across models (``shapes``: model -> its shape, None if it lacks it)."""
    shape, shared = shapes[reference], None
    for label, other in shapes.items():
        if other is None:
            raise InputError(f"{label}: has no tensor {name!r} (which {reference} has)",
                             hint="the models must have the same architecture and tensor set")
        if other == shape:
            continue
        vocab = name in vocab_tensors and len(other) == len(shape) and other[1:] == shape[1:]
        if vocab and embed_common:
            shared = min(shape[0] if shared is None else shared, other[0])
            continue
        raise InputError(f"tensor {name!r} is {list(other)} in {label} but {list(shape)} in {reference}",
                         hint="the vocabularies differ: pass --embed-common to merge the rows they share"
                         if vocab else "the models must have the same architecture and sizes")
    return shared


class Planner:
    """Plans one module of a merge from the models' tensor tables (``tables``: model -> its
    tensors of this module, canonical name -> shape, in the model's order)."""

    def __init__(self, config: MergeConfig, module: ModuleSpec, tables: dict[str, Shapes], reference: str,
                 naming: Naming | None, vocab_tensors: Sequence[str] = (), embed_common: bool = False):
        self.config, self.module, self.tables, self.reference = config, module, tables, reference
        self.naming, self.vocab, self.embed_common = naming, vocab_tensors, embed_common

    def whole(self, copy_only_in_reference: bool = False) -> list[TensorPlan]:
        """Whole models: the reference's tensors in its order (``copy_only_in_reference``: a tensor
        no other model has is copied from the reference, as a metadata source's)."""
        piece = self.module.slices[0]
        members = [s.ref for s in _members(piece)]
        labels = list(dict.fromkeys(members + [self.reference]))
        no_extra_tensors({m: self.tables[m] for m in labels}, self.reference)
        n_layers = len({self.naming.layer(n)[0] for n in self.tables[self.reference]
                        if self.naming and self.naming.layer(n)})
        plans = []
        for name, shape in self.tables[self.reference].items():
            if copy_only_in_reference and not any(name in self.tables[m] for m in members if m != self.reference):
                plans.append(copy_plan(self.reference, name, shape))
                continue
            rows = shared_rows(name, {m: self.tables[m].get(name) for m in labels}, self.reference, self.vocab,
                               self.embed_common)
            plans.append(self.resolve(piece, name, {m: name for m in members}, self._t(name, n_layers), shape, rows))
        return plans

    def sliced(self) -> tuple[list[TensorPlan], Layers]:
        """Output slices: the first slice's tensors before the layers, every slice's layers
        renumbered, the last slice's tensors after them."""
        slices = self.module.slices
        outside = [n for n in self.tables[self.reference] if not self.naming.layer(n)]
        before = [n for n in outside if self.naming.is_embedding(n)]
        after = [n for n in outside if n not in before]
        plans = [self._outside(slices[0], n, 0.0) for n in before]
        origin: list[tuple[str, int]] = []
        for k, piece in enumerate(slices):
            n = piece.n_layers
            for offset in range(n):
                plans += self._layer(piece, len(origin), offset, offset / (n - 1) if n > 1 else 1.0, f"slices[{k}]")
                first = _members(piece)[0]
                origin.append((first.ref, first.layers[0] + offset))
        plans += [self._outside(slices[-1], n, 1.0) for n in after]
        return plans, Layers(tuple(origin))

    def _outside(self, piece: SliceSpec, name: str, t: float) -> TensorPlan:
        members = [s.ref for s in _members(piece)]
        labels = list(dict.fromkeys([self.reference] + members))
        rows = shared_rows(name, {m: self.tables[m].get(name) for m in labels}, self.reference, self.vocab,
                           self.embed_common)
        return self.resolve(piece, name, {m: name for m in members}, t, self.tables[self.reference][name], rows,
                            reference=Tensor(self.reference, name))

    def _layer(self, piece: SliceSpec, index: int, offset: int, t: float, where: str) -> list[TensorPlan]:
        members = _members(piece)
        layers = {s.ref: self._layer_tensors(s, s.layers[0] + offset, where) for s in members}
        first = members[0].ref
        for s in members[1:]:
            odd = sorted(set(layers[first]) ^ set(layers[s.ref]))
            if odd:
                holder, lacking = (members[0], s) if odd[0] in layers[first] else (s, members[0])
                raise InputError(f"{where}: {holder.ref} has {layers[holder.ref][odd[0]][0]!r} in its layer "
                                 f"{holder.layers[0] + offset}, which layer {lacking.layers[0] + offset} of "
                                 f"{lacking.ref} lacks", hint="the models of a slice must have the same architecture")
        plans = []
        for rest, (name, shape) in layers[first].items():
            shapes = {s.ref: layers[s.ref][rest][1] for s in members}
            if any(other != shape for other in shapes.values()):
                bad = next(m for m, other in shapes.items() if other != shape)
                raise InputError(f"tensor {layers[bad][rest][0]!r} is {list(shapes[bad])} in {bad} but {list(shape)} "
                                 f"in {first}", hint="the models must have the same architecture and sizes")
            inputs = {s.ref: layers[s.ref][rest][0] for s in members}
            plans.append(self.resolve(piece, self.naming.layer_name(index, rest), inputs, t, shape, None,
                                      reference=Tensor(first, name)))
        return plans

    def _layer_tensors(self, source: Source, layer: int, where: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        found = {}
        for name, shape in self.tables[source.ref].items():
            place = self.naming.layer(name)
            if place and place[0] == layer:
                found[place[1]] = (name, shape)
        if not found:
            count = len({p[0] for p in map(self.naming.layer, self.tables[source.ref]) if p})
            raise InputError(f"{where}: {source.ref} has no layer {layer} (layer_range {list(source.layers)}; "
                             f"it has {count} layers)")
        return found

    def _t(self, name: str, n_layers: int) -> float | None:
        if self.naming is None:
            return None
        place = self.naming.layer(name)
        if place:
            return place[0] / (n_layers - 1) if n_layers > 1 else 1.0
        return 0.0 if self.naming.is_embedding(name) else 1.0

    def resolve(self, piece: SliceSpec, out: str, inputs: dict[str, str], t: float | None,
                shape: tuple[int, ...], rows: int | None, reference: Tensor | None = None) -> TensorPlan:
        """The plan of one output tensor, its parameters looked up as mergekit does."""
        method = self.module.method
        shared_levels = [piece.parameters, self.module.parameters, self.config.parameters]
        values = {p.name: self._value(p, shared_levels, out, t, None) for p in method.parameters}
        parts = []
        for s in piece.sources:
            params = {p.name: self._value(p, [s.parameters, *shared_levels], inputs[s.ref], t, s.ref)
                      for p in method.tensor_parameters}
            parts.append(Part(Tensor(s.ref, inputs[s.ref]), params.get("weight", 1.0), params.get("density", 1.0)))
        base = Tensor(piece.base.ref, inputs[piece.base.ref]) if piece.base else None
        return TensorPlan(out, tuple(shape), rows, method, Settings(values, self.config.seed), base, tuple(parts),
                          reference or Tensor(self.reference, out))

    def _value(self, parameter, levels: list[Mapping], name: str, t: float | None, model: str | None):
        filtered = self.naming is not None and any(is_conditional(level.get(parameter.name)) for level in levels)
        hf_name = self.naming.hf_name(name) if filtered else name
        try:
            value = lookup(parameter.name, levels, hf_name, t)
        except NoLayer:
            raise InputError(f"{self.config.source or 'config'}: {parameter.name} is a gradient (a list across "
                             f"layers), but {self.module.name} tensor {name!r} has no layer ggraft can number",
                             hint="give the module one number, or a filter that leaves its tensors out") from None
        if value is None:
            value = parameter.default
        if value is None and parameter.required:
            whose = f" of model {model!r}" if model else ""
            raise InputError(f"{self.config.source or 'config'}: no {parameter.name}{whose} for tensor {name!r} "
                             f"(no filter matches it)", hint="end a list of filtered values with one without a filter")
        return value


def _members(piece: SliceSpec) -> list[Source]:
    return ([piece.base] if piece.base else []) + list(piece.sources)


def copy_plan(model: str, name: str, shape: tuple[int, ...]) -> TensorPlan:
    """A tensor taken as it is from one model."""
    from .methods import METHODS

    source = Tensor(model, name)
    return TensorPlan(name, tuple(shape), None, METHODS["passthrough"], METHODS["passthrough"].settings(), None,
                      (Part(source),), source)
