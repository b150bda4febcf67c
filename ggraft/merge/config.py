"""The merge configuration: a subset of mergekit's YAML, validated with one-line messages.

A mergekit config that uses only these keys runs unchanged::

    merge_method: task_arithmetic      # linear | task_arithmetic | ties | dare_linear | dare_ties
    base_model: path/to/base           # needed by every method but linear
    models:
      - model: path/to/vlm
        parameters: {weight: 0.7}      # density too for ties / dare_*
      - model: path/to/code-llm
        parameters: {weight: 0.3}
    parameters: {lambda: 1.0, normalize: false}   # also rescale (dare_*), int8_mask (no effect)
    dtype: bfloat16                    # output type unless --outtype: float32 | float16 | bfloat16
    seed: 0                            # DARE's random drops (ggraft's key; default 0)
    vision_source: path/to/vlm         # HF merges: where vision + projector come from (ggraft's key)

Model paths are local files (GGUF) or folders (Hugging Face); a relative path is looked up
in the current folder (as mergekit does), then beside the config file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError
from .methods import METHODS, MergeMethod, Settings

#: mergekit's dtype names (and ggraft's) -> output type
DTYPES = {"float32": "f32", "fp32": "f32", "f32": "f32", "float16": "f16", "fp16": "f16", "f16": "f16",
          "bfloat16": "bf16", "bf16": "bf16", "q8_0": "q8_0"}
TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "seed", "vision_source")
GLOBAL_PARAMETERS = ("weight", "density", "lambda", "normalize", "rescale", "int8_mask")
MODEL_PARAMETERS = ("weight", "density")
UNSUPPORTED = {
    "slices": "layer slices are not supported; ggraft merges whole models listed under 'models'",
    "modules": "per-module merges are not supported; list whole models under 'models'",
    "tokenizer_source": "the tokenizer always comes from the base model (GGUF) or the vision source (HF)",
    "tokenizer": "the tokenizer always comes from the base model (GGUF) or the vision source (HF)",
    "chat_template": "the chat template always comes from the base model (GGUF) or the vision source (HF)",
}


@dataclass(frozen=True)
class ModelSpec:
    """One model of the config: its reference as written, parameters, and resolved path."""

    ref: str
    weight: float | None = None
    density: float = 1.0
    path: Path | None = None


@dataclass
class MergeConfig:
    method: MergeMethod
    base: ModelSpec | None  # linear: the model that supplies metadata (one of ``models``), or None
    models: list[ModelSpec]  # the models merged (task arithmetic: without the base)
    settings: Settings
    outtype: str | None = None
    vision_source: str | None = None
    source: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def inputs(self) -> list[ModelSpec]:
        """Every model read, base first, each once."""
        head = [self.base] if self.base is not None else []
        return head + [m for m in self.models if m is not self.base]

    def describe(self) -> dict[str, Any]:
        """The resolved config, for provenance and --json."""
        parameters: dict[str, Any] = {"normalize": self.settings.normalize}
        if "lambda" in self.method.global_parameters:
            parameters["lambda"] = self.settings.lam
        if "rescale" in self.method.global_parameters:
            parameters["rescale"] = self.settings.rescale
        models = []
        for m in self.models:
            entry: dict[str, Any] = {"model": m.ref, "weight": m.weight}
            if "density" in self.method.model_parameters:
                entry["density"] = m.density
            models.append(entry)
        out: dict[str, Any] = {"merge_method": self.method.name, "reference": self.method.reference,
                               "base_model": self.base.ref if self.base else None, "models": models,
                               "parameters": parameters}
        if self.method.name.startswith("dare"):
            out["seed"] = self.settings.seed
        if self.vision_source:
            out["vision_source"] = self.vision_source
        return out


class _Checker:
    def __init__(self, where: str):
        self.where = where
        self.warnings: list[str] = []

    def fail(self, message: str, hint: str | None = None) -> InputError:
        return InputError(f"{self.where}: {message}", hint)

    def number(self, value: Any, what: str) -> float:
        if isinstance(value, list):
            raise self.fail(f"{what}: gradients (a list of values across layers) are not supported; give one number")
        if isinstance(value, dict):
            raise self.fail(f"{what}: filtered values are not supported; give one number")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(f"{what} must be a number, not {value!r}")
        return float(value)

    def density(self, value: Any, what: str) -> float:
        d = self.number(value, what)
        if not 0.0 < d <= 1.0:
            raise self.fail(f"{what} must be in (0, 1], not {value!r}")
        return d

    def flag(self, value: Any, what: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(f"{what} must be true or false, not {value!r}")
        return value

    def mapping(self, value: Any, what: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"{what} must be a mapping of names to values")
        return value

    def model_ref(self, value: Any, what: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{what} must be a path (a string)")
        return value.strip()


def parse_config(text: str, where: str = "config") -> MergeConfig:
    """Validate a config's text (paths are not looked up; see ``resolve``)."""
    check = _Checker(where)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise check.fail(f"not valid YAML: {getattr(e, 'problem', None) or e}{at}") from None
    if not isinstance(data, dict):
        raise check.fail("must be a YAML mapping with merge_method, models, ...")
    for key in data:
        if key in UNSUPPORTED:
            raise check.fail(f"'{key}': {UNSUPPORTED[key]}")
        if key not in TOP_KEYS:
            raise check.fail(f"unknown key {key!r}; ggraft takes {', '.join(TOP_KEYS)}")

    name = data.get("merge_method")
    if name is None:
        raise check.fail(f"'merge_method' is missing; choose one of {', '.join(METHODS)}")
    if name not in METHODS:
        raise check.fail(f"merge_method {name!r} is not supported; choose one of {', '.join(METHODS)}")
    method = METHODS[name]

    params = check.mapping(data.get("parameters"), "parameters")
    for key in params:
        if key not in GLOBAL_PARAMETERS:
            raise check.fail(f"parameters: unknown parameter {key!r}; known: {', '.join(GLOBAL_PARAMETERS)}")
    defaults = {k: params[k] for k in MODEL_PARAMETERS if k in params}
    for key in ("lambda", "normalize", "rescale", "density"):
        if key in params and key not in (*method.global_parameters, *method.model_parameters):
            check.warnings.append(f"parameters.{key} has no effect with {name}")
    normalize = check.flag(params.get("normalize", method.default_normalize), "parameters.normalize")
    lam = check.number(params.get("lambda", 1.0), "parameters.lambda")
    rescale = check.flag(params.get("rescale", True), "parameters.rescale")
    check.flag(params.get("int8_mask", False), "parameters.int8_mask")  # mergekit's memory saver: no effect

    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise check.fail("'models' must be a non-empty list of '- model: PATH' entries")
    models = [_model(check, entry, i, defaults, method) for i, entry in enumerate(entries)]
    refs = [m.ref for m in models]
    duplicate = next((r for i, r in enumerate(refs) if r in refs[:i]), None)
    if duplicate:
        raise check.fail(f"model {duplicate!r} is listed twice")

    base_ref = data.get("base_model")
    base = None
    if base_ref is not None:
        base_ref = check.model_ref(base_ref, "base_model")
        listed = next((m for m in models if m.ref == base_ref), None)
        if method.needs_base:
            if any(isinstance(e, dict) and e.get("model") == base_ref and e.get("parameters") for e in entries):
                check.warnings.append(f"the base model's parameters are not used by {name}")
            models = [m for m in models if m.ref != base_ref]
            base = ModelSpec(base_ref)
        elif listed is None:
            raise check.fail(f"base_model {base_ref!r} is not one of 'models': linear averages the listed "
                             "models, so base_model (which supplies metadata) must be one of them or left out")
        else:
            base = listed
    elif method.needs_base:
        raise check.fail(f"{name} needs 'base_model' (the model the task vectors are taken from)")
    if method.needs_base and not models:
        raise check.fail(f"{name} needs at least one model besides the base model")

    for m in models:
        if m.weight is None:
            raise check.fail(f"model {m.ref!r} has no weight; {name} needs parameters: {{weight: ...}} "
                             "for every model" + (" except the base" if method.needs_base else ""))
    if name == "linear" and normalize and abs(sum(m.weight for m in models)) < 1e-8:
        raise check.fail("the weights sum to 0, so normalize cannot divide by them; set parameters.normalize: false")

    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise check.fail(f"seed must be a whole number >= 0, not {seed!r}")
    if "seed" in data and not name.startswith("dare"):
        check.warnings.append(f"seed has no effect with {name} (only dare_* draws at random)")

    outtype = None
    for key in ("dtype", "out_dtype"):  # out_dtype, mergekit's output type, wins
        if data.get(key) is not None:
            value = str(data[key]).lower()
            if value not in DTYPES:
                raise check.fail(f"{key} {data[key]!r} is not supported; use float32, float16 or bfloat16")
            outtype = DTYPES[value]

    vision = data.get("vision_source")
    if vision is not None:
        vision = check.model_ref(vision, "vision_source")
        if vision not in [m.ref for m in models] + ([base.ref] if base else []):
            raise check.fail(f"vision_source {vision!r} is not one of the models")

    return MergeConfig(method, base, models, Settings(normalize, lam, rescale, seed), outtype, vision,
                       warnings=check.warnings)


