"""``ggraft check``: is a text GGUF + mmproj GGUF pair compatible?  From headers, fast.

Both files are read through ``gguf_file.scan_gguf`` (validated memory-mapped headers; at most
one embedding row of tensor data).  Findings are typed (code, severity, message, hint); the CLI
renders them.  Exit semantics: ``ok`` (no error finding) -> 0, errors -> 1; an input that cannot
be read, or is not what its position needs (a text model given as the mmproj, the two swapped,
a missing shard) raises ``InputError`` (2).

The rules mirror what the installed llama.cpp does with the pair: the width it compares in
``mtmd_context`` (``clip_n_mmproj_embd`` vs ``llama_model_n_embd_inp``), the tokens
``init_vision`` puts around images (``boundary_tokens``), the projector names its ``libmtmd``
knows, how llama-cpp-python renders the chat template with an image.
"""
from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from ggraft.gguf_io import gguf_file
from .boundary_tokens import BOUNDARY_TOKENS, LLAMA_CPP_PYTHON, LLAMA_CPP_SOURCE
from .chat_template import MEDIA_MARKER, TemplateTooCostly, render_with_image
from ggraft.errors import DependencyError, InputError
from ggraft.gguf_io.gguf_file import GGUFIndex
from .requirements_fit import MmprojHeader, mmproj_problems
from .runtime_defects import defects_for
from .text_fit import mmproj_deepstack, text_architecture_fit, text_deepstack

ERROR, WARNING, INFO = "error", "warning", "info"
K = gguf.Keys
IMG_BREAK_TENSOR = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_TOK_EMBD_IMG_BREAK]
TOKEN_EMBD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

#: clip.cpp ``clip_n_mmproj_embd``: the tensor and ggml dimension llama.cpp reads the projected
#: width from, per projector type (same llama.cpp as boundary_tokens.LLAMA_CPP_SOURCE).  Types not
#: listed fall back to ``clip.vision.projection_dim``.
WIDTH_TENSOR: dict[str, tuple[str, int]] = {
    **{p: ("mm.2.weight", 1) for p in ("mlp", "pixtral", "lightonocr", "dots_ocr", "dots3note_v", "muse-glimmer",
                                        "lfm2", "kimivl", "paddleocr", "kimik25", "yasa2", "deepseek4v", "phi4",
                                        "mimovl")},
    **{p: ("mm.2.bias", 0) for p in ("qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger", "exaone4_5",
                                      "youtuvl", "ling3vl")},
    "janus_pro": ("mm.1.bias", 0),
    "gemma3": ("mm.input_projection.weight", 0), "gemma3nv": ("mm.input_projection.weight", 0),
    "gemma4v": ("mm.input_projection.weight", 1), "gemma4uv": ("mm.input_projection.weight", 1),
    **{p: ("mm.model.fc.weight", 1) for p in ("idefics3", "llama4", "step3vl", "hunyuanvl")},
    "internvl": ("mm.model.mlp.3.weight", 1), "nemotron_v2_vl": ("mm.model.mlp.3.weight", 1),
    **{p: ("mm.down.weight", 1) for p in ("glm4v", "glm5v", "minicpmv4_6", "cogvlm")},
    "resampler": ("resampler.proj.weight", 0),
    "adapter": ("adapter.linear.dense_4h_to_h.weight", 1),
    "minimax_m3": ("mm.merger.fc2.bias", 0),
    "ldp": ("mm.model.mb_block.1.block.2.1.bias", 0), "ldpv2": ("mm.model.peg.0.bias", 0),
}
MLP_NORM_TENSOR = ("mm.3.weight", "mm.3.bias", 0)  # "mlp" with mm.3 is llama.cpp's mlp_norm (Yi-type LLaVA)


@dataclass
class Finding:
    code: str
    severity: str
    message: str
    hint: str | None = None


@dataclass
class CheckReport:
    text: dict[str, Any] = field(default_factory=dict)
    mmproj: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == ERROR for f in self.findings)

    def add(self, code: str, severity: str, message: str, hint: str | None = None) -> None:
        self.findings.append(Finding(code, severity, message, hint))

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "findings": [asdict(f) for f in self.findings], "text": self.text, "mmproj": self.mmproj}


