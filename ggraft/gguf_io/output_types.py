"""The one vocabulary of output types: every type ggraft writes, and what each part of ggraft
needs to know of it.  ``OUTPUT_TYPES`` is the table; everything else derives from it: the names
``--outtype`` takes (and its help texts), the GGML tensor type and ``general.file_type`` a GGUF
is written with (``output.OUTTYPES``, ``output.FILE_TYPES``), the dtype spellings of a merge
config (mergekit's), the safetensors and ``config.json`` dtypes of an HF merge, and the bar
``verify`` holds a file of each type to.

Import-light (no gguf, no numpy: the GGML names resolve when first asked for), so the CLI's
help texts are generated from it without loading gguf.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import gguf


@dataclass(frozen=True)
class OutputType:
    name: str  # what --outtype takes and every report says: "f16"
    ggml: str  # its gguf.GGMLQuantizationType member
    file_type: str  # its gguf.LlamaFileType member, written as general.file_type
    dtype: str | None  # transformers' / mergekit's spelling (config.json's dtype); None: no HF tensor type
    safetensors: str | None  # the safetensors dtype an HF merge writes it as
    bar: float  # verify: the minimum per-token cosine against transformers for a file of this type
    aliases: tuple[str, ...] = ()  # other spellings a merge config may use

    @property
    def ggml_type(self) -> gguf.GGMLQuantizationType:
        import gguf

        return gguf.GGMLQuantizationType[self.ggml]

    @property
    def llama_file_type(self) -> gguf.LlamaFileType:
        import gguf

        return gguf.LlamaFileType[self.file_type]

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every name a merge config may give it by (``dtype:`` / ``out_dtype:``)."""
        return (self.dtype, *self.aliases, self.name) if self.dtype else (*self.aliases, self.name)


OUTPUT_TYPES: tuple[OutputType, ...] = (
    OutputType("f32", "F32", "ALL_F32", "float32", "F32", 0.9999, aliases=("fp32",)),
    OutputType("f16", "F16", "MOSTLY_F16", "float16", "F16", 0.999, aliases=("fp16",)),
    OutputType("bf16", "BF16", "MOSTLY_BF16", "bfloat16", "BF16", 0.999),
    OutputType("q8_0", "Q8_0", "MOSTLY_Q8_0", None, None, 0.99),
)
NAMES = tuple(t.name for t in OUTPUT_TYPES)
#: what tensors are written as when nothing says otherwise (convert; graft and bridge from a checkpoint)
DEFAULT = "f16"
#: the types an HF merge writes (those with a safetensors dtype)
HF_TYPES = tuple(t for t in OUTPUT_TYPES if t.safetensors)
#: the bar for a file of a type ggraft does not write: the loosest of the table's
LOOSEST_BAR = min(t.bar for t in OUTPUT_TYPES)


def listed(names: Iterable[str], last: str = "or") -> str:
    """``a, b, c or d``."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


#: the choices, as help texts give them: "f32, f16, bf16 or q8_0"
CHOICES = listed(NAMES)


def alternatives(name: str) -> str:
    """``name`` and the others, as a hint gives them: "f16 (or f32, bf16, q8_0)"."""
    return f"{name} (or {', '.join(n for n in NAMES if n != name)})"


def bars_described() -> str:
    """verify's bars, types of one bar together: "0.9999 f32, 0.999 f16/bf16, 0.99 q8_0"."""
    by_bar: dict[float, list[str]] = {}
    for t in OUTPUT_TYPES:
        by_bar.setdefault(t.bar, []).append(t.name)
    return ", ".join(f"{bar:g} {'/'.join(names)}" for bar, names in by_bar.items())


@functools.cache
def _by_name() -> dict[str, OutputType]:
    return {t.name: t for t in OUTPUT_TYPES}


@functools.cache
def _by_spelling() -> dict[str, OutputType]:
    return {s: t for t in OUTPUT_TYPES for s in t.spellings}


@functools.cache
def _by_file_type() -> dict[Any, OutputType]:
    return {t.llama_file_type: t for t in OUTPUT_TYPES}


@functools.cache
def _by_safetensors() -> dict[str, OutputType]:
    return {t.safetensors: t for t in HF_TYPES}


def by_name(name: str) -> OutputType | None:
    return _by_name().get(name)


def by_spelling(spelling: str) -> OutputType | None:
    """The type a merge config's ``dtype`` names (mergekit's spellings and ggraft's names)."""
    return _by_spelling().get(spelling)


def by_file_type(value: Any) -> OutputType | None:
    """The type a GGUF's ``general.file_type`` value says, if ggraft writes it."""
    return _by_file_type().get(value)


def by_safetensors(dtype: str) -> OutputType | None:
    """The type of a safetensors dtype ("BF16"), if an HF merge writes it."""
    return _by_safetensors().get(dtype)
