"""What a Hugging Face checkpoint's tensors are, for merging: language backbone, vision tower or
projector, under names that line up across the layouts checkpoints are saved in.

A VLM's language model and the plain LLM it was made from carry the same tensors under
different prefixes, so backbone names are brought to the plain causal-LM form::

    language_model.model.X   (VLMs saved by transformers 4.x)   -> model.X
    language_model.lm_head.X                                    -> lm_head.X
    model.language_model.X   (VLMs saved by transformers 5)     -> model.X
    model.X, lm_head.X       (plain LLMs, and VLMs whose vision side sits beside, e.g. visual.*)

The vision side is split into mergekit's modules (``vision_tower``, ``multi_modal_projector``)
with the naming knowledge of the family's converter, its one home: its ``layout_aliases`` bring
every saved layout to one canonical name, its ``vision_prefixes`` say what is vision, and the
mmproj name it gives a tensor says which part: the projector is what llama.cpp calls ``mm.*``.
A tensor that is neither backbone nor under the converter's vision prefixes belongs to no
module, and a modular merge refuses it by name rather than drop it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ggraft.errors import InputError, UnsupportedModelError
from ggraft.gguf_io import numeric
from ggraft.hf.checkpoint import Checkpoint
from .buffers import Scratch
from .config import ModelSpec
from .forms import PROJECTOR, TEXT, VISION

#: (saved prefix, canonical prefix) for a backbone nested in a VLM, and for a plain layout
NESTED = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
          ("model.language_model.", "model."), ("lm_head.", "lm_head."))
PLAIN = (("model.", "model."), ("lm_head.", "lm_head."))
PROJECTOR_PREFIX = "mm."  # llama.cpp's names of projector tensors (gguf-py's V_MM* / V_MMPROJ*)


@dataclass
class HfInput:
    """A checkpoint split into its language backbone (canonical name -> saved name) and the rest."""

    spec: ModelSpec
    ckpt: Checkpoint
    backbone: dict[str, str] = field(default_factory=dict)
    vision: list[str] = field(default_factory=list)
    rules: tuple[tuple[str, str], ...] = PLAIN
    scratch: Scratch = field(default_factory=Scratch)
    #: the vision side's canonical names -> the mmproj names its converter gives them (None: skipped)
    mmproj_names: dict[str, str | None] = field(default_factory=dict)
    unknown_family: str = ""  # why no converter takes it (see ``converter``)

    @property
    def label(self) -> str:
        return self.spec.ref

    @property
    def is_vlm(self) -> bool:
        return bool(self.vision)

    @classmethod
    def open(cls, spec: ModelSpec) -> "HfInput":
        if not Path(spec.path).is_dir():
            raise InputError(f"{spec.ref}: is not a Hugging Face folder (all inputs of a merge must be of one kind)")
        model = cls(spec, Checkpoint(spec.path))
        names = list(model.ckpt.names())
        nested = any(n.startswith(("language_model.", "model.language_model.")) for n in names)
        model.rules = NESTED if nested else PLAIN
        for name in names:
            for saved, canonical in model.rules:
                if name.startswith(saved):
                    key = canonical + name[len(saved):]
                    if key in model.backbone:
                        raise InputError(f"{spec.ref}: both {model.backbone[key]!r} and {name!r} are the "
                                         f"language model's {key!r}")
                    model.backbone[key] = name
                    break
            else:
                model.vision.append(name)
        if not model.backbone:
            raise InputError(f"{spec.ref}: no language-model tensors (model.*, lm_head.*, language_model.*)")
        return model

    def saved_name(self, canonical: str) -> str:
        """The name a backbone tensor has (or would have, for a new layer) in this layout."""
        if canonical in self.backbone:
            return self.backbone[canonical]
        for saved, prefix in self.rules:
            if canonical.startswith(prefix) and any(v.startswith(saved) for v in self.backbone.values()):
                return saved + canonical[len(prefix):]
        return canonical

    @cached_property
    def converter(self):
        """The converter of this checkpoint's family, or None when no registered one takes it."""
        from ggraft.mmproj.converter import converter_for

        try:
            return converter_for(self.ckpt)
        except UnsupportedModelError as e:
            self.unknown_family = e.message
            return None

    @cached_property
    def modules(self) -> dict[str, dict[str, str]]:
        """mergekit's modules: module -> {canonical name -> saved name}, every tensor in one."""
        out: dict[str, dict[str, str]] = {TEXT: dict(self.backbone), VISION: {}, PROJECTOR: {}}
        if not self.vision:
            return out
        conv = self.converter
        if conv is None:
            raise InputError(f"{self.label}: its vision side cannot be split into modules: {self.unknown_family}",
                             hint="ggraft knows a family's modules from its converter")
        for name in self.vision:
            canonical = conv.canonical(name)
            if not canonical.startswith(conv.vision_prefixes):
                raise InputError(f"{self.label}: tensor {name!r} belongs to no module (neither the language model "
                                 f"nor under the {conv.family} converter's vision prefixes "
                                 f"{', '.join(conv.vision_prefixes)})",
                                 hint="a modular merge accounts for every tensor; ggraft will not drop it")
            mmproj = None if conv.skip(canonical) else conv.rename(canonical)
            self.mmproj_names[canonical] = mmproj
            out[PROJECTOR if mmproj and mmproj.startswith(PROJECTOR_PREFIX) else VISION][canonical] = name
        return out


class CheckpointRows:
    """A checkpoint tensor as rows (first dimension), read a few rows at a time (float16: into
    its model's scratch)."""

    def __init__(self, ckpt: Checkpoint, name: str, scratch: Scratch):
        self.ckpt, self.name, self.scratch = ckpt, name, scratch
        shape = ckpt.shape(name)
        self.n_rows = shape[0] if len(shape) > 1 else 1
        self.row_len = int(np.prod(shape[1:] if len(shape) > 1 else shape, dtype=np.int64))

    def read(self, first: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        if len(self.ckpt.shape(self.name)) < 2:
            rows = np.asarray(self.ckpt.load(self.name)).reshape(1, -1)
        else:
            rows = self.ckpt.load_rows(self.name, first, stop - first).reshape(stop - first, self.row_len)
        if rows.dtype == np.float16:
            out = self.scratch.array(rows.shape, np.float32) if out is None else out
            return numeric.to_float32(rows, out=out)
        if out is None:
            return rows
        out[...] = rows
        return out

    def release(self, first: int, stop: int) -> None:
        pass