# -- what the installed llama.cpp knows ------------------------------------------------------
@functools.cache
def _libmtmd() -> tuple[bytes, str] | None:
    """The bytes of llama-cpp-python's libmtmd (found without importing llama_cpp) and its version."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for lib in sorted((Path(folder) / "lib").glob("*mtmd*")):
            if lib.suffix in (".so", ".dylib", ".dll"):
                from importlib.metadata import PackageNotFoundError, version

                try:
                    installed = version("llama_cpp_python")
                except PackageNotFoundError:
                    installed = "unknown"
                return lib.read_bytes(), installed
    return None


def llama_cpp_knows(projector: str) -> bool | None:
    """Whether the installed libmtmd has ``projector`` among its projector names (None: no libmtmd found).

    The names are string literals of clip-impl.h's PROJECTOR_TYPE_NAMES compiled into the library;
    the linker may store one as the tail of a longer literal ("mlp" inside "adapter_mlp"), so a
    tail match counts for names gguf-py or the boundary table also know."""
    lib = _libmtmd()
    if lib is None:
        return None
    name = projector.encode()
    if b"\0" + name + b"\0" in lib[0]:
        return True
    ecosystem = set(vars(gguf.VisionProjectorType).values()) | set(BOUNDARY_TOKENS)
    return projector in ecosystem and name + b"\0" in lib[0]


def installed_llama_cpp_python() -> str:
    lib = _libmtmd()
    return lib[1] if lib else "not found"


# -- reading the two files -----------------------------------------------------------------
def projector_type(m: GGUFIndex) -> str | None:
    value = m.value(K.Clip.PROJECTOR_TYPE) or m.value(K.ClipVision.PROJECTOR_TYPE)
    return value if isinstance(value, str) else None


def text_width(t: GGUFIndex) -> int | None:
    """llama.cpp's ``n_embd_inp``: embedding_length, times (1 + the DeepStack layers the architecture reads)."""
    arch = t.value(K.General.ARCHITECTURE, "")
    width = t.value(K.LLM.EMBEDDING_LENGTH.format(arch=arch))
    if not isinstance(width, int):
        return None
    return width * (1 + text_deepstack(t, arch))


def projection_width(m: GGUFIndex, projector: str | None) -> tuple[int | None, str]:
    """(width, where it came from) as llama.cpp derives it for the projector type."""
    spec = WIDTH_TENSOR.get(projector or "")
    if projector == "mlp" and m.tensor(MLP_NORM_TENSOR[0]) is not None:
        spec = MLP_NORM_TENSOR[1:]
    if spec is not None:
        t = m.tensor(spec[0])
        if t is not None and len(t.shape) > spec[1]:
            width = int(t.shape[spec[1]])
            width *= 1 + mmproj_deepstack(m, projector)  # main path + DeepStack features (qwen3vl_merger)
            return width, f"{spec[0]} dim {spec[1]}"
        return None, f"missing tensor {spec[0]}"
    dim = m.value(K.ClipVision.PROJECTION_DIM)
    return (int(dim), K.ClipVision.PROJECTION_DIM) if isinstance(dim, int) else (None, "no projection_dim key")


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


# -- the pair --------------------------------------------------------------------------------
@dataclass
class _Pair:
    text: GGUFIndex
    shards: list[GGUFIndex]
    mmproj: GGUFIndex
    vocab: Vocab
    projector: str | None
    report: CheckReport


def _role(index: GGUFIndex) -> str:
    return "mmproj" if index.value(K.General.ARCHITECTURE) == "clip" else "text"


def _refuse_wrong_roles(t: GGUFIndex, m: GGUFIndex) -> None:
    t_role, m_role = _role(t), _role(m)
    if t_role == "mmproj" and m_role == "text":
        raise InputError(f"the files are the wrong way round: {t.path} is an mmproj and {m.path} a text model",
                         hint=f"ggraft check {m.path} {t.path}")
    if t_role == "mmproj":
        raise InputError(f"{t.path}: is an mmproj (general.architecture 'clip'), not a text model")
    if m_role == "text":
        arch = m.value(K.General.ARCHITECTURE)
        what = f"general.architecture {arch!r}" if arch else "no general.architecture"
        raise InputError(f"{m.path}: is not an mmproj ({what}; an mmproj has 'clip')",
                         hint="give the text model first, then the mmproj")


