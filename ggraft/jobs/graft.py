"""``ggraft graft``: a donor's vision tower and projector, fitted to a text-only recipient.

Mistral ships text-only releases (Devstral, Magistral) whose vocab still carries [IMG],
[IMG_BREAK] and [IMG_END].  Re-using another model's mmproj with them leaves the *donor's*
[IMG_BREAK] row in the file; a graft takes everything that belongs to the language model from
the recipient instead: each text-model row the family's mmproj carries (``text_rows``) is the
recipient's own ``token_embd`` row, dequantized from whatever type the text GGUF holds.

Before anything is written the graft checks that the projector's width is the recipient's
embedding width and that the family's image tokens are special tokens of the recipient's vocab
with the ids the donor uses.  The mmproj records where it came from (``ggraft.donor``,
``ggraft.recipient``, ``ggraft.recipient_header_sha256``, ``ggraft.version``).

The donor is a checkpoint folder (transformers or Mistral's native layout), converted with its
family's converter, or an existing mmproj GGUF, copied key by key and tensor by tensor.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ggraft import __version__
from ggraft.gguf_io import gguf_file
from ggraft.gguf_io import output, output_types
from ggraft.mmproj import writer as mmproj
from ggraft.hf.checkpoint import open_checkpoint
from ggraft.mmproj.converter import Converter, Lazy, Recipient, converter_for, discover, in_memory
from ggraft.errors import InputError

TOKEN_EMBD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
#: token types llama.cpp parses as special tokens in text (llama-vocab.cpp, parse_special)
SPECIAL_TYPES = (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)
#: where an mmproj written by ggraft records its image tokens and their ids
P = output.PROVENANCE_PREFIX


# -- the recipient's vocab ---------------------------------------------------------------------
def vocab_tokens(index: gguf_file.GGUFIndex, wanted: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """{token: (id, llama token type)} for the ``wanted`` tokens a text GGUF's vocab has (as in
    llama.cpp, a piece listed twice means its last id).  Looked up in the raw header bytes, so a
    150k-token vocab is not decoded."""
    if gguf.Keys.Tokenizer.LIST not in index.fields:
        raise InputError(f"{index.path}: has no vocab ({gguf.Keys.Tokenizer.LIST})")
    ids = index.find_strings(gguf.Keys.Tokenizer.LIST, list(wanted), last=True)
    types_field = index.fields.get(gguf.Keys.Tokenizer.TOKEN_TYPE)
    types = index.numbers(types_field) if types_field is not None and types_field.item_type != gguf.GGUFValueType.STRING else None
    return {t: (i, int(types[i]) if types is not None and i < len(types) else 1) for t, i in ids.items()}


def is_special(kind: int) -> bool:
    return kind in SPECIAL_TYPES


def header_sha256(path: Path, reader: gguf_file.GGUFIndex | gguf.GGUFReader) -> str:
    """sha256 of a GGUF's header part: everything before the tensor data (keys, vocab, tensor infos)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(reader.data_offset)).hexdigest()


# -- the donor -----------------------------------------------------------------------------------
@dataclass
class Donor:
    name: str
    family: type[Converter]
    projection_dim: int
    #: the ids the donor's tokenizer gives the family's image tokens (empty: it records none)
    token_ids: dict[str, int]
    converter: Converter | None = None  # a checkpoint folder
    reader: gguf.GGUFReader | None = None  # an mmproj GGUF


def family_of(projector_type: str) -> type[Converter] | None:
    for classes in discover().values():
        for cls in classes:
            if cls.projector_type == projector_type:
                return cls
    return None


