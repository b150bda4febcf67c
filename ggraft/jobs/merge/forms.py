"""The three forms a mergekit config merges in, read into one shape (as mergekit's
``normalize_config`` does): modules, each a list of output slices, each a list of sources.

- ``models``: whole models, one slice whose sources span every layer (``layers`` None);
- ``slices``: output slices of the text decoder, each from sources with a ``layer_range``;
- ``modules``: ``text_decoder`` / ``vision_tower`` / ``multi_modal_projector``, each with its
  own ``models`` or ``slices`` and ``parameters`` (and, as ggraft's keys, ``merge_method`` and
  ``base_model``).

Values of parameters are validated against the declarations of the methods (``methods.py``);
a parameter no method declares is refused, one the chosen method does not declare is a warning.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ggraft.errors import InputError
from .methods import METHODS, MergeMethod, known_parameters
from .parameters import Parameter, Setting, SettingReader, describe, is_scalar

TEXT, VISION, PROJECTOR = "text_decoder", "vision_tower", "multi_modal_projector"
MODULES = (TEXT, VISION, PROJECTOR)
#: accepted everywhere, with no effect (mergekit's memory saver)
NO_EFFECT = {"int8_mask": Parameter("int8_mask", "flag", default=False)}


@dataclass(frozen=True)
class Source:
    """One input of an output slice: a model, its layers (None: all) and its own parameters."""

    ref: str
    layers: tuple[int, int] | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSpec:
    sources: tuple[Source, ...]  # the models merged (without the base)
    base: Source | None
    parameters: Mapping[str, Setting] = field(default_factory=dict)

    @property
    def n_layers(self) -> int | None:
        first = (self.base or self.sources[0]).layers
        return None if first is None else first[1] - first[0]


@dataclass(frozen=True)
class ModuleSpec:
    name: str
    method: MergeMethod
    slices: tuple[SliceSpec, ...]
    parameters: Mapping[str, Setting] = field(default_factory=dict)

    @property
    def whole_models(self) -> bool:
        return self.slices[0].n_layers is None

    @property
    def refs(self) -> list[str]:
        out: list[str] = []
        for s in self.slices:
            for src in ([s.base] if s.base else []) + list(s.sources):
                if src.ref not in out:
                    out.append(src.ref)
        return out


class FormReader:
    """Reads the parts of a config; ``where`` prefixes every message."""

    def __init__(self, where: str):
        self.where = where
        self.warnings: list[str] = []
        self.settings = SettingReader(self.fail)
        self.shared, self.per_model = known_parameters()

    def fail(self, message: str, hint: str | None = None) -> InputError:
        return InputError(f"{self.where}: {message}", hint)

    def mapping(self, value: Any, what: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"{what} must be a mapping of names to values")
        return value

    def ref(self, value: Any, what: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{what} must be a path (a string)")
        return value.strip()

    def method(self, value: Any, what: str) -> MergeMethod:
        if value is None:
            raise self.fail(f"'{what}' is missing; choose one of {', '.join(METHODS)}")
        if not isinstance(value, str) or value not in METHODS:
            raise self.fail(f"{what} {value!r} is not supported; choose one of {', '.join(METHODS)}")
        return METHODS[value]

    def parameters(self, value: Any, what: str, per_model: bool) -> dict[str, Setting]:
        """A ``parameters`` mapping, each value checked as the parameter's kind; per-model levels
        (a model or a slice source) take only per-model parameters."""
        known = self.per_model if per_model else {**self.shared, **self.per_model, **NO_EFFECT}
        out = {}
        for key, raw in self.mapping(value, what).items():
            if key not in known:
                raise self.fail(f"{what}: unknown parameter {key!r}; known: {', '.join(known)}")
            out[key] = self.settings.read(raw, known[key], f"{what}.{key}")
        return out

    def warn_unused(self, params: Mapping[str, Setting], what: str, methods: list[MergeMethod]) -> None:
        for key in params:
            used = any(key in {p.name for p in (*m.parameters, *m.tensor_parameters)} for m in methods)
            if not used and key not in NO_EFFECT:
                self.warnings.append(f"{what}.{key} has no effect with {', '.join(sorted({m.name for m in methods}))}")


def read_models(r: FormReader, entries: Any, what: str, method: MergeMethod, base: str | None,
                shared: Mapping[str, Setting]) -> SliceSpec:
    """``models:`` (whole models) as one slice; the base taken out of the list (methods with a
    base) or checked to be one of it (the others: it names the model metadata comes from)."""
    if not isinstance(entries, list) or not entries:
        raise r.fail(f"'{what}' must be a non-empty list of '- model: PATH' entries")
    sources = [_model_entry(r, e, f"{what}[{i}]", method) for i, e in enumerate(entries)]
    _no_duplicates(r, [s.ref for s in sources], "")
    base_source = None
    if method.needs_base:
        if base is None:
            raise r.fail(f"{method.name} needs 'base_model' ({method.base_role})")
        if any(s.ref == base and s.parameters for s in sources):
            r.warnings.append(f"the base model's parameters are not used by {method.name}")
        sources, base_source = [s for s in sources if s.ref != base], Source(base)
    elif base is not None and base not in [s.ref for s in sources]:
        raise r.fail(f"base_model {base!r} is not one of '{what}': {method.name} merges the listed models, so "
                     "base_model (which supplies metadata) must be one of them or left out")
    piece = SliceSpec(tuple(sources), base_source)
    check_slice(r, piece, method, shared, "")
    return piece


def _model_entry(r: FormReader, entry: Any, what: str, method: MergeMethod) -> Source:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or "model" not in entry:
        raise r.fail(f"{what} must be a mapping with a 'model' path")
    for key in entry:
        if key not in ("model", "parameters"):
            raise r.fail(f"{what}: unknown key {key!r}; a model entry has 'model' and 'parameters'")
    params = r.parameters(entry.get("parameters"), f"{what}.parameters", per_model=True)
    r.warn_unused(params, f"{what}.parameters", [method])
    return Source(r.ref(entry["model"], f"{what}.model"), None, params)


def read_slices(r: FormReader, entries: Any, what: str, method: MergeMethod, base: str | None,
                shared: Mapping[str, Setting]) -> tuple[SliceSpec, ...]:
    """``slices:``, each ``{sources: [{model, layer_range}], parameters, base_model}``."""
    if not isinstance(entries, list) or not entries:
        raise r.fail(f"'{what}' must be a non-empty list of '- sources: [...]' entries")
    out = []
    for i, entry in enumerate(entries):
        here = f"{what}[{i}]"
        entry = r.mapping(entry, here)
        unknown = next((k for k in entry if k not in ("sources", "parameters", "base_model")), None)
        if unknown is not None:
            raise r.fail(f"{here}: unknown key {unknown!r}; a slice has 'sources', 'parameters' and 'base_model'")
        sources = entry.get("sources")
        if not isinstance(sources, list) or not sources:
            raise r.fail(f"{here}.sources must be a non-empty list of '- model: PATH, layer_range: [a, b]'")
        read = [_slice_source(r, s, f"{here}.sources[{j}]", method) for j, s in enumerate(sources)]
        _no_duplicates(r, [s.ref for s in read], f"{here}.sources: ")
        lengths = {s.layers[1] - s.layers[0] for s in read}
        if len(lengths) > 1:
            raise r.fail(f"{here}: all sources of a slice must have the same number of layers, not {sorted(lengths)}")
        params = r.parameters(entry.get("parameters"), f"{here}.parameters", per_model=False)
        slice_base = r.ref(entry["base_model"], f"{here}.base_model") if entry.get("base_model") else base
        base_source = None
        if method.needs_base:
            base_source = next((s for s in read if s.ref == slice_base), None)
            if base_source is None:
                raise r.fail(f"{here}: {method.name} needs the base model {slice_base!r} among the slice's sources "
                             "(with its layer_range)" if slice_base else f"{method.name} needs 'base_model'")
            read = [s for s in read if s is not base_source]
        piece = SliceSpec(tuple(read), base_source, params)
        check_slice(r, piece, method, {**shared, **params}, here + ": ")
        out.append(piece)
    return tuple(out)


def _slice_source(r: FormReader, entry: Any, what: str, method: MergeMethod) -> Source:
    entry = r.mapping(entry, what)
    unknown = next((k for k in entry if k not in ("model", "layer_range", "parameters")), None)
    if unknown is not None or "model" not in entry:
        raise r.fail(f"{what}: a slice source has 'model', 'layer_range' and 'parameters'"
                     + (f", not {unknown!r}" if unknown is not None else ""))
    span = entry.get("layer_range")
    if (not isinstance(span, list) or len(span) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in span)
            or not 0 <= span[0] < span[1]):
        raise r.fail(f"{what}.layer_range must be [first, stop] with 0 <= first < stop, not {span!r}")
    params = r.parameters(entry.get("parameters"), f"{what}.parameters", per_model=True)
    r.warn_unused(params, f"{what}.parameters", [method])
    return Source(r.ref(entry["model"], f"{what}.model"), (span[0], span[1]), params)


def _no_duplicates(r: FormReader, refs: list[str], where: str) -> None:
    duplicate = next((x for i, x in enumerate(refs) if x in refs[:i]), None)
    if duplicate:
        raise r.fail(f"{where}model {duplicate!r} is listed twice")


def check_slice(r: FormReader, piece: SliceSpec, method: MergeMethod, shared: Mapping[str, Setting],
                where: str) -> None:
    """Enough models for the method, and every required per-model parameter given somewhere."""
    fewest, most = method.model_count
    n = len(piece.sources)
    if n < fewest:
        count = "one model" if fewest == 1 else f"{fewest} models"
        raise r.fail(f"{where}{method.name} needs at least {count}" + (" besides the base model" if method.needs_base else ""))
    if most is not None and n > most:
        kind = "the base model and one other" if method.needs_base else f"{most} model per slice"
        raise r.fail(f"{where}{method.name} takes {kind}; {n} are listed"
                     + (" besides the base" if method.needs_base else ""))
    for p in method.parameters:
        if p.required and p.name not in shared:
            raise r.fail(f"{where}{method.name} needs parameters: {{{p.name}: ...}}")
    for s in piece.sources:
        for p in method.tensor_parameters:
            if p.required and p.name not in s.parameters and p.name not in shared:
                raise r.fail(f"{where}model {s.ref!r} has no {p.name}; {method.name} needs parameters: "
                             f"{{{p.name}: ...}} for every model" + (" except the base" if method.needs_base else ""))
    weights = [s.parameters.get("weight", shared.get("weight")) for s in piece.sources]
    normalize = shared.get("normalize", next((p.default for p in method.parameters if p.name == "normalize"), False))
    if (method.name == "linear" and normalize is True and all(w is not None and is_scalar(w) for w in weights)
            and abs(sum(weights)) < 1e-8):
        raise r.fail("the weights sum to 0, so normalize cannot divide by them; set parameters.normalize: false")


def read_modules(r: FormReader, value: Any, method: MergeMethod, base: str | None,
                 shared: Mapping[str, Setting]) -> dict[str, ModuleSpec]:
    """``modules:``, each module with its models or slices, parameters, and optionally its own
    merge_method and base_model (ggraft's keys)."""
    modules = {}
    for name, body in r.mapping(value, "modules").items():
        here = f"modules.{name}"
        if name not in MODULES:
            raise r.fail(f"modules: unknown module {name!r}; ggraft's modules are {', '.join(MODULES)}")
        body = r.mapping(body, here)
        unknown = next((k for k in body if k not in ("models", "slices", "parameters", "merge_method", "base_model")), None)
        if unknown is not None:
            raise r.fail(f"{here}: unknown key {unknown!r}; a module has 'models' or 'slices', 'parameters', "
                         "'merge_method' and 'base_model'")
        if bool(body.get("models")) == bool(body.get("slices")):
            raise r.fail(f"{here}: give exactly one of 'models' or 'slices'")
        own = r.method(body["merge_method"], f"{here}.merge_method") if "merge_method" in body else method
        if body.get("base_model"):
            own_base = r.ref(body["base_model"], f"{here}.base_model")
        else:  # a module's own method without a base (passthrough, linear) does not take the top level's
            own_base = base if own.needs_base or "merge_method" not in body else None
        params = r.parameters(body.get("parameters"), f"{here}.parameters", per_model=False)
        if body.get("slices") and name != TEXT:
            raise r.fail(f"{here}: slices stack the text decoder's layers; give 'models' for the {name}")
        if body.get("slices"):
            slices = read_slices(r, body["slices"], f"{here}.slices", own, own_base, {**shared, **params})
        else:
            slices = (read_models(r, body["models"], f"{here}.models", own, own_base, {**shared, **params}),)
        modules[name] = ModuleSpec(name, own, slices, params)
    if not modules:
        raise r.fail("'modules' must map module names to their models")
    return modules


def describe_module(module: ModuleSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"merge_method": module.method.name}
    if module.whole_models:
        piece = module.slices[0]
        if piece.base is not None:
            out["base_model"] = piece.base.ref
        out["models"] = [{"model": s.ref, **({"parameters": describe_all(s.parameters)} if s.parameters else {})}
                         for s in piece.sources]
    else:
        out["slices"] = describe_slices(module.slices)
    if module.parameters:
        out["parameters"] = describe_all(module.parameters)
    return out


def describe_slices(slices: tuple[SliceSpec, ...]) -> list[dict]:
    out = []
    for s in slices:
        sources = ([s.base] if s.base else []) + list(s.sources)
        entry: dict[str, Any] = {"sources": [{"model": src.ref,
                                               **({"layer_range": list(src.layers)} if src.layers else {}),
                                               **({"parameters": describe_all(src.parameters)} if src.parameters else {})}
                                              for src in sources]}
        if s.parameters:
            entry["parameters"] = describe_all(s.parameters)
        out.append(entry)
    return out


def describe_all(params: Mapping[str, Setting]) -> dict[str, Any]:
    return {k: describe(v) for k, v in params.items()}

