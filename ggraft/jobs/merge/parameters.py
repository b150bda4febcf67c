"""Merge parameters: what a method declares, and how a config's values are read and evaluated.

A method declares its parameters (``Parameter``: name, kind, required, default), as mergekit's
``ConfigParameterDef`` does; the configuration is validated against those declarations.

A value is written as mergekit writes it (mergekit/config.py, ``ParameterSetting``):

- a scalar: ``weight: 0.7``;
- a *gradient*, a list of numbers interpolated across the layers: ``[0, 0.5, 1]``; at position
  ``t`` in [0, 1] it is ``(1 - f)·v[i] + f·v[i + 1]`` with ``i = int(t·(n - 1))``, ``f`` the rest
  (``evaluate_setting``);
- conditions, ``[{filter: self_attn, value: ...}, ..., {value: ...}]`` (or one of them as a
  mapping): the first whose ``filter`` matches the tensor's Hugging Face name wins; no filter
  (or ``*``) matches every tensor.  A filter is a substring, or a glob pattern when it holds
  ``*``, ``?`` or ``[`` (as mergekit's ``_filter_matches``).

``t`` is where a tensor sits among the layers of its slice (``plan``): layer ``k`` of ``n`` is at
``k / (n - 1)`` (1 for a single layer), the embedding at 0, the final norm and head at 1.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

from ggraft.errors import InputError

KINDS = ("number", "fraction", "flag")


@dataclass(frozen=True)
class Parameter:
    """A parameter a method declares.  ``kind``: ``number`` (finite), ``fraction`` (in (0, 1])
    or ``flag`` (true / false)."""

    name: str
    kind: str = "number"
    required: bool = False
    default: Any = None


@dataclass(frozen=True)
class Condition:
    """One ``{filter, value}`` entry of a conditional setting."""

    filter: str | None
    value: "Setting"


Setting = Union[float, bool, tuple[float, ...], tuple[Condition, ...]]


class NoLayer(Exception):
    """A gradient was evaluated for a tensor that has no place among layers."""


def filter_matches(pattern: str | None, name: str) -> bool:
    if pattern is None or pattern == "*":
        return True
    if not pattern or not name:
        return False
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def evaluate(setting: Setting, name: str, t: float | None) -> Any:
    """The value of ``setting`` for the tensor ``name`` (its Hugging Face name) at ``t``; None
    when no condition matches.  Raises NoLayer for a gradient where ``t`` is None."""
    if not isinstance(setting, tuple):
        return setting
    if setting and isinstance(setting[0], Condition):
        for condition in setting:
            if filter_matches(condition.filter, name):
                return evaluate(condition.value, name, t)
        return None
    if t is None:
        raise NoLayer
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


def describe(setting: Setting) -> Any:
    """A setting as plain data (for provenance and --json)."""
    if isinstance(setting, tuple) and setting and isinstance(setting[0], Condition):
        return [{**({"filter": c.filter} if c.filter is not None else {}), "value": describe(c.value)}
                for c in setting]
    return list(setting) if isinstance(setting, tuple) else setting


def is_scalar(setting: Setting) -> bool:
    return not isinstance(setting, tuple)


def is_conditional(setting: Setting | None) -> bool:
    return isinstance(setting, tuple) and bool(setting) and isinstance(setting[0], Condition)


class SettingReader:
    """Reads one setting of a config (``what`` names it in messages) for a declared parameter."""

    def __init__(self, fail: Callable[[str], InputError]):
        self.fail = fail

    def read(self, raw: Any, parameter: Parameter, what: str) -> Setting:
        if isinstance(raw, dict):
            return (self.condition(raw, parameter, what),)
        if isinstance(raw, list):
            if not raw:
                raise self.fail(f"{what} is an empty list")
            if all(isinstance(v, dict) for v in raw):
                return tuple(self.condition(v, parameter, f"{what}[{i}]") for i, v in enumerate(raw))
            if parameter.kind == "flag":
                raise self.fail(f"{what} must be true or false, not a list")
            return tuple(self.scalar(v, parameter, f"{what}[{i}]") for i, v in enumerate(raw))
        return self.scalar(raw, parameter, what)

    def condition(self, raw: dict, parameter: Parameter, what: str) -> Condition:
        unknown = next((k for k in raw if k not in ("filter", "value")), None)
        if unknown is not None:
            raise self.fail(f"{what}: unknown key {unknown!r}; a conditional value has 'filter' and 'value'")
        if "value" not in raw:
            raise self.fail(f"{what}: a conditional value needs 'value'")
        pattern = raw.get("filter")
        if pattern is not None and not isinstance(pattern, str):
            raise self.fail(f"{what}.filter must be a string, not {pattern!r}")
        value = raw["value"]
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
            raise self.fail(f"{what}.value must be a number or a list of numbers")
        return Condition(pattern, self.read(value, parameter, f"{what}.value"))

    def scalar(self, value: Any, parameter: Parameter, what: str) -> float | bool:
        if parameter.kind == "flag":
            if not isinstance(value, bool):
                raise self.fail(f"{what} must be true or false, not {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(f"{what} must be a number, not {value!r}")
        if parameter.kind == "fraction" and not 0.0 < value <= 1.0:
            raise self.fail(f"{what} must be in (0, 1], not {value!r}")
        return float(value)


def lookup(name: str, levels: list[Mapping[str, Setting]], tensor: str, t: float | None) -> Any:
    """The value of parameter ``name`` for a tensor: the first level (most specific first) whose
    setting gives one (mergekit's ``ConfigReader.parameter``); None if none does."""
    for level in levels:
        if name in level:
            value = evaluate(level[name], tensor, t)
            if value is not None:
                return value
    return None