def open_donor(path: str | Path) -> Donor:
    path = Path(path)
    if path.is_dir():
        conv = converter_for(open_checkpoint(path))
        added = conv.ckpt.added_tokens()
        ids = {t: added[t][0] for t in conv.image_tokens if t in added}
        return Donor(path.resolve().name, type(conv), conv.params().projection_dim, ids, converter=conv)
    reader = gguf_file.open_gguf(path, "mmproj GGUF")
    arch = gguf_file.value(reader, gguf.Keys.General.ARCHITECTURE)
    if arch != "clip":
        raise InputError(f"{path}: general.architecture is {arch!r}: a donor is a checkpoint folder or an mmproj GGUF")
    projector = gguf_file.value(reader, gguf.Keys.Clip.PROJECTOR_TYPE, "")
    family = family_of(projector)
    if family is None:
        raise InputError(f"{path}: projector type {projector!r} belongs to no family ggraft knows")
    width = gguf_file.value(reader, gguf.Keys.ClipVision.PROJECTION_DIM)
    if not isinstance(width, int):
        raise InputError(f"{path}: has no {gguf.Keys.ClipVision.PROJECTION_DIM}")
    tokens, ids = gguf_file.value(reader, mmproj.IMAGE_TOKENS_KEY, []), gguf_file.value(reader, mmproj.IMAGE_TOKEN_IDS_KEY, [])
    recorded = dict(zip(tokens, ids)) if len(tokens) == len(ids) else {}
    return Donor(path.name, family, width, {t: recorded[t] for t in family.image_tokens if t in recorded}, reader=reader)


# -- the graft -----------------------------------------------------------------------------------
@dataclass
class GraftReport:
    output: str
    donor: str
    recipient: str
    recipient_header_sha256: str
    projector_type: str
    #: token -> {"donor": id or None, "recipient": id}
    tokens: dict[str, dict[str, int | None]] = field(default_factory=dict)
    #: mmproj tensor -> where its values came from
    rows: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def match_tokens(donor: Donor, found: dict[str, tuple[int, int]], recipient: str, allow_remap: bool) -> dict[str, int]:
    """The recipient's ids for the family's image tokens, or an InputError naming the disagreement."""
    ids = {}
    for token in donor.family.image_tokens:
        theirs = donor.token_ids.get(token)
        said = f" (the donor uses id {theirs})" if theirs is not None else ""
        if token not in found:
            raise InputError(f"{recipient}: the vocab has no {token} token{said}",
                             hint="the recipient must come from the donor's language-model family")
        tid, kind = found[token]
        if not is_special(kind):
            raise InputError(f"{recipient}: {token} (id {tid}) is not a special token{said}; llama.cpp would "
                             "split it into text pieces")
        if theirs is not None and theirs != tid and not allow_remap:
            raise InputError(f"{token}: the donor uses id {theirs}, {recipient} has it at id {tid}",
                             hint="--allow-token-remap takes the recipient's ids (llama.cpp finds image tokens by text)")
        ids[token] = tid
    return ids


def graft(donor: str | Path, text: str | Path, out: str | Path, outtype: str | None = None, force: bool = False,
          allow_token_remap: bool = False) -> GraftReport:
    """Write the donor's tower and projector, fitted to the recipient text GGUF, to ``out``."""
    text, out = Path(text), Path(out)
    output.check_output(out, force)
    if out.resolve() in (Path(donor).resolve(), text.resolve()):
        raise InputError(f"{out}: the output would overwrite an input")
    qtype = output.parse_outtype(outtype) if outtype else None
    recipient = gguf_file.scan_gguf(text, "text GGUF")  # header index: no vocab decoding
    arch = gguf_file.value(recipient, gguf.Keys.General.ARCHITECTURE, "")
    if arch == "clip":
        raise InputError(f"{text}: is an mmproj; --text takes the recipient's text GGUF")
    d = open_donor(donor)
    width = gguf_file.value(recipient, gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch))
    if not isinstance(width, int):
        raise InputError(f"{text}: has no {gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)}: not a text GGUF?")
    if width != d.projection_dim:
        raise InputError(f"width mismatch: {d.name} projects to {d.projection_dim} but {text.name} embeds in {width}",
                         hint="the donor must come from the recipient's language-model family and size")
    found = vocab_tokens(recipient, d.family.image_tokens)
    ids = match_tokens(d, found, text.name, allow_token_remap)

    report = GraftReport(str(out), d.name, text.name, header_sha256(text, recipient), d.family.projector_type,
                         {t: {"donor": d.token_ids.get(t), "recipient": ids[t]} for t in ids})
    if not d.token_ids:
        report.notes.append(f"{d.name} records no token ids: checked only that the recipient has "
                            f"{', '.join(ids)} as special tokens")
    elif any(d.token_ids.get(t, i) != i for t, i in ids.items()):
        report.notes.append("token ids remapped to the recipient's")
    rows = {}
    for name, token in d.family.text_rows.items():
        rows[token] = recipient_row(recipient, ids[token], width)
        kind = gguf_file.tensor(recipient, TOKEN_EMBD).tensor_type.name
        report.rows[name] = f"{text.name} {TOKEN_EMBD} row {ids[token]} ({kind})"
    provenance = {"donor": d.name, "recipient": text.name, "recipient_header_sha256": report.recipient_header_sha256}
    if d.converter is not None:
        fitted = type(d.converter)(d.converter.ckpt, Recipient(rows, ids))
        mmproj.convert(fitted, out, outtype or output_types.DEFAULT, force=True, provenance=provenance)
    else:
        copy_mmproj(d.reader, d.family, rows, ids, out, qtype, provenance)
    return report


