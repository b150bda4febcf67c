"""A checkpoint's configuration, validated where it is read.

config.json, params.json and preprocessor_config.json come from anyone; a converter reads
``config["vision_config"]["hidden_size"]`` and trusts it.  ``ConfigSection`` is the JSON object
as a ``dict`` whose known keys are checked on ``get`` and ``[]`` against ``RULES`` (one line per
key: what it must be), so that ``hidden_size: -1``, ``"big"``, ``null`` or ``1e12``, a
``vision_config`` that is a list or an ``image_mean`` of strings is one ``InputError`` naming the
file, the key and what was expected, and a nested object comes back as a section of its own.
Layer counts are bounded by the numbered blocks the checkpoint's tensors hold (``block_limit``),
so ``num_hidden_layers: 100000`` is refused before anything builds 100000 blocks of names.
Keys not in ``RULES`` pass through unchanged, as do ``items()`` and iteration.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ggraft.errors import InputError

_ABSENT = object()
WIDTH_MAX = 1 << 18  # 262144: far above any released model's widths
SIDE_MAX = 1 << 15  # pixels of an image side
COUNT_MAX = 1 << 12  # heads, channels, merge factors
LAYERS_WITHOUT_BLOCKS = 1 << 10  # the bound on layer counts when no tensor name is numbered


@dataclass(frozen=True)
class Rule:
    """What one key's value must be: ``kind`` is int, number, str, bool, object, int_list, ints
    (an int or a list of them), numbers3 (a list of three numbers) or str_list."""

    kind: str
    low: float | None = None
    high: float | None = None
    nullable: bool = False  # null reads as absent (the default applies)
    layers: bool = False  # bounded by the checkpoint's numbered blocks


def _ints(low: int, high: int, **kw) -> Rule:
    return Rule("int", low, high, **kw)


RULES: dict[str, Rule] = {
    **{k: _ints(1, WIDTH_MAX) for k in ("hidden_size", "intermediate_size", "embed_dim", "out_hidden_size",
                                        "projection_dim", "dim", "hidden_dim")},
    "head_dim": _ints(1, WIDTH_MAX, nullable=True),
    **{k: _ints(1, COUNT_MAX) for k in ("num_attention_heads", "num_heads", "n_heads", "num_channels",
                                        "spatial_merge_size", "scale_factor", "downsample_factor",
                                        "temporal_patch_size", "in_chans")},
    "num_key_value_heads": _ints(1, COUNT_MAX, nullable=True),
    "n_kv_heads": _ints(1, COUNT_MAX, nullable=True),
    **{k: _ints(1, SIDE_MAX) for k in ("image_size", "patch_size", "window_size", "height", "width")},
    #: a side (CLIP-style processors) or a pixel count (Qwen-style: min/max pixels under transformers 5)
    **{k: _ints(1, (1 << 31) - 1) for k in ("longest_edge", "shortest_edge")},
    **{k: _ints(1, 1 << 24) for k in ("num_patches", "mm_tokens_per_image", "num_position_embeddings",
                                      "vocab_size")},
    **{k: _ints(0, 1 << 24, layers=True) for k in ("num_hidden_layers", "depth", "n_layers")},
    **{k: Rule("number", 0, 1) for k in ("layer_norm_eps", "rms_norm_eps", "norm_eps")},
    "rope_theta": Rule("number", 0, 1e12, nullable=True),
    "mlp_ratio": Rule("number", 0, COUNT_MAX),
    **{k: Rule("str") for k in ("model_type", "hidden_act", "projector_hidden_act",
                                "vision_feature_select_strategy", "mm_projector_id")},
    **{k: Rule("bool") for k in ("do_image_splitting", "projector_bias", "adapter_bias")},
    **{k: Rule("object", nullable=True) for k in ("vision_config", "text_config", "rope_parameters",
                                                  "rope_scaling", "size", "image_processor",
                                                  "vision_encoder", "multimodal", "vision_encoder_args")},
    "vision_feature_layer": Rule("ints", -(1 << 12), 1 << 12),
    **{k: Rule("int_list", 0, 1 << 12) for k in ("fullatt_block_indexes", "deepstack_visual_indexes")},
    **{k: Rule("numbers3", -1e6, 1e6) for k in ("image_mean", "image_std")},
    "architectures": Rule("str_list"),
}

_EXPECTED = {"str": "a string", "bool": "true or false", "object": "a JSON object",
             "numbers3": "a list of 3 numbers", "str_list": "a non-empty list of strings"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _in(v: Any, rule: Rule) -> bool:
    return (rule.low is None or v >= rule.low) and (rule.high is None or v <= rule.high)


def _expected(rule: Rule, high: float | None) -> str:
    if rule.kind == "int":
        return f"an integer from {rule.low} to {high}"
    if rule.kind == "number":
        return f"a number above {rule.low} and at most {rule.high:g}"
    if rule.kind in ("int_list", "ints"):
        one = f"integers from {rule.low} to {rule.high}"
        return f"a list of {one}" if rule.kind == "int_list" else f"an integer or a list of {one}"
    return _EXPECTED[rule.kind]


def _valid(v: Any, rule: Rule, high: float | None) -> bool:
    kind = rule.kind
    if kind == "int":
        return _is_int(v) and rule.low <= v <= high
    if kind == "number":
        return _is_number(v) and rule.low < v <= rule.high
    if kind in ("str", "bool", "object"):
        return isinstance(v, {"str": str, "bool": bool, "object": dict}[kind])
    if kind == "ints" and _is_int(v):
        return _in(v, rule)
    if kind in ("int_list", "ints"):
        return isinstance(v, list) and all(_is_int(x) and _in(x, rule) for x in v)
    if kind == "numbers3":
        return isinstance(v, list) and len(v) == 3 and all(_is_number(x) and _in(x, rule) for x in v)
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)  # str_list


def _shown(v: Any) -> str:
    text = json.dumps(v, default=str) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


class ConfigSection(dict):
    """A JSON object of a config file whose known keys are validated when read (module docstring)."""

    def __init__(self, data: dict, file: Path, where: str = "", block_limit: Callable[[], int] | None = None):
        super().__init__(data)
        self.file, self.where, self.block_limit = Path(file), where, block_limit

    def _checked(self, key: str, value: Any) -> Any:
        rule = RULES.get(key) if isinstance(key, str) else None
        if rule is None:
            return self._section(key, value) if isinstance(value, dict) else value
        if value is None and rule.nullable:
            return _ABSENT
        high = rule.high
        if rule.layers and self.block_limit is not None:
            blocks = self.block_limit()
            high = min(high, blocks or LAYERS_WITHOUT_BLOCKS)
            if blocks and _is_int(value) and value > high:
                raise InputError(f"{self.file}: {self.where}{key} is {value}, but the checkpoint's tensors hold "
                                 f"at most {high} numbered blocks", "the config does not describe these weights")
        if not _valid(value, rule, high):
            raise InputError(f"{self.file}: {self.where}{key} is {_shown(value)}; expected {_expected(rule, high)}")
        return self._section(key, value) if isinstance(value, dict) else value

    def _section(self, key: str, value: dict) -> "ConfigSection":
        return ConfigSection(value, self.file, f"{self.where}{key}.", self.block_limit)

    def __getitem__(self, key: str) -> Any:
        value = self._checked(key, super().__getitem__(key))
        if value is _ABSENT:
            return None
        return value

    def get(self, key: str, default: Any = None) -> Any:
        if not super().__contains__(key):
            return default
        value = self._checked(key, super().__getitem__(key))
        return default if value is _ABSENT else value

    def validate(self, *keys: str) -> None:
        """Check ``keys`` now (those present), e.g. everything a file's reader relies on."""
        for key in keys:
            self.get(key)


def block_limit_of(names: Callable[[], Any]) -> Callable[[], int]:
    """The number of numbered blocks (``layers.N.``, ``blocks.N.``, ``layer.N.``, ``h.N.``) the
    tensor ``names`` hold: the largest N + 1, computed once when first asked (0 while none are known)."""
    import re

    pattern = re.compile(r"(?:^|\.)(?:layers|blocks|layer|h)\.(\d+)\.")
    found: list[int] = []

    def limit() -> int:
        if not found:
            listed = list(names())
            if not listed:  # the tensors are not known yet: no bound from them
                return 0
            found.append(max((int(m.group(1)) for n in listed if (m := pattern.search(n))), default=-1) + 1)
        return found[0]

    return limit
