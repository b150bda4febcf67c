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

_T = gguf.MODEL_TENSOR
#: llama.cpp's names of what comes before a vision tower's blocks (mergekit's pre_weights, t = 0)
VISION_BEFORE = tuple(gguf.TENSOR_NAMES[t] for t in (_T.V_ENC_EMBD_PATCH, _T.V_ENC_EMBD_POS, _T.V_ENC_EMBD_CLS,
                                                    _T.V_PRE_NORM))
VISION_BLOCK = re.compile(re.escape(gguf.TENSOR_NAMES[_T.V_ENC_ATTN_Q].split("{bid}")[0]) + r"(\d+)\.")


class VisionNaming(Naming):
    """A vision module's tensors, numbered as the family's converter names them for llama.cpp
    (``mmproj``: canonical name -> mmproj name): ``v.blk.N.*`` is layer N of the tower; the patch,
    position and class embeddings and the pre-norm come before the layers (t = 0 for gradients),
    everything else after them (t = 1), the projector included, as mergekit's pre and post weights."""

    def __init__(self, mmproj: dict[str, str | None]):
        self.mmproj = mmproj

    def layer(self, name: str) -> tuple[int, str] | None:
        m = VISION_BLOCK.match(self.mmproj.get(name) or "")
        return (int(m[1]), name) if m else None

    def layer_name(self, index: int, rest: str) -> str:
        raise InputError("slices stack the text decoder's layers only")  # refused earlier, in forms

    def is_embedding(self, name: str) -> bool:
        return (self.mmproj.get(name) or "").startswith(VISION_BEFORE)