def text_shards(t: GGUFIndex) -> list[GGUFIndex]:
    """All shards of a split text GGUF, first given; [t] when not split."""
    count = int(t.value(K.Split.LLM_KV_SPLIT_COUNT, 0) or 0)
    if count <= 1:
        return [t]
    no = int(t.value(K.Split.LLM_KV_SPLIT_NO, 0) or 0)
    named = SHARD_NAME.match(t.path.name)
    if no != 0:
        first = f"{named['prefix']}-00001-of-{count:05d}.gguf" if named else "the first shard"
        raise InputError(f"{t.path}: is shard {no + 1} of {count}; llama.cpp loads a split model from its first shard",
                         hint=f"give {t.path.with_name(first) if named else first}")
    if not named or int(named["count"]) != count:
        raise InputError(f"{t.path}: is shard 1 of {count} but not named <name>-00001-of-{count:05d}.gguf, "
                         "so llama.cpp cannot find the other shards")
    shards = [t]
    for i in range(1, count):
        path = t.path.with_name(f"{named['prefix']}-{i + 1:05d}-of-{count:05d}.gguf")
        if not path.exists():
            raise InputError(f"{path}: shard {i + 1} of {count} of {t.path.name} is missing")
        shards.append(gguf_file.scan_gguf(path, f"shard {i + 1} of {t.path.name}"))
    return shards


def describe_text(t: GGUFIndex, shards: list[GGUFIndex], vocab: Vocab) -> dict[str, Any]:
    arch = t.value(K.General.ARCHITECTURE, "")
    return {"path": str(t.path), "architecture": arch, "type": t.value(K.General.TYPE),
            "name": t.value(K.General.NAME), "embedding_length": text_width(t),
            "vocab_size": vocab.size, "tokenizer": vocab.model, "shards": len(shards),
            "chat_template": isinstance(t.value(K.Tokenizer.CHAT_TEMPLATE), str)}


def describe_mmproj(m: GGUFIndex, projector: str | None) -> dict[str, Any]:
    width, source = projection_width(m, projector)
    return {"path": str(m.path), "architecture": m.value(K.General.ARCHITECTURE), "type": m.value(K.General.TYPE),
            "name": m.value(K.General.NAME), "projector_type": projector, "projection_width": width,
            "projection_width_from": source, "projection_dim": m.value(K.ClipVision.PROJECTION_DIM),
            "has_vision_encoder": bool(m.value(K.Clip.HAS_VISION_ENCODER, False)),
            "has_audio_encoder": bool(m.value(K.Clip.HAS_AUDIO_ENCODER, False)),
            "image_size": m.value(K.ClipVision.IMAGE_SIZE), "patch_size": m.value(K.ClipVision.PATCH_SIZE)}


def _general(p: _Pair) -> None:
    r = p.report
    if p.text.value(K.General.TYPE) == gguf.GGUFType.ADAPTER:
        r.add("text-is-adapter", ERROR, f"{p.text.path}: is a LoRA adapter (general.type 'adapter'), not a model",
              "give the base model, and apply the adapter when running it")
    m_type = p.mmproj.value(K.General.TYPE)
    if m_type is None:
        r.add("mmproj-type", INFO, "the mmproj has no general.type (older converters did not write it)")
    elif m_type != gguf.GGUFType.MMPROJ:
        r.add("mmproj-type", WARNING, f"the mmproj's general.type is {m_type!r}, not 'mmproj'")
    if len(p.shards) > 1:
        r.add("split-text", INFO, f"the text model is split into {len(p.shards)} shards; all are present")
    if int(p.mmproj.value(K.Split.LLM_KV_SPLIT_COUNT, 0) or 0) > 1:
        r.add("split-mmproj", ERROR, "the mmproj is split into shards; llama.cpp's mmproj loader reads one file",
              "merge it: llama-gguf-split --merge FIRST-SHARD.gguf mmproj.gguf")


