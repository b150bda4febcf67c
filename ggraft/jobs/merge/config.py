"""The merge configuration: mergekit's YAML, validated with one-line messages.

A mergekit config that uses only these keys runs unchanged::

    merge_method: task_arithmetic      # linear | task_arithmetic | ties | dare_linear | dare_ties
                                       # | slerp | passthrough
    base_model: path/to/base           # needed by every method but linear and passthrough
    models:                            # or slices: (layer ranges), or modules: (per module)
      - model: path/to/vlm
        parameters: {weight: 0.7}      # density too for ties / dare_*; t for slerp
      - model: path/to/code-llm
        parameters: {weight: 0.3}
    parameters: {lambda: 1.0, normalize: false}   # also rescale (dare_*), t (slerp), scale
                                       # (passthrough), int8_mask (no effect); any of them as a
                                       # gradient or per filter (see parameters.py)
    dtype: bfloat16                    # output type unless --outtype: float32 | float16 | bfloat16
    seed: 0                            # DARE's random drops (ggraft's key; default 0)
    metadata_source: path/to/vlm       # whose metadata, names and side files the output takes, and
                                       # which fills the modules not merged (ggraft's key, in the
                                       # style of mergekit's tokenizer_source)
    vision_source: path/to/vlm         # HF merges: the older name of metadata_source

Each method declares its parameters (``methods.py``) and the config is validated against the
declarations.  Model paths are local files (GGUF) or folders (Hugging Face); a relative path is
looked up in the current folder (as mergekit does), then beside the config file.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from ggraft.errors import InputError
from ggraft.gguf_io import output_types
from .forms import (TEXT, FormReader, ModuleSpec, describe_all, describe_module, describe_slices, read_models,
                    read_modules, read_slices)
from .methods import MergeMethod, Settings
from .parameters import Setting, describe

TOP_KEYS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype", "seed",
            "metadata_source", "vision_source")
FORMS = ("models", "slices", "modules")
UNSUPPORTED = {
    "tokenizer_source": "the tokenizer always comes from the metadata source (by default the base model)",
    "tokenizer": "the tokenizer always comes from the metadata source (by default the base model)",
    "chat_template": "the chat template always comes from the metadata source (by default the base model)",
}


@dataclass(frozen=True)
class ModelSpec:
    """One model of the config: its reference as written, its own parameters (models form) and
    its resolved path."""

    ref: str
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    path: Path | None = None


@dataclass
class MergeConfig:
    method: MergeMethod
    base_ref: str | None  # linear / passthrough: the model that supplies metadata, or None
    modules: dict[str, ModuleSpec]
    form: str  # "models", "slices" or "modules"
    parameters: dict[str, Setting] = field(default_factory=dict)
    seed: int = 0
    outtype: str | None = None
    metadata_source: str | None = None
    vision_source: str | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    source: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def spec(self, ref: str) -> ModelSpec:
        return ModelSpec(ref, self._own_parameters().get(ref, {}), self.paths.get(ref))

    def _own_parameters(self) -> dict[str, Mapping[str, Setting]]:
        text = self.modules.get(TEXT)
        if self.form != "models" or text is None:
            return {}
        return {s.ref: s.parameters for s in text.slices[0].sources}

    @property
    def base(self) -> ModelSpec | None:
        return self.spec(self.base_ref) if self.base_ref else None

    @property
    def models(self) -> list[ModelSpec]:
        """The models merged besides the base (models form: in the order listed)."""
        base = self.base_ref if self.method.needs_base else None
        return [self.spec(r) for r in self._refs() if r != base]

    @property
    def inputs(self) -> list[ModelSpec]:
        """Every model read, base first, each once."""
        refs = ([self.base_ref] if self.base_ref else []) + self._refs()
        return [self.spec(r) for r in dict.fromkeys(refs)]

    def _refs(self) -> list[str]:
        refs = [r for m in self.modules.values() for r in m.refs]
        return list(dict.fromkeys(refs + [r for r in (self.metadata_source, self.vision_source) if r]))

    def path(self, ref: str) -> Path:
        return self.paths[ref]

    def top_settings(self) -> Settings:
        """The method's shared parameters as the top level gives them (defaults for the rest)."""
        return self.method.settings({k: describe(v) for k, v in self.parameters.items()}, self.seed)

    def describe(self) -> dict[str, Any]:
        """The resolved config, for provenance and --json."""
        out: dict[str, Any] = {"merge_method": self.method.name, "reference": self.method.reference,
                               "base_model": self.base_ref}
        if self.form == "models":
            out["models"] = [self._describe_model(s) for s in self.modules[TEXT].slices[0].sources]
            out["parameters"] = dict(self.top_settings().values)
        elif self.form == "slices":
            out["slices"] = describe_slices(self.modules[TEXT].slices)
            out["parameters"] = describe_all(self.parameters)
        else:
            out["modules"] = {name: describe_module(m) for name, m in self.modules.items()}
            out["parameters"] = describe_all(self.parameters)
        if any(m.method.uses_seed for m in self.modules.values()):
            out["seed"] = self.seed
        for key in ("vision_source", "metadata_source"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out

    def _describe_model(self, source) -> dict[str, Any]:
        entry: dict[str, Any] = {"model": source.ref}
        for p in self.method.tensor_parameters:
            setting = source.parameters.get(p.name, self.parameters.get(p.name))
            entry[p.name] = describe(setting) if setting is not None else p.default
        return entry


def parse_config(text: str, where: str = "config") -> MergeConfig:
    """Validate a config's text (paths are not looked up; see ``resolve``)."""
    r = FormReader(where)
    data = _load_yaml(r, text)
    method = r.method(data.get("merge_method"), "merge_method")
    shared = r.parameters(data.get("parameters"), "parameters", per_model=False)
    base = r.ref(data["base_model"], "base_model") if data.get("base_model") is not None else None
    given = [k for k in FORMS if data.get(k) is not None]
    if len(given) != 1:
        raise r.fail("give exactly one of 'models', 'slices' or 'modules'"
                     + (f", not {' and '.join(given)}" if given else ""))
    form = given[0]
    if form == "models":
        modules = {TEXT: ModuleSpec(TEXT, method, (read_models(r, data["models"], "models", method, base, shared),))}
    elif form == "slices":
        modules = {TEXT: ModuleSpec(TEXT, method, read_slices(r, data["slices"], "slices", method, base, shared))}
    else:
        modules = read_modules(r, data["modules"], method, base, shared)
    r.warn_unused(shared, "parameters", list({id(m.method): m.method for m in modules.values()}.values()))
    config = MergeConfig(method, base, modules, form, shared, _seed(r, data, modules), _outtype(r, data),
                         warnings=r.warnings)
    referenced = config.inputs
    for key in ("metadata_source", "vision_source"):
        if data.get(key) is not None:
            ref = r.ref(data[key], key)
            if ref not in [m.ref for m in referenced]:
                raise r.fail(f"{key} {ref!r} is not one of the models")
            setattr(config, key, ref)
    if config.metadata_source and config.vision_source and config.metadata_source != config.vision_source:
        raise r.fail("metadata_source and vision_source name different models; vision_source is the older name "
                     "of metadata_source: give one")
    return config


def _load_yaml(r: FormReader, text: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise r.fail(f"not valid YAML: {' '.join(str(getattr(e, 'problem', None) or e).split())}{at}") from None
    except RecursionError:  # a document nested deeper than any merge config is
        raise r.fail("not valid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise r.fail("must be a YAML mapping with merge_method, models, ...")
    for key in data:
        if key in UNSUPPORTED:
            raise r.fail(f"'{key}': {UNSUPPORTED[key]}")
        if key not in TOP_KEYS:
            raise r.fail(f"unknown key {key!r}; ggraft takes {', '.join(TOP_KEYS)}")
    return data


def _seed(r: FormReader, data: dict, modules: dict[str, ModuleSpec]) -> int:
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise r.fail(f"seed must be a whole number >= 0, not {seed!r}")
    if "seed" in data and not any(m.method.uses_seed for m in modules.values()):
        r.warnings.append(f"seed has no effect with {data['merge_method']} (only dare_* draws at random)")
    return seed


def _outtype(r: FormReader, data: dict) -> str | None:
    outtype = None
    for key in ("dtype", "out_dtype"):  # out_dtype, mergekit's output type, wins
        if data.get(key) is not None:
            named = output_types.by_spelling(str(data[key]).lower())
            if named is None:
                mergekit_names = output_types.listed(t.dtype for t in output_types.OUTPUT_TYPES if t.dtype)
                raise r.fail(f"{key} {data[key]!r} is not supported; use {mergekit_names}")
            outtype = named.name
    return outtype


def resolve(config: MergeConfig, folder: Path | None = None) -> MergeConfig:
    """Look up every model's path (current folder first, then ``folder``, the config's)."""
    return replace(config, paths={spec.ref: _locate(spec.ref, folder) for spec in config.inputs})


def _locate(ref: str, folder: Path | None) -> Path:
    path = Path(ref).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path] + ([folder / path] if folder else [])
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise InputError(f"model {ref!r}: no such file or folder",
                     hint="ggraft merges local GGUF files or Hugging Face folders: download the model first "
                          "and give its path (relative paths: current folder, then the config's folder)")


def load_config(path: str | Path) -> MergeConfig:
    """Read, validate and resolve a config file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such config file" if not path.exists() else f"{path}: is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    config = parse_config(text, str(path))
    config.source = path
    return resolve(config, path.resolve().parent)
