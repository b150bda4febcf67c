"""The shapes of what a family knows besides its tensors: how its tokenizer marks images
(``Convention``, for ``ggraft audit``) and the known ways the llama.cpp runtime departs from
transformers for it (``RuntimeDefect``, for ``ggraft check`` and ``ggraft verify``).

A converter declares both as class attributes (``Converter.convention``,
``Converter.runtime_defects``); ``conventions()`` and ``runtime_defects()`` gather them from the
registry.  Families ggraft does not convert yet keep their conventions in ``OTHER_CONVENTIONS``
until a converter takes them over (a converter's convention replaces the row of the same family).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Convention:
    """How a family's tokenizer marks images: exact tokens and regex patterns (for numbered tiles)."""

    family: str
    tokens: tuple[str, ...]
    patterns: tuple[str, ...] = ()
    projectors: tuple[str, ...] = ()  # projector types of mmprojs built for this family


@dataclass(frozen=True)
class RuntimeDefect:
    """A known way llama.cpp's runtime departs from transformers; no mmproj can compensate."""

    projector: str
    summary: str
    reference: str
    #: newest llama-cpp-python release it was seen in (older ones share the code)
    seen_up_to: str
    #: the defect shows only when the mmproj has this tensor ("" = always)
    with_tensor: str = ""
    #: ... and not when this key holds this value (e.g. a window size the runtime happens to use)
    unless_key: tuple[str, Any] | None = None
    #: boundary tokens mtmd.cpp inserts for this projector that the family's own vocabulary does not have
    #: (it spells them otherwise): ``check`` reports them missing as this defect (a warning: the pair runs),
    #: not as a text model of another family (an error)
    boundary_tokens: tuple[str, ...] = ()
    #: what departs: the image embeddings, or the prompt around them (the markers mtmd puts or omits)
    affects: str = "embeddings"

    def applies(self, projector: str | None, has_tensor: Callable[[str], bool], value: Callable[[str], Any],
                installed: str) -> bool:
        if self.projector != projector or not installed[:1].isdigit():
            return False
        if self.with_tensor and not has_tensor(self.with_tensor):
            return False
        if self.unless_key is not None and value(self.unless_key[0]) == self.unless_key[1]:
            return False
        return _version(installed) <= _version(self.seen_up_to)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


#: tokenizer conventions of families without a ggraft converter yet, from each family's
#: tokenizer and processor (transformers' processing_<family>.py)
OTHER_CONVENTIONS: tuple[Convention, ...] = (
    Convention("Kimi-VL", ("<|media_start|>", "<|media_end|>", "<|media_pad|>", "<|media_begin|>"),
               projectors=("kimivl", "kimik25")),
    Convention("dots.ocr", ("<|img|>", "<|endofimg|>", "<|imgpad|>"), projectors=("dots_ocr",)),
    Convention("Step3-VL", ("<im_start>", "<im_end>", "<patch_start>", "<patch_end>", "<patch_newline>"),
               projectors=("step3vl",)),
)


def conventions() -> tuple[Convention, ...]:
    """Every known convention: the converters' (merged by family name, in registry order),
    then ``OTHER_CONVENTIONS`` rows no converter has taken over."""
    from .converter import discover

    merged: dict[str, Convention] = {}
    for classes in discover().values():
        for cls in classes:
            if cls.convention is None:
                continue
            c = Convention(cls.convention.family, cls.convention.tokens, cls.convention.patterns,
                           tuple(dict.fromkeys((*cls.convention.projectors, cls.projector_type))))
            if c.family in merged:  # several converters (projector types) share one tokenizer convention
                seen = merged[c.family]
                c = Convention(c.family, seen.tokens, seen.patterns,
                               seen.projectors + tuple(p for p in c.projectors if p not in seen.projectors))
            merged[c.family] = c
    return (*merged.values(), *(c for c in OTHER_CONVENTIONS if c.family not in merged))


def runtime_defects() -> tuple[RuntimeDefect, ...]:
    """Every converter's known runtime defects."""
    from .converter import discover

    seen: dict[int, RuntimeDefect] = {}
    for classes in discover().values():
        for cls in classes:
            for d in cls.runtime_defects:
                seen.setdefault(id(d), d)
    return tuple(seen.values())