def _vision(p: _Pair) -> None:
    r, m = p.report, p.mmproj
    if not m.value(K.Clip.HAS_VISION_ENCODER, False):
        audio = m.value(K.Clip.HAS_AUDIO_ENCODER, False)
        r.add("no-vision-encoder", ERROR,
              "the mmproj has an audio encoder but no vision encoder: it cannot take images" if audio
              else "the mmproj has no vision encoder (clip.has_vision_encoder is not true)",
              "use the vision mmproj of this model")
    if p.projector is None:
        stored = m.value(K.Clip.PROJECTOR_TYPE)
        r.add("projector-missing", ERROR, "the mmproj has no clip.projector_type; llama.cpp cannot load it"
              if stored is None else f"the mmproj's clip.projector_type is {stored!r}, not a string; "
              "llama.cpp cannot load it")
        return
    known = llama_cpp_knows(p.projector)
    if known is None:
        r.add("projector-unchecked", WARNING,
              f"could not find llama-cpp-python's libmtmd to check projector type {p.projector!r}")
    elif known:
        r.add("projector", INFO, f"projector type {p.projector!r} is known to the installed llama.cpp "
              f"(llama-cpp-python {installed_llama_cpp_python()})")
    else:
        r.add("projector-unknown", ERROR,
              f"projector type {p.projector!r} is unknown to the installed llama.cpp "
              f"(llama-cpp-python {installed_llama_cpp_python()})",
              "upgrade llama-cpp-python, or use an mmproj converted for this llama.cpp")


def _llama_cpp_requirements(p: _Pair) -> None:
    """What the installed llama.cpp refuses, aborts or crashes on (``requirements``)."""
    for problem in mmproj_problems(MmprojHeader.from_index(p.mmproj), p.projector):
        p.report.add("llama-cpp-requirement", problem.severity, f"{p.mmproj.path}: {problem.message}",
                     "the mmproj is damaged or not made for its projector type; convert it again with ggraft convert"
                     if problem.severity == ERROR else None)


def _width(p: _Pair) -> None:
    r = p.report
    text, (proj, source) = text_width(p.text), projection_width(p.mmproj, p.projector)
    arch = p.text.value(K.General.ARCHITECTURE, "")
    if text is None:
        r.add("text-width-missing", ERROR, f"the text model has no {arch}.embedding_length; llama.cpp cannot load it")
        return
    if proj is None:
        severity = ERROR if source.startswith("missing tensor") else WARNING
        r.add("projection-width-unknown", severity, f"cannot tell the mmproj's output width ({source})")
        return
    dim = p.mmproj.value(K.ClipVision.PROJECTION_DIM)
    if isinstance(dim, int) and source != K.ClipVision.PROJECTION_DIM and dim != proj and p.projector != "qwen3vl_merger":
        r.add("projection-dim-key", WARNING,
              f"clip.vision.projection_dim says {dim} but llama.cpp uses {proj} (from {source})")
    if proj != text:
        r.add("width-mismatch", ERROR,
              f"the mmproj projects to {proj} but the text model's embedding width is {text}",
              "this mmproj belongs to another model family or size")
    else:
        r.add("width", INFO, f"the mmproj projects to {proj}, the text model's embedding width")


def _boundaries(p: _Pair) -> None:
    r = p.report
    if not p.vocab.size:
        r.add("vocab-missing", ERROR, "the text model has no tokenizer.ggml.tokens; llama.cpp cannot tokenize prompts")
        return
    alternatives = BOUNDARY_TOKENS.get(p.projector or "")
    if alternatives is None:
        if p.projector:
            r.add("boundary-unknown", WARNING, f"no boundary-token data for projector type {p.projector!r} "
                  f"(table read from {LLAMA_CPP_SOURCE})")
        return
    heads = p.vocab.find([alt[0].text for alt in alternatives if alt])
    chosen = next((alt for alt in alternatives if alt and alt[0].text in heads), alternatives[-1])
    if not chosen:
        r.add("boundary-tokens", INFO, f"projector {p.projector!r} inserts no boundary tokens")
        return
    ids = p.vocab.find([b.text for b in chosen])
    missing = [b for b in chosen if b.text not in ids]
    for b in missing:
        effect = ("llama.cpp would put token id -1 into the batch" if b.looked_up
                  else "llama.cpp would split it into pieces the model never saw as an image marker")
        r.add("boundary-token-missing", ERROR,
              f"projector {p.projector!r} marks images with {b.text!r} ({b.role}) but the text vocab has no such "
              f"token: {effect}", f"this text model is not of the mmproj's family; see ggraft audit {p.text.path}")
    plain = [b for b in chosen if b.text in ids and not b.looked_up and b.text.strip()
             and p.vocab.token_type(ids[b.text]) == gguf.TokenType.NORMAL]
    for b in plain:
        r.add("boundary-token-normal", WARNING, f"{b.text!r} (token {ids[b.text]}) is a normal token, not a "
              "special one; llama.cpp may not keep it whole when parsing the prompt")
    if not missing:
        found = ", ".join(f"{b.text!r}={ids[b.text]}" for b in chosen)
        r.add("boundary-tokens", INFO, f"image boundary tokens present: {found}")


