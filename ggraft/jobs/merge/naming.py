"""How a text decoder's tensors are named, for planning: which are layers (and how a layer is
renamed when slices renumber it), which is the embedding, and the Hugging Face name that
mergekit's filters are matched against.

Hugging Face text decoders are planned under their plain causal-LM names (``model.layers.N.*``,
``model.embed_tokens``, ``model.norm``, ``lm_head``; ``hf_merge`` brings every layout to them).
GGUF text models use llama.cpp's names (``blk.N.*``, ``token_embd``, ``output_norm``,
``output``); for filters each is translated back with gguf-py's own table
(``gguf.TensorNameMap`` of the file's architecture), so ``self_attn`` matches ``blk.N.attn_q``
and ``mlp`` matches ``blk.N.ffn_up``, as they do the names they were converted from.
"""
from __future__ import annotations

import re
from functools import cached_property

import gguf

from ggraft.errors import InputError

SUFFIXES = (".weight", ".bias")


class Naming:
    def __init__(self, layer_prefix: str, embedding: tuple[str, ...]):
        self.layer_prefix, self.embedding = layer_prefix, embedding
        self._layer = re.compile(re.escape(layer_prefix) + r"(\d+)\.(.+)")

    def layer(self, name: str) -> tuple[int, str] | None:
        """(layer index, the rest of the name) for a layer's tensor, else None."""
        m = self._layer.fullmatch(name)
        return (int(m[1]), m[2]) if m else None

    def layer_name(self, index: int, rest: str) -> str:
        return f"{self.layer_prefix}{index}.{rest}"

    def is_embedding(self, name: str) -> bool:
        return name.startswith(self.embedding)

    def hf_name(self, name: str) -> str:
        return name


class GgufNaming(Naming):
    """llama.cpp's names, translated back to transformers' for filters."""

    def __init__(self, arch: str, n_layers: int):
        super().__init__("blk.", ("token_embd.",))
        self.arch, self.n_layers = arch, n_layers

    @cached_property
    def _to_hf(self) -> dict[str, str]:
        arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.arch), None)
        if arch is None:
            raise InputError(f"filters on GGUF tensors need gguf-py's names for architecture {self.arch!r}, "
                             "which it does not know", hint="give the parameter without a filter")
        table: dict[str, str] = {}
        for hf, (_, name) in gguf.TensorNameMap(arch, max(self.n_layers, 1)).mapping.items():
            if hf.startswith("model.") or hf == "lm_head":  # transformers' causal-LM layout
                table.setdefault(name, hf)
        return table

    def hf_name(self, name: str) -> str:
        stem, suffix = name, ""
        for s in SUFFIXES:
            if name.endswith(s):
                stem, suffix = name[: -len(s)], s
        hf = self._to_hf.get(stem)
        return hf + suffix if hf else name


HF_TEXT = Naming("model.layers.", ("model.embed_tokens.",))