def recipient_row(reader: gguf_file.GGUFIndex, tid: int, width: int) -> np.ndarray:
    row = gguf_file.tensor_row(reader, TOKEN_EMBD, tid)
    if row.shape != (width,) or not np.isfinite(row).all():
        raise InputError(f"{reader.path}: {TOKEN_EMBD} row {tid} is not {width} finite values")
    return row


def _dequantized(t: gguf.ReaderTensor) -> Lazy:
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first

    def values() -> np.ndarray:  # a closure: Lazy would unpack the ReaderTensor (a NamedTuple) given as an arg
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)

    return Lazy(meta=Lazy.meta_with_dtype_and_shape(np.float32, shape), args=(), func=values)


#: what to do about a donor tensor of a type gguf-py cannot write back (``writable``)
REENCODE_HINT = f"pass --outtype {output_types.alternatives(output_types.DEFAULT)} to re-encode the donor's tensors"


def writable(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether gguf-py can encode ``qtype`` (it decodes every type, but encodes only some)."""
    try:
        gguf.quants.quantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][0]), np.float32), qtype)
        return True
    except NotImplementedError:
        return False


def copy_mmproj(reader: gguf.GGUFReader, family: type[Converter], rows: dict[str, np.ndarray], ids: dict[str, int],
                out: Path, qtype: gguf.GGMLQuantizationType | None, provenance: dict[str, str]) -> Path:
    """The donor mmproj's keys and tensors (each in its own type unless ``qtype``), its text-model
    rows replaced (or added, where the donor lacks them) by the recipient's."""
    own = {P + k for k in ("version", *provenance)} | {mmproj.IMAGE_TOKENS_KEY, mmproj.IMAGE_TOKEN_IDS_KEY}
    w = gguf.GGUFWriter(path=None, arch="clip")
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in own or key == gguf.Keys.General.ARCHITECTURE:
            continue
        if qtype is not None and key == gguf.Keys.General.FILE_TYPE:
            continue
        array = f.types[0] == gguf.GGUFValueType.ARRAY
        value = f.contents()
        if array and not value:
            continue  # GGUFWriter cannot write an empty array; llama.cpp reads none as absent
        w.add_key_value(key, value, f.types[0], sub_type=f.types[-1] if array else None)
    if qtype is not None:
        w.add_file_type(output.FILE_TYPES[qtype])
    w.add_array(mmproj.IMAGE_TOKENS_KEY, list(ids))
    w.add_array(mmproj.IMAGE_TOKEN_IDS_KEY, list(ids.values()))
    for key, value in {"version": __version__, **provenance}.items():
        w.add_string(P + key, value)

    replaced = {name: rows[token] for name, token in family.text_rows.items()}
    plan = []
    for t in reader.tensors:
        source = _dequantized(t)
        target = t.tensor_type if qtype is None else mmproj.tensor_type(t.name, tuple(source.shape), qtype)
        if t.name in replaced:
            row = replaced.pop(t.name)
            if row.size != int(t.n_elements):
                raise InputError(f"{reader.path}: {t.name} has {t.n_elements} values, the recipient's row {row.size}")
            source, target = in_memory(row.reshape(source.shape)), gguf.GGMLQuantizationType.F32
        elif not writable(target):
            raise InputError(f"{reader.path}: tensor {t.name} is {target.name}, which gguf-py cannot write back",
                             hint=REENCODE_HINT)
        plan.append((t.name, source, target))
    plan += [(name, in_memory(row), gguf.GGMLQuantizationType.F32) for name, row in replaced.items()]
    return output.write_gguf(out, w, plan, label=f"graft {out.name}")