def _rel_tolerance(qtype: gguf.GGMLQuantizationType) -> float:
    """Allowed relative L2 difference of an embedding row stored as ``qtype``: ~2 bits' worth of
    quantization noise (bits per weight from gguf-py's GGML_QUANT_SIZES), at least 1%."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return max(0.01, 2.0 ** (2 - 8 * size / block))


def _img_break(p: _Pair) -> None:
    r, m = p.report, p.mmproj
    stored = m.tensor(IMG_BREAK_TENSOR)
    if stored is None:
        return
    ids = p.vocab.find(["[IMG_BREAK]"]) if p.vocab.size else {}
    if "[IMG_BREAK]" not in ids:
        r.add("img-break-missing", ERROR, f"the mmproj carries {IMG_BREAK_TENSOR} but the text vocab has no [IMG_BREAK]",
              "this mmproj belongs to a Pixtral/Mistral model; pair it with one")
        return
    token = ids["[IMG_BREAK]"]
    shard = next((s for s in p.shards if s.tensor(TOKEN_EMBD) is not None), None)
    if shard is None:
        r.add("img-break-unchecked", WARNING, f"the text model has no {TOKEN_EMBD} to compare [IMG_BREAK] with")
        return
    embd = shard.tensor(TOKEN_EMBD)
    try:
        ours = gguf_file.tensor_values(m, IMG_BREAK_TENSOR).reshape(-1)
        theirs = gguf_file.tensor_row(shard, TOKEN_EMBD, token)
    except InputError as e:
        r.add("img-break-unchecked", WARNING, f"could not compare the [IMG_BREAK] rows: {e.message}")
        return
    if ours.shape != theirs.shape:
        r.add("img-break-mismatch", ERROR, f"the mmproj's [IMG_BREAK] row has {ours.size} values, the text model's "
              f"{theirs.size}", "ggraft graft: rebuild the mmproj against this text model")
        return
    rel = float(np.linalg.norm(ours - theirs) / max(float(np.linalg.norm(theirs)), 1e-12))
    tol = _rel_tolerance(embd.tensor_type)
    if not np.isfinite(rel) or rel > tol:
        r.add("img-break-mismatch", ERROR,
              f"the mmproj's [IMG_BREAK] embedding differs from the text model's row for token {token} "
              f"(relative difference {rel:.3g}, allowed {tol:.3g} for {embd.tensor_type.name}): "
              "a donor mmproj reused on another model or fine-tune",
              "ggraft graft: rebuild the mmproj's [IMG_BREAK] row from this text model")
    else:
        r.add("img-break", INFO, f"[IMG_BREAK] row matches the text model's token {token} (relative difference {rel:.2g})")


def _chat_template(p: _Pair) -> None:
    r, t = p.report, p.text
    template = t.value(K.Tokenizer.CHAT_TEMPLATE)
    if not isinstance(template, str) or not template.strip():
        r.add("chat-template-missing", WARNING, "the text model has no tokenizer.chat_template: ggraft run sends a "
              "plain prompt, and LM Studio / Ollama need a template to place images",
              "add the model's template (tokenizer_config.json chat_template) when converting the text model")
        return
    bos_eos, f = [], t.fields.get(K.Tokenizer.LIST)
    for key in (K.Tokenizer.BOS_ID, K.Tokenizer.EOS_ID):
        i = t.value(key)
        bos_eos.append(t.string_at(f, i) if isinstance(i, int) and f is not None and 0 <= i < f.count else "")
    try:
        prompt = render_with_image(template, *bos_eos)
    except (ImportError, DependencyError) as e:
        r.add("chat-template-unchecked", WARNING, f"cannot render the chat template here ({e})")
        return
    except TemplateTooCostly as e:  # llama-cpp-python would spin on it for every request
        r.add("chat-template-too-costly", ERROR, f"{e}: it loops far more than a chat template needs",
              "replace tokenizer.chat_template, or use ggraft run --raw")
        return
    except Exception as e:  # a template is arbitrary code: any failure is a finding, not a crash
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        r.add("chat-template-error", WARNING, f"the chat template fails on a user message with an image: {first}",
              "fix or replace tokenizer.chat_template, or use ggraft run --raw")
        return
    if MEDIA_MARKER not in prompt:
        r.add("chat-template-no-image", WARNING, "the chat template drops images: a user message with an image "
              "renders without a place for it", "use a template that renders list content parts (image and text)")
    else:
        r.add("chat-template", INFO, "the chat template places images")


def _runtime_defects(p: _Pair) -> None:
    installed = installed_llama_cpp_python()
    for d in defects_for(p.projector, lambda name: p.mmproj.tensor(name) is not None, installed, p.mmproj.value):
        p.report.add("runtime-defect", WARNING, f"known llama.cpp defect for {d.projector!r} in llama-cpp-python "
                     f"{installed}: {d.summary} ({d.reference})",
                     "the pair runs, but its image embeddings differ from transformers'; see `ggraft verify`")


CHECKS: tuple[Callable[[_Pair], None], ...] = (_general, _vision, _llama_cpp_requirements, _width, text_architecture_fit,
                                               _boundaries, _img_break, _chat_template, _runtime_defects)
#: the checks that need no text model (``check_mmproj``)
MMPROJ_CHECKS: tuple[Callable[[_Pair], None], ...] = (_vision, _llama_cpp_requirements)


def check_mmproj(mmproj: str | Path) -> CheckReport:
    """The mmproj half of ``check_pair``, for loading an mmproj without a text model (verify)."""
    m = gguf_file.scan_gguf(mmproj, "mmproj GGUF")
    if _role(m) == "text":
        arch = m.value(K.General.ARCHITECTURE)
        raise InputError(f"{m.path}: is not an mmproj (general.architecture {arch!r}; an mmproj has 'clip')")
    projector = projector_type(m)
    report = CheckReport(mmproj=describe_mmproj(m, projector))
    pair = _Pair(None, [], m, None, projector, report)  # type: ignore[arg-type]  # no text side
    for check in MMPROJ_CHECKS:
        check(pair)
    return report


def check_pair(text: str | Path | GGUFIndex, mmproj: str | Path | GGUFIndex) -> CheckReport:
    """Check a pair from its headers (paths, or indexes a caller has already scanned);
    unreadable or misplaced inputs raise InputError."""
    t = text if isinstance(text, GGUFIndex) else gguf_file.scan_gguf(text, "text GGUF")
    m = mmproj if isinstance(mmproj, GGUFIndex) else gguf_file.scan_gguf(mmproj, "mmproj GGUF")
    _refuse_wrong_roles(t, m)
    shards = text_shards(t)
    vocab = Vocab(t, t.value(K.Tokenizer.MODEL))
    projector = projector_type(m)
    report = CheckReport(text=describe_text(t, shards, vocab), mmproj=describe_mmproj(m, projector))
    pair = _Pair(t, shards, m, vocab, projector, report)
    for check in CHECKS:
        check(pair)
    installed = installed_llama_cpp_python()
    if installed not in (LLAMA_CPP_PYTHON, "not found"):
        report.add("table-version", INFO, f"boundary-token table read from {LLAMA_CPP_SOURCE} (llama-cpp-python "
                   f"{LLAMA_CPP_PYTHON}); installed llama-cpp-python is {installed}")
    return report