def _model(check: _Checker, entry: Any, index: int, defaults: dict, method: MergeMethod) -> ModelSpec:
    what = f"models[{index}]"
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or "model" not in entry:
        raise check.fail(f"{what} must be a mapping with a 'model' path")
    for key in entry:
        if key not in ("model", "parameters"):
            raise check.fail(f"{what}: unknown key {key!r}; a model entry has 'model' and 'parameters'")
    ref = check.model_ref(entry["model"], f"{what}.model")
    params = {**defaults, **check.mapping(entry.get("parameters"), f"{what}.parameters")}
    for key in params:
        if key not in MODEL_PARAMETERS:
            raise check.fail(f"{what}.parameters: unknown parameter {key!r}; known: {', '.join(MODEL_PARAMETERS)}")
    if "density" in (entry.get("parameters") or {}) and "density" not in method.model_parameters:
        check.warnings.append(f"{what}.parameters.density has no effect with {method.name}")
    weight = check.number(params["weight"], f"{what}.parameters.weight") if "weight" in params else None
    density = check.density(params.get("density", 1.0), f"{what}.parameters.density")
    return ModelSpec(ref, weight, density)


def resolve(config: MergeConfig, folder: Path | None = None) -> MergeConfig:
    """Look up every model's path (current folder first, then ``folder``, the config's)."""
    found: dict[str, Path] = {}
    for spec in config.inputs:
        found[spec.ref] = _locate(spec.ref, folder)

    def located(m: ModelSpec) -> ModelSpec:
        return replace(m, path=found[m.ref])

    models = [located(m) for m in config.models]
    by_ref = {m.ref: m for m in models}
    base = config.base and (by_ref.get(config.base.ref) or located(config.base))
    return replace(config, base=base, models=models)


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
