"""``ggraft audit``: latent vision tokens in a tokenizer, and which converters could donate a tower.

A text-only release of a multimodal family usually keeps the family's image tokens ([IMG_BREAK],
<start_of_image>, <|vision_start|> ...): the tell-tale that a vision tower of that family can be
grafted on.  Reads a GGUF vocab (through ``gguf_file.scan_gguf``) or a Hugging Face folder's
tokenizer.json / tokenizer_config.json / tekken.json (and tokenizer.model when sentencepiece is
installed).  The conventions are each family's (``ggraft.mmproj.facts.conventions``).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import gguf

from ggraft.mmproj.facts import Convention, conventions
from ggraft.errors import InputError

K = gguf.Keys
TOKEN_KIND = {gguf.TokenType.CONTROL: "control", gguf.TokenType.USER_DEFINED: "user-defined",
              gguf.TokenType.NORMAL: "normal", gguf.TokenType.UNUSED: "unused", gguf.TokenType.BYTE: "byte",
              gguf.TokenType.UNKNOWN: "unknown"}


@dataclass
class LatentToken:
    token: str
    id: int
    kind: str  # control / user-defined / special / normal ...
    families: list[str]

    @property
    def special(self) -> bool:
        return self.kind in ("control", "user-defined", "special")


@dataclass
class AuditReport:
    source: str
    tokenizer: str  # where the vocab came from
    vocab_size: int
    tokens: list[LatentToken] = field(default_factory=list)
    donors: dict[str, list[str]] = field(default_factory=dict)  # family -> ggraft converters

    @property
    def families(self) -> list[dict[str, Any]]:
        """Each family seen, with how many of its convention's tokens (or tile patterns) are present;
        best-covered first (a lone <image> fits LLaVA fully but Idefics3 only in part)."""
        out = []
        for c in conventions():
            mine = [t.token for t in self.tokens if c.family in t.families]
            if not mine:
                continue
            found = len([tok for tok in c.tokens if tok in mine])
            found += len([p for p in c.patterns if any(re.fullmatch(p, tok) for tok in mine)])
            out.append({"family": c.family, "found": found, "expected": len(c.tokens) + len(c.patterns)})
        return sorted(out, key=lambda f: (-f["found"] / f["expected"], -f["found"]))

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "tokenizer": self.tokenizer, "vocab_size": self.vocab_size,
                "tokens": [{**asdict(t), "special": t.special} for t in self.tokens],
                "families": self.families, "donors": self.donors}


def _matcher() -> tuple[dict[str, list[str]], list[tuple[re.Pattern, str]]]:
    exact: dict[str, list[str]] = {}
    for c in conventions():
        for tok in c.tokens:
            exact.setdefault(tok, []).append(c.family)
    patterns = [(re.compile(p), c.family) for c in conventions() for p in c.patterns]
    return exact, patterns


def classify(vocab: Iterator[tuple[str, int, str]]) -> list[LatentToken]:
    """The latent vision tokens among (token, id, kind) triples, with the families they belong to."""
    exact, patterns = _matcher()
    found = []
    for token, token_id, kind in vocab:
        families = list(exact.get(token, ()))
        families += [fam for pat, fam in patterns if pat.fullmatch(token) and fam not in families]
        if families:
            found.append(LatentToken(token, token_id, kind, families))
    return sorted(found, key=lambda t: t.id)


def _gguf_vocab(path: Path) -> tuple[str, int, Iterator[tuple[str, int, str]]]:
    from ggraft.gguf_io.gguf_file import scan_gguf

    index = scan_gguf(path, "GGUF file")
    if index.value(K.General.ARCHITECTURE) == "clip":
        raise InputError(f"{path}: is an mmproj, which has no tokenizer; give the text model")
    tokens = index.fields.get(K.Tokenizer.LIST)
    if tokens is None or tokens.item_type != gguf.GGUFValueType.STRING:
        raise InputError(f"{path}: has no tokenizer.ggml.tokens (no vocab to audit)")
    types_field = index.fields.get(K.Tokenizer.TOKEN_TYPE)
    types = index.numbers(types_field) if types_field is not None and types_field.item_type not in (
        gguf.GGUFValueType.STRING, None) and types_field.count == tokens.count else None

    def items() -> Iterator[tuple[str, int, str]]:
        for i in range(tokens.count):
            kind = TOKEN_KIND.get(int(types[i]), "normal") if types is not None else "normal"
            yield index.string_at(tokens, i), i, kind

    return f"GGUF vocab ({index.value(K.Tokenizer.MODEL, 'unknown')})", tokens.count, items()


def _json_object(path: Path) -> dict[str, Any]:
    from ggraft.hf.checkpoint import read_json

    data = read_json(path, path.name)
    if not isinstance(data, dict):
        raise InputError(f"{path}: is not a JSON object")
    return data


def _hf_vocab(folder: Path) -> tuple[str, int, Iterator[tuple[str, int, str]]]:
    entries: dict[int, tuple[str, str]] = {}  # id -> (token, kind)
    sources = []
    tok_json, config, tekken = folder / "tokenizer.json", folder / "tokenizer_config.json", folder / "tekken.json"
    if tok_json.is_file():
        data = _json_object(tok_json)
        model = data.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict):
            entries.update({i: (str(t), "normal") for t, i in vocab.items() if isinstance(i, int)})
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            entries.update({i: (str(p[0]), "normal") for i, p in enumerate(vocab) if isinstance(p, list) and p})
        added_tokens = data.get("added_tokens")
        for added in added_tokens if isinstance(added_tokens, list) else ():
            if isinstance(added, dict) and isinstance(added.get("id"), int):
                entries[added["id"]] = (str(added.get("content")), "special" if added.get("special") else "normal")
        sources.append("tokenizer.json")
    elif (folder / "tokenizer.model").is_file():
        try:
            import sentencepiece as spm

            proc = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            entries.update({i: (proc.id_to_piece(i), "special" if proc.is_control(i) else "normal")
                            for i in range(proc.get_piece_size())})
            sources.append("tokenizer.model")
        except ImportError:
            pass
        except (RuntimeError, OSError) as e:
            raise InputError(f"{folder / 'tokenizer.model'}: not a readable sentencepiece model ({e})") from None
    if config.is_file():
        decoder = _json_object(config).get("added_tokens_decoder")
        for i, added in (decoder.items() if isinstance(decoder, dict) else ()):
            if isinstance(added, dict) and str(i).isdigit():
                entries[int(i)] = (str(added.get("content")), "special" if added.get("special") else "normal")
        sources.append("tokenizer_config.json")
    if tekken.is_file():
        specials = _json_object(tekken).get("special_tokens")
        for s in specials if isinstance(specials, list) else ():
            if isinstance(s, dict) and isinstance(s.get("rank"), int):
                entries[s["rank"]] = (str(s.get("token_str")), "control" if s.get("is_control", True) else "normal")
        sources.append("tekken.json")
    if not sources:
        raise InputError(f"{folder}: no tokenizer.json, tokenizer_config.json, tekken.json or tokenizer.model to audit")
    return " + ".join(sources), len(entries), ((tok, i, kind) for i, (tok, kind) in sorted(entries.items()))


def donors(families: list[str]) -> dict[str, list[str]]:
    """ggraft converters whose projector type serves each family's convention."""
    from ggraft.mmproj.converter import discover

    by_projector: dict[str, list[str]] = {}
    for classes in discover().values():
        for cls in classes:
            label = f"{cls.family or cls.__name__} ({', '.join(cls.architectures)})"
            if label not in by_projector.setdefault(cls.projector_type, []):
                by_projector[cls.projector_type].append(label)
    by_family: dict[str, Convention] = {c.family: c for c in conventions()}
    return {fam: [d for p in by_family[fam].projectors for d in by_projector.get(p, [])] for fam in families}


def audit(path: str | Path) -> AuditReport:
    """Latent vision tokens of a GGUF vocab or a Hugging Face tokenizer folder."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    tokenizer, size, vocab = _hf_vocab(path) if path.is_dir() else _gguf_vocab(path)
    report = AuditReport(str(path), tokenizer, size, classify(vocab))
    report.donors = donors([f["family"] for f in report.families])
    return report
