"""Which tokens two text models share: each vocab's pieces turned back into the bytes they stand
for, the way llama.cpp's ``token_to_piece`` does (``src/llama-vocab.cpp``, 3697-3735):

- SentencePiece and SentencePiece-style vocabs (``tokenizer.ggml.model`` llama, t5, bert, and
  BPE vocabs whose pre-tokenizer escapes whitespace: gemma4, ...) write a space as ``▁``;
- byte-level BPE vocabs (gpt2 and the like) write every byte as one character of GPT-2's byte
  alphabet (a space is ``Ġ``, a newline ``Ċ``).

Only NORMAL tokens are paired: control tokens, the user-defined ones llama.cpp parses as special
text, byte-fallback pieces (``<0x0A>``), unknown and unused ones are left out.  Where one vocab
spells the same bytes twice, its first id is used.  The vocab is read once, as raw bytes, through
the validated header index.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from ggraft.errors import InputError
from ggraft.gguf_io.gguf_file import GGUFIndex
from ggraft.pair.vocab import BYTE_TO_UNICODE

K = gguf.Keys.Tokenizer
SPACE_MARK = "▁".encode()
#: tokenizer.ggml.model values whose pieces mark spaces with ▁ (llama.cpp: SPM, UGM, WPM vocabs)
SPACE_MARKED_MODELS = ("llama", "t5", "bert")
#: BPE vocabs (llama-vocab.cpp 1993, 2110) and the pre-tokenizers that make them escape whitespace
#: with ▁ rather than GPT-2's byte alphabet (llama-vocab.cpp 2228-2239)
BPE_MODELS = ("gpt2", "hybriddna", "whitespace", "gemma4")
SPACE_MARKED_PRE = ("gemma4", "granite-embed-multi-311m", "sarvam-moe")
#: GPT-2's byte alphabet, back to bytes (str.translate table: one character -> one latin-1 character)
_FROM_BYTE_ALPHABET = {ord(ch): chr(b) for b, ch in BYTE_TO_UNICODE.items()}


@dataclass(frozen=True)
class SharedTokens:
    """Token ids of the pieces both vocabs have, paired, ordered by the donor's id."""

    donor_ids: np.ndarray
    recipient_ids: np.ndarray
    donor_vocab: int
    recipient_vocab: int

    def __len__(self) -> int:
        return len(self.donor_ids)


def convention(index: GGUFIndex) -> str:
    """How ``index``'s vocab writes text: "space-marked" or "byte-level"; an InputError otherwise."""
    model = index.value(K.MODEL)
    pre = index.value(K.PRE)
    if model in SPACE_MARKED_MODELS or (model in BPE_MODELS and pre in SPACE_MARKED_PRE):
        return "space-marked"
    if model in BPE_MODELS:
        return "byte-level"
    raise InputError(f"{index.path}: tokenizer model {model!r}: ggraft bridge reads SentencePiece-style "
                     f"({', '.join(SPACE_MARKED_MODELS)}) and BPE ({', '.join(BPE_MODELS)}) vocabs")


def _from_byte_alphabet(piece: bytes) -> bytes:
    text = piece.decode("utf-8", errors="replace").translate(_FROM_BYTE_ALPHABET)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:  # a character outside the byte alphabet: kept as its own UTF-8
        return b"".join(ch.encode("latin-1") if ord(ch) < 256 else ch.encode() for ch in text)


def piece_bytes(index: GGUFIndex) -> dict[bytes, int]:
    """{bytes a NORMAL token stands for: its first id} for a text GGUF's vocab."""
    field = index.fields.get(K.LIST)
    if field is None or field.item_type != gguf.GGUFValueType.STRING or not field.count:
        raise InputError(f"{index.path}: has no vocab ({K.LIST})")
    kind = convention(index)
    pieces = index.strings(field, raw=True)
    types_field = index.fields.get(K.TOKEN_TYPE)
    if types_field is not None and types_field.count == len(pieces):
        normal = np.nonzero(index.numbers(types_field) == gguf.TokenType.NORMAL)[0].tolist()
    else:  # llama.cpp reads a vocab without types as all NORMAL
        normal = range(len(pieces))
    found: dict[bytes, int] = {}
    for i in normal:
        piece = pieces[i]
        text = piece.replace(SPACE_MARK, b" ") if kind == "space-marked" else _from_byte_alphabet(piece)
        if text and text not in found:
            found[text] = i
    return found


def shared_tokens(donor: GGUFIndex, recipient: GGUFIndex) -> SharedTokens:
    """The tokens both vocabs have (empty arrays when none)."""
    theirs = piece_bytes(recipient)
    pairs = sorted((i, theirs[text]) for text, i in piece_bytes(donor).items() if text in theirs)
    ids = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    sizes = [index.fields[K.LIST].count for index in (donor, recipient)]
    return SharedTokens(ids[:, 0].copy(), ids[:, 1].copy(), *sizes)
