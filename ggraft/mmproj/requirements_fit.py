"""Does an mmproj header fit what the installed llama.cpp requires of its projector type?

``mmproj_problems`` applies ``requirements``' tables to an ``MmprojHeader``, made from a file's
validated index (``check``) or from a writer's keys and planned tensor shapes (``convert``,
before anything is written), and returns one problem per broken rule.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import gguf

from ggraft.errors import UnsupportedModelError
from .requirement_parts import (ABSENT, EXPECTED, INT32_MAX, KEYS, REQUIRED, VISION_KEYS, VISION_RULES, Key, OneOf,
                                Projector, Tensor)
from .requirements import PROJECTORS

VT = gguf.GGUFValueType
ERROR, WARNING = "error", "warning"
MAX_PROBLEMS = 8  # per file: a header broken everywhere is named by its first few problems
CORE_SYMBOLS = ("E", "H", "N", "S", "P")  # without these no shape can be derived


@dataclass
class MmprojHeader:
    """What the rules look at: each key's GGUF type (and item type), its value, each tensor's
    shape in ggml order."""

    types: dict[str, tuple[VT, VT | None]]
    value: Callable[[str], Any]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def from_index(cls, index) -> "MmprojHeader":
        """From a ``GGUFIndex`` (``check``)."""
        types = {name: (f.type, f.item_type) for name, f in index.fields.items()}
        return cls(types, index.value, {t.name: tuple(int(d) for d in t.shape) for t in index.tensors})

    @classmethod
    def planned(cls, writer: gguf.GGUFWriter, shapes: dict[str, tuple[int, ...]]) -> "MmprojHeader":
        """From a ``GGUFWriter`` holding the keys, and the ggml shapes of the tensors to be written."""
        kv = {k: v for shard in writer.kv_data for k, v in shard.items()}
        types = {k: (v.type, v.sub_type or _item_type(v.value) if v.type == VT.ARRAY else None) for k, v in kv.items()}
        return cls(types, lambda k: kv[k].value if k in kv else None, shapes)


def _item_type(values: Any) -> VT | None:
    """The item type gguf-py's writer gives an array written without one (from its first item)."""
    if isinstance(values, (bytes, bytearray)):
        return VT.UINT8
    try:
        return VT.get_type(values[0])
    except (IndexError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Problem:
    severity: str
    message: str


class _Fit:
    def __init__(self, header: MmprojHeader, projector: str):
        self.header, self.projector = header, projector
        self.spec: Projector = PROJECTORS.get(projector, Projector())
        self.problems: list[Problem] = []
        self.env: dict[str, Any] = {}

    def add(self, severity: str, message: str) -> None:
        self.problems.append(Problem(severity, message))

    # -- keys --------------------------------------------------------------------------
    def keys(self) -> None:
        specs: dict[str, Key] = {k.name: k for k in VISION_KEYS + self.spec.keys}
        for key in specs.values():
            stored = self.header.types.get(key.name)
            if stored is None:
                if key.need == REQUIRED:
                    self.add(ERROR, f"{key.name} is missing; llama.cpp refuses an mmproj without it")
                elif key.symbol and key.default is not None:
                    self.env[key.symbol] = key.default
                continue
            if stored[0] != key.type or (key.item_type is not None and stored[1] != key.item_type):
                self.add(ERROR, f"{key.name} is stored as {_type_name(*stored)}; llama.cpp reads it as "
                         f"{_type_name(key.type, key.item_type)} and aborts on anything else")
                continue
            value = self.header.value(key.name)
            if key.type == VT.UINT32 and value > INT32_MAX:
                self.add(ERROR, f"{key.name} is {value}; llama.cpp refuses values over {INT32_MAX}")
            elif key.symbol:
                self.env[key.symbol] = value

    def derive(self) -> bool:
        return derive_symbols(self.env, self.spec)

    def rules(self) -> None:
        names = defaultdict(lambda: "?", {f"{s}_key": n for s, n in KEYS.items()})
        for key in VISION_KEYS + self.spec.keys:
            if key.symbol:
                names[f"{key.symbol}_key"] = key.name
        for rule in VISION_RULES + self.spec.rules:
            try:
                holds = rule.holds(self.env)
            except (KeyError, TypeError, ZeroDivisionError):
                continue  # a key it needs is missing or mistyped: reported above
            if not holds:
                self.add(ERROR, rule.message.format_map(defaultdict(lambda: "?", {**names, **self.env})))

    # -- tensors -----------------------------------------------------------------------
    def tensors(self) -> None:
        for item in self.spec.tensors:
            self.item(item, self.env, None)
        n_blocks, held = self.env["N"], len(self.header.shapes)
        if self.spec.blocks and n_blocks > held:
            self.add(ERROR, f"{KEYS['N']} is {n_blocks} but the file holds only {held} tensors")
            return
        for bid in range(n_blocks if self.spec.blocks else 0):
            block_env = dict(self.env)  # widths bound in one block (F, ...) do not bind the next
            for item in self.spec.blocks:
                self.item(item, block_env, bid)
            if len(self.problems) > MAX_PROBLEMS:
                return

    def item(self, item: Tensor | OneOf, env: dict[str, Any], bid: int | None) -> None:
        if isinstance(item, Tensor):
            self.problems += self.tensor_problems(item, env, bid)
            return
        present = [lay for lay in item.layouts if lay and self.name(lay[0], bid) in self.header.shapes]
        for layout in present:
            trial = dict(env)
            found = [p for t in layout for p in self.tensor_problems(t, trial, bid)]
            if not any(p.severity == ERROR for p in found):
                env.update(trial)
                self.problems += found
                return
        if not present and any(not lay for lay in item.layouts):
            return
        for t in (present or item.layouts)[0]:
            self.problems += self.tensor_problems(t, env, bid)

    @staticmethod
    def name(t: Tensor, bid: int | None) -> str:
        return t.name.format(bid=bid) if bid is not None else t.name

    def tensor_problems(self, t: Tensor, env: dict[str, Any], bid: int | None) -> list[Problem]:
        name = self.name(t, bid)
        shape = self.header.shapes.get(name)
        graph = f"llama.cpp's {self.projector} graph"
        if shape is None:
            if t.need == REQUIRED:
                return [Problem(ERROR, f"tensor {name} is missing; {graph} reads it")]
            if t.need == EXPECTED:
                return [Problem(WARNING, f"tensor {name} is missing; {graph} runs without it, so the "
                                         "image embeddings will not match the model's")]
            return []
        if t.need == ABSENT:
            return [Problem(ERROR, f"tensor {name} must not be there: {graph} aborts when it is")]
        if t.shape is None or _fits(t.shape, shape, env):
            return []
        need = ", ".join(_render(d, env) for d in t.shape)
        return [Problem(ERROR, f"tensor {name} has shape ({', '.join(map(str, shape))}) but {graph} needs "
                               f"({need}) (ggml order)")]


def derive_symbols(h: dict[str, Any], spec: Projector) -> bool:
    """Add the symbols clip.cpp derives from the keys (False: a key they need is unusable)."""
    if any(not isinstance(h.get(s), int) for s in CORE_SYMBOLS):
        return False
    h.setdefault("M", 1)
    h.setdefault("Hkv", h["H"])
    h["D"] = h["D_key"] if h.get("D_key") else h["E"] // h["H"] if h["H"] > 0 else 0
    h["Lf"] = max(1, len(h.get("features", ())))
    if spec.derive:
        h.update(spec.derive(h))
    h["G"] = h["S"] // h["P"] if h["P"] > 0 else 0
    return True


def needed_tensors(projector: str, symbols: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensors (ggml shapes) an mmproj of type ``projector`` needs, with ``symbols`` for the
    keys' values and the free widths (``F``, ``T``, ``X``, ...): the first layout of every choice,
    required and expected tensors only.  Tests build minimal valid mmprojs with it."""
    spec, env = PROJECTORS[projector], dict(symbols)
    env.update({k.symbol: k.default for k in spec.keys if k.symbol and k.default is not None and k.symbol not in env})
    derive_symbols(env, spec)
    out: dict[str, tuple[int, ...]] = {}
    for items, bids in ((spec.tensors, [None]), (spec.blocks, range(env["N"]))):
        for bid in bids:
            for item in items:
                for t in item.layouts[0] if isinstance(item, OneOf) else (item,):
                    if t.need in (REQUIRED, EXPECTED):
                        out[_Fit.name(t, bid)] = tuple(1 if d == "*" else _value(d, env) for d in t.shape)
    return out


def _type_name(vtype: VT, item: VT | None) -> str:
    return f"an array of {item.name}" if vtype == VT.ARRAY and item is not None else vtype.name


def _terms(expr: str) -> list[list[str]]:
    return [term.split("*") for term in expr.replace(" ", "").split("+")]


def _value(expr: int | str, env: dict[str, Any]) -> int | None:
    if isinstance(expr, int):
        return expr
    total = 0
    for term in _terms(expr):
        product = 1
        for factor in term:
            known = int(factor) if factor.isdigit() else env.get(factor)
            if not isinstance(known, int):
                return None
            product *= known
        total += product
    return total


def _render(expr: int | str, env: dict[str, Any]) -> str:
    value = _value(expr, env)
    return str(value) if value is not None else "*"


def _bind(expr: str, actual: int, env: dict[str, Any]) -> bool:
    """Match ``actual`` to a one-term expression with one unbound symbol (``X``, ``Q*Q``,
    ``E*Q*Q``), binding that symbol; anything else unbound is not checked."""
    terms = _terms(expr)
    unbound = {f for f in terms[0] if not f.isdigit() and not isinstance(env.get(f), int)}
    if len(terms) != 1 or len(unbound) != 1:
        return True
    symbol = unbound.pop()
    known = math.prod(int(f) if f.isdigit() else env[f] for f in terms[0] if f != symbol)
    power = terms[0].count(symbol)
    if known <= 0 or actual % known:
        return False
    root = round((actual // known) ** (1 / power))
    for candidate in (root - 1, root, root + 1):
        if candidate >= 0 and candidate ** power == actual // known:
            env[symbol] = candidate
            return True
    return False


def _fits(spec: tuple[int | str, ...], shape: tuple[int, ...], env: dict[str, Any]) -> bool:
    """Whether ``shape`` matches ``spec`` (trailing 1s aside), binding free symbols into ``env``."""
    shape = tuple(shape) + (1,) * (len(spec) - len(shape))
    if any(d != 1 for d in shape[len(spec):]):
        return False
    trial = dict(env)
    for dim, actual in zip(spec, shape):
        if dim == "*":
            continue
        expected = _value(dim, trial)
        if expected is None:
            if not _bind(str(dim), actual, trial):
                return False
        elif expected != actual:
            return False
    env.update(trial)
    return True


def mmproj_problems(header: MmprojHeader, projector: str | None, tensors: bool = True) -> list[Problem]:
    """What the installed llama.cpp would refuse, abort or crash on in a vision mmproj of type
    ``projector`` (its generic rules only, for a type with no table; the keys only, without ``tensors``)."""
    if not isinstance(projector, str) or not header.value(gguf.Keys.Clip.HAS_VISION_ENCODER):
        return []
    fit = _Fit(header, projector)
    fit.keys()
    if fit.derive():
        fit.rules()
        if tensors and projector in PROJECTORS and all(fit.env[s] > 0 for s in ("E", "H", "P")):
            fit.tensors()
    if len(fit.problems) > MAX_PROBLEMS:
        extra = len(fit.problems) - MAX_PROBLEMS
        fit.problems = fit.problems[:MAX_PROBLEMS] + [Problem(ERROR, f"... and {extra} more such problems")]
    return fit.problems


def refuse_unloadable(writer: gguf.GGUFWriter, projector: str, source: object,
                      tensors: list[tuple[str, Any]] | None = None) -> None:
    """Raise UnsupportedModelError if the mmproj being written (the writer's keys and, when given,
    the lazy tensors planned for it) breaks a rule of llama.cpp's; convert checks the keys before
    the converter reshapes tensors by them, then the planned tensors."""
    shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in tensors or ()}
    problems = mmproj_problems(MmprojHeader.planned(writer, shapes), projector, tensors is not None)
    errors = [p for p in problems if p.severity == ERROR]
    if errors:
        raise UnsupportedModelError(f"{source}: its mmproj would not load in llama.cpp: {errors[0].message}")
