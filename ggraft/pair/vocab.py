"""The text model's vocab, looked up without decoding it: the forms a vocab may store a piece of
text as (byte-level BPE, SentencePiece), and the token ids and types of pieces."""
from __future__ import annotations

from dataclasses import dataclass

import gguf

from ggraft.gguf_io.gguf_file import GGUFIndex

K = gguf.Keys


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet (how 'gpt2' vocabs store "\\n" as "Ċ")."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


BYTE_TO_UNICODE = _bytes_to_unicode()


def vocab_forms(text: str, tokenizer_model: str | None) -> list[str]:
    """The pieces a vocab may store ``text`` as (llama.cpp's token_to_piece undoes these)."""
    forms = [text]
    if tokenizer_model == "gpt2":
        forms.append("".join(BYTE_TO_UNICODE[b] for b in text.encode()))
    elif tokenizer_model == "llama":
        forms.append(text.replace(" ", "▁"))
        if len(text.encode()) == 1:
            forms.append(f"<0x{text.encode()[0]:02X}>")
    return list(dict.fromkeys(forms))


@dataclass
class Vocab:
    """The text model's vocab, looked up without decoding it."""

    index: GGUFIndex
    model: str | None

    @property
    def size(self) -> int:
        f = self.index.fields.get(K.Tokenizer.LIST)
        return f.count if f is not None and f.item_type == gguf.GGUFValueType.STRING else 0

    def find(self, texts: list[str]) -> dict[str, int]:
        """Token id of each text found as one token (in any of its stored forms)."""
        forms = {text: vocab_forms(text, self.model) for text in texts}
        ids = self.index.find_strings(K.Tokenizer.LIST, [f for fs in forms.values() for f in fs])
        return {text: next(ids[f] for f in fs if f in ids) for text, fs in forms.items() if any(f in ids for f in fs)}

    def token_type(self, token_id: int) -> int | None:
        f = self.index.fields.get(K.Tokenizer.TOKEN_TYPE)
        if f is None or f.type != gguf.GGUFValueType.ARRAY or f.item_type == gguf.GGUFValueType.STRING \
                or token_id >= f.count:
            return None
        return int(self.index.numbers(f)[token_id])
