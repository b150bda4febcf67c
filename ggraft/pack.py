"""``ggraft pack``: ship a checked pair as an LM Studio model folder or an Ollama model folder.

LM Studio: ``DIR/<publisher>/<name>/`` holds the text GGUF and ``mmproj-<name>-<type>.gguf``
(LM Studio pairs a model with the mmproj in its folder), a model card ``README.md`` and
``SHA256SUMS``.  Ollama: ``DIR/<name>/`` holds the two GGUFs and a ``Modelfile`` with two
``FROM`` lines (text model first, then the projector), ``PARAMETER stop`` lines from the
GGUF's end-of-turn tokens and a ``TEMPLATE`` only where the GGUF's chat template is one of a
few known formats and renders identically to it on probe conversations.

GGUFs are hard-linked where the file system allows, else copied.  An mmproj whose metadata
would not let llama.cpp or Ollama recognise it as a vision projector is rewritten with gguf-py
into the package (the source is never touched).  The pair that ships must pass ``ggraft check``.
All is built in a temporary folder beside the target, renamed into place at the end.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import unicodedata
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf

from . import __version__, gguf_file
from .check import CheckReport, check_pair
from .errors import EngineError, IncompatibleError, InputError, OutputExistsError

LAYOUTS = ("lmstudio", "ollama")
LINK_MODES = ("auto", "link", "copy")
DEFAULT_PUBLISHER = "ggraft"
#: characters no folder name may hold on Windows, where LM Studio and Ollama also run
NOT_IN_FOLDER_NAMES = set('<>:"/\\|?*')
#: Ollama's model-name rule (types/model/name.go): letters, digits, '_', '-', '.'; 1-80 long
OLLAMA_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
V = gguf.GGUFValueType


@dataclass
class PackedFile:
    role: str  # text | mmproj | readme | checksums | modelfile
    path: str
    bytes: int
    sha256: str
    method: str  # link | copy | rewritten | written


@dataclass
class PackResult:
    layout: str
    folder: str
    name: str
    publisher: str | None
    files: list[PackedFile]
    check: dict[str, Any]
    mmproj_fixes: list[str] = field(default_factory=list)
    template: str | None = None  # the chat format mapped to a TEMPLATE (Ollama)
    stop: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # `lms import` / `ollama create`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- names and inputs

def validate_name(value: str, what: str) -> str:
    """A NAME or PUBLISHER that is safe as one folder name on every OS, or an InputError."""
    if not value or not value.strip():
        raise InputError(f"{what} is empty")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in value):
        raise InputError(f"{what} {value!r}: contains control characters")
    if "/" in value or "\\" in value:
        raise InputError(f"{what} {value!r}: must not contain path separators", "give one folder name, not a path")
    if ".." in value or value.startswith("."):
        raise InputError(f"{what} {value!r}: must not contain '..' or start with '.'")
    if value != value.strip():
        raise InputError(f"{what} {value!r}: must not start or end with spaces")
    bad = sorted(set(value) & NOT_IN_FOLDER_NAMES)
    if bad:
        raise InputError(f"{what} {value!r}: must not contain {' '.join(bad)} (not allowed in folder names on Windows)")
    return value


def validate_ollama_name(value: str) -> str:
    validate_name(value, "NAME")
    if not OLLAMA_NAME.fullmatch(value):
        raise InputError(f"NAME {value!r}: not a valid Ollama model name",
                         "use letters, digits, '_', '-' and '.', starting with a letter, digit or '_' (at most 80)")
    return value


def default_name(text: gguf.GGUFReader, text_path: Path) -> str:
    """The text model's general.name (or file stem) made into a valid folder/Ollama name."""
    raw = str(gguf_file.value(text, gguf.Keys.General.NAME) or text_path.stem)
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.-]+", "-", raw)).strip("-.")[:80].rstrip("-.")
    return name or "model"


def type_label(reader: gguf.GGUFReader) -> str:
    """The file's tensor type as GGUF file names carry it (F16, Q8_0, Q4_K_M, ...)."""
    ft = gguf_file.value(reader, gguf.Keys.General.FILE_TYPE)
    try:
        name = gguf.LlamaFileType(int(ft)).name if ft is not None else ""
    except (ValueError, TypeError):
        name = ""
    if name and name != "GUESSED":
        return name.removeprefix("ALL_").removeprefix("MOSTLY_")
    sizes: dict[str, int] = {}
    for t in reader.tensors:  # no file type: the type holding most bytes of the matrices
        if len(t.shape) > 1:
            sizes[t.tensor_type.name] = sizes.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return max(sizes, key=sizes.get) if sizes else "F32"


def provenance(mmproj: gguf.GGUFReader) -> dict[str, Any]:
    """The ``ggraft.*`` keys ggraft writes into the mmproj it converts or grafts."""
    return {k.removeprefix("ggraft."): gguf_file.value(mmproj, k) for k in mmproj.fields if k.startswith("ggraft.")}


# ---------------------------------------------------------------- the projector's metadata

def projector_fixes(mmproj: gguf.GGUFReader) -> dict[str, tuple[V, Any]]:
    """Keys to set so llama.cpp and Ollama recognise this mmproj as a vision projector.

    Ollama files a GGUF as a projector when general.type is "projector" or when it has
    ``clip.vision.block_count`` but no ``clip.block_count``; llama.cpp loads a vision encoder
    only with ``clip.has_vision_encoder`` true.  Values come from the file's own tensors.
    """
    if gguf_file.value(mmproj, gguf.Keys.General.ARCHITECTURE) != "clip":
        return {}  # not an mmproj at all: check_pair says so
    names = [t.name for t in mmproj.tensors]
    if not any(n.startswith("v.") for n in names):
        raise IncompatibleError(f"{mmproj.path}: has no vision encoder tensors (v.*); there is nothing to see with",
                                "pack needs an mmproj with a vision encoder")
    fixes: dict[str, tuple[V, Any]] = {}
    if gguf_file.value(mmproj, gguf.Keys.General.TYPE) != gguf.GGUFType.MMPROJ:
        fixes[gguf.Keys.General.TYPE] = (V.STRING, gguf.GGUFType.MMPROJ)
    if gguf_file.value(mmproj, gguf.Keys.Clip.HAS_VISION_ENCODER) is not True:
        fixes[gguf.Keys.Clip.HAS_VISION_ENCODER] = (V.BOOL, True)
    blocks = {int(n.split(".")[2]) for n in names if re.match(r"v\.blk\.\d+\.", n)}
    if not gguf_file.value(mmproj, gguf.Keys.ClipVision.BLOCK_COUNT) and blocks:
        fixes[gguf.Keys.ClipVision.BLOCK_COUNT] = (V.UINT32, max(blocks) + 1)
    return fixes


def rewrite_with_keys(reader: gguf.GGUFReader, out: Path, updates: dict[str, tuple[V, Any]]) -> None:
    """Copy a GGUF with some keys set, tensor by tensor, with gguf-py (as its gguf_new_metadata)."""
    arch = gguf_file.value(reader, gguf.Keys.General.ARCHITECTURE)
    w = gguf.GGUFWriter(path=None, arch=arch, endianess=reader.endianess)
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF.") or f.name in updates:
            continue
        if f.name == gguf.Keys.General.ALIGNMENT:
            w.add_custom_alignment(int(f.contents()))
            continue
        vtype = f.types[0]
        w.add_key_value(f.name, f.contents(), vtype, sub_type=f.types[-1] if vtype == V.ARRAY else None)
    for key, (vtype, val) in updates.items():
        w.add_key_value(key, val, vtype)
    for t in reader.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file(path=out)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in reader.tensors:
        w.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    w.close()


# ---------------------------------------------------------------- chat templates for Ollama

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class ChatFormat:
    """A well-known prompt format: how it renders a conversation that ends with a user turn
    (with the generation prompt), the Go template that renders it the same way in Ollama, and
    the role markers worth stopping on."""

    name: str
    render: Callable[[Messages, str], str]
    go_template: str  # "{eos}" stands for the GGUF's end-of-sequence text
    stops: tuple[str, ...]

    def template(self, eos: str) -> str:
        return self.go_template.replace("{eos}", eos)


def _chatml(msgs: Messages, eos: str) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs) + "<|im_start|>assistant\n"


def _llama3(msgs: Messages, eos: str) -> str:
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in msgs)
    return turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _mistral(msgs: Messages, eos: str) -> str:
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")  # Ollama's .System
    turns = [m for m in msgs if m["role"] != "system"]
    out = []
    for i, m in enumerate(turns):
        if m["role"] == "user":
            prefix = f"{system}\n\n" if system and i == len(turns) - 1 else ""
            out.append(f"[INST] {prefix}{m['content']}[/INST]")
        else:
            out.append(f" {m['content']}{eos}")
    return "".join(out)


def _llava(sys_sep: str, user_sep: str, asst_sep: str) -> ChatFormat:
    """The Vicuna / LLaVA-1.5 format (USER: / ASSISTANT:), whose templates differ in separators."""
    turn = {"system": ("", sys_sep), "user": ("USER: ", user_sep), "assistant": ("ASSISTANT: ", "{eos}" + asst_sep)}

    def render(msgs: Messages, eos: str) -> str:
        text = "".join(turn[m["role"]][0] + m["content"] + turn[m["role"]][1] for m in msgs)
        return text.replace("{eos}", eos) + "ASSISTANT:"

    return ChatFormat("llava", render, _RANGE + (
        '{{- if eq .Role "system" }}{{ .Content }}' + sys_sep +
        '{{ else if eq .Role "user" }}USER: {{ .Content }}' + user_sep + '{{ if $last }}ASSISTANT:{{ end }}'
        '{{ else if eq .Role "assistant" }}ASSISTANT: {{ .Content }}{{ if not $last }}{eos}' + asst_sep +
        '{{ end }}{{ end }}\n{{- end }}'), ("USER:",))


# In each template $last marks the final message: after a user turn the generation prompt
# follows; a final assistant turn is left open so Ollama can continue it.
SEPARATORS = ("\n", " ", "", "\n\n")
_RANGE = '{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
CHAT_FORMATS = (
    ChatFormat("chatml", _chatml, _RANGE + (
        '{{- "" }}<|im_start|>{{ .Role }}\n'
        '{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>\n'
        '{{ end }}\n{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant\n'
        '{{ end }}\n{{- end }}'), ("<|im_start|>", "<|im_end|>")),
    ChatFormat("llama3", _llama3, _RANGE + (
        '{{- "" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
        '{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|eot_id|>{{ end }}\n'
        '{{- if and (ne .Role "assistant") $last }}<|start_header_id|>assistant<|end_header_id|>\n\n'
        '{{ end }}\n{{- end }}'), ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ChatFormat("mistral", _mistral, _RANGE + (
        '{{- if eq .Role "user" }}[INST] {{ if and $last $.System }}{{ $.System }}\n\n'
        '{{ end }}{{ .Content }}[/INST]\n'
        '{{- else if eq .Role "assistant" }} {{ .Content }}{{ if not $last }}{eos}{{ end }}\n'
        '{{- end }}\n{{- end }}'), ("[INST]", "[/INST]")),
    *(_llava(a, b, c) for a in SEPARATORS for b in SEPARATORS for c in SEPARATORS),
)

#: conversations both renderings must agree on (string content; Ollama places images itself)
PROBES: tuple[Messages, ...] = tuple(
    [{"role": r, "content": c} for r, c in conv] for conv in (
        [("user", "What is in the picture?")],
        [("system", "Answer in one sentence."), ("user", "What is in the picture?")],
        [("user", "What is in the picture?"), ("assistant", "A red cat."), ("user", "And the mat?")],
        [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "What colour is the sky?")],
    ))


def render_jinja(template: str, messages: Messages, bos: str, eos: str) -> str:
    """The chat template rendered as llama.cpp / transformers do (sandboxed, trimmed blocks)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception  # as transformers and llama-cpp-python provide it
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos,
                                            eos_token=eos, tools=None)


def match_chat_format(template: str | None, bos: str, eos: str, adds_bos: bool) -> ChatFormat | None:
    """The known format this chat template renders identically to on every probe, or None.

    A leading BOS the tokenizer adds anyway is not part of a prompt in Ollama, so it is
    dropped from the Jinja rendering before comparing.
    """
    if not template or "{{" in eos or '"""' in eos:
        return None
    try:
        rendered = [render_jinja(template, probe, bos, eos) for probe in PROBES]
    except Exception:  # any template error or unsupported construct: not a faithful match
        return None
    if adds_bos and bos:
        rendered = [r.removeprefix(bos) for r in rendered]
    for fmt in CHAT_FORMATS:
        if all(fmt.render(probe, eos) == r for probe, r in zip(PROBES, rendered)):
            return fmt
    return None


def token_text(reader: gguf.GGUFReader, token_id: Any) -> str | None:
    field = reader.get_field(gguf.Keys.Tokenizer.LIST)
    if field is None or token_id is None or not 0 <= int(token_id) < len(field.data):
        return None
    return field.contents(int(token_id))


def end_of_turn_tokens(text: gguf.GGUFReader) -> list[str]:
    """The texts of the end-of-sequence / end-of-turn / end-of-message tokens, in that order."""
    keys = (gguf.Keys.Tokenizer.EOS_ID, gguf.Keys.Tokenizer.EOT_ID, gguf.Keys.Tokenizer.EOM_ID)
    return list(dict.fromkeys(t for t in (token_text(text, gguf_file.value(text, k)) for k in keys) if t))


def modelfile_quote(value: str) -> str | None:
    """A value as Ollama's Modelfile parser reads it back (no escapes; \"\"\" for quotes), or None."""
    if '"""' in value or any(not c.isprintable() and c not in "\n\t" for c in value):
        return None
    return f'"""{value}"""' if '"' in value or "\n" in value else f'"{value}"'


def modelfile(text_file: str, mmproj_file: str, fmt: ChatFormat | None, eos: str, stops: list[str],
              header: list[str]) -> str:
    lines = [f"# {line}" for line in header]
    lines += [f"FROM ./{text_file}", f"FROM ./{mmproj_file}", ""]
    if fmt:
        lines += [f"# the GGUF's chat template is the {fmt.name} format; this renders it identically",
                  f"TEMPLATE {modelfile_quote(fmt.template(eos))}"]
    else:
        lines += ["# No TEMPLATE: the GGUF's chat template is not one ggraft maps faithfully to Go template",
                  "# syntax, so Ollama will use the template in the GGUF (it picks the closest template in",
                  "# its own library; without one it sends the prompt as is)."]
    for stop in stops:
        quoted = modelfile_quote(stop)
        lines.append(f"PARAMETER stop {quoted}" if quoted else f"# stop {stop!r} cannot be written in a Modelfile")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- model card

def model_card(info: dict[str, Any], report: CheckReport, files: list[PackedFile], fixes: list[str],
               prov: dict[str, Any], lms_commands: list[str]) -> str:
    found, text, mm = report.findings, info["text"], info["mmproj"]
    width = report.text.get("embedding_length") or text["embedding_length"]
    projected = report.mmproj.get("projection_width") or mm["projection_dim"]
    checks = [f"- {f.severity} `{f.code}`: {f.message}" for f in found] or ["- no findings"]
    rows = [f"| `{Path(f.path).name}` | {f.bytes:,} | `{f.sha256}` |" for f in files]
    lines = [
        "---", "tags: [gguf, llama.cpp, vision, image-text-to-text, ggraft]", "pipeline_tag: image-text-to-text", "---",
        f"# {info['name']}", "",
        "A text model and its vision projector (mmproj) for llama.cpp, LM Studio and other llama.cpp",
        f"runtimes, packed by ggraft {__version__}.", "",
        "| | |", "| --- | --- |",
        f"| Recipient (text model) | {info['recipient']} (`{text['architecture']}`) |",
        f"| Donor (vision encoder) | {info['donor']} |",
        f"| Projector type | `{mm['projector_type']}` |",
        f"| Widths | text embedding {width}; projector output {projected}; "
        f"vision encoder {mm['vision_width']} ({mm['vision_blocks']} blocks, image {mm['image_size']} px, "
        f"patch {mm['patch_size']}) |",
        f"| Check | {'passed' if report.ok else 'failed'} ({sum(f.severity == 'error' for f in found)} errors, "
        f"{sum(f.severity == 'warning' for f in found)} warnings) |",
        f"| ggraft | {__version__} |", "",
        "## Files", "", "| file | bytes | sha256 |", "| --- | ---: | --- |", *rows, "",
        "`sha256sum -c SHA256SUMS` verifies them.", "",
        "## Check (`ggraft check`)", "", *checks, "",
    ]
    if prov:
        lines += ["## Provenance (`ggraft.*` keys of the mmproj)", "",
                  *[f"- `ggraft.{k}`: {v}" for k, v in sorted(prov.items())], ""]
    if fixes:
        lines += ["## Metadata set in this copy of the mmproj", "", *[f"- {fix}" for fix in fixes], ""]
    t, m = (shlex.quote(Path(f.path).name) for f in files[:2])
    lines += [
        "## How to load", "",
        f"- **LM Studio**: this folder belongs at `<models folder>/{info['publisher']}/{info['name']}/` "
        "(by default `~/.lmstudio/models`); LM Studio pairs the model with the mmproj file beside it and",
        "  offers image input. Or import the files with LM Studio's CLI:", "", "  ```sh",
        *[f"  {c}" for c in lms_commands], "  ```", "",
        f"- **llama.cpp**: `llama-mtmd-cli -m {t} --mmproj {m} --image photo.jpg -p \"Describe the image.\"`,",
        f"  or serve it: `llama-server -m {t} --mmproj {m}`.",
        f"- **ggraft**: `ggraft run {t} {m} --image photo.jpg -p \"Describe the image.\"`", "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- files

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def place(src: Path, dst: Path, mode: str) -> str:
    """Hard-link ``src`` to ``dst`` (mode auto/link) or copy it (copy, or auto when linking fails)."""
    if mode != "copy":
        try:
            os.link(src, dst)
            return "link"
        except OSError as e:
            if mode == "link":
                raise InputError(f"cannot hard-link {src} into {dst.parent}: {e.strerror or e}",
                                 "hard links need the same file system; use --copy") from None
    try:
        shutil.copyfile(src, dst)
    except OSError as e:
        raise InputError(f"cannot copy {src} to {dst.parent}: {e.strerror or e}") from None
    return "copy"


@contextmanager
def staged_folder(target: Path, force: bool) -> Iterator[Path]:
    """A temporary folder beside ``target`` that becomes ``target`` (replacing it only with
    ``force``) if the block completes, and is removed otherwise."""
    stage = target.with_name(f".{target.name}.ggraft-tmp{os.getpid()}")
    old = target.with_name(f".{target.name}.ggraft-old{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        if target.exists() and not force:  # appeared while we worked
            raise OutputExistsError(f"{target}: exists; pass --force to replace it")
        if target.exists():
            os.replace(target, old)
            try:
                os.replace(stage, target)
            except OSError:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _target(out_dir: Path, parts: list[str], force: bool) -> Path:
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: output folder does not exist" if not out_dir.exists() else f"{out_dir}: not a folder")
    target = out_dir.joinpath(*parts)
    if target.exists() or target.is_symlink():
        if not force:
            raise OutputExistsError(f"{target}: exists; pass --force to replace it")
        if not target.is_dir() or target.is_symlink():
            raise InputError(f"{target}: exists and is not a folder; not replacing it")
    return target


def _checked(text: Path, mmproj: Path) -> CheckReport:
    report = check_pair(text, mmproj)
    if not report.ok:
        first = next(f for f in report.findings if f.severity == "error")
        raise IncompatibleError(f"ggraft check fails: {first.message}", first.hint or "run 'ggraft check' for details")
    return report


def _packed(role: str, staged: Path, target: Path, method: str) -> PackedFile:
    return PackedFile(role, str(target / staged.name), staged.stat().st_size, sha256(staged), method)


# ---------------------------------------------------------------- pack

def pack(text: str | Path, mmproj: str | Path, layout: str, out_dir: str | Path, name: str | None = None,
         publisher: str | None = None, link: str = "auto", force: bool = False) -> PackResult:
    """Pack a pair for LM Studio (``layout="lmstudio"``) or Ollama (``"ollama"``) under ``out_dir``.

    ``link``: "auto" hard-links where possible and copies otherwise, "link" requires hard links,
    "copy" always copies.  Raises InputError (exit 2) for bad names and existing targets,
    IncompatibleError (exit 1) when the pair fails ``ggraft check``.
    """
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; choose {' or '.join(LAYOUTS)}")
    if link not in LINK_MODES:
        raise InputError(f"unknown link mode {link!r}; choose one of {', '.join(LINK_MODES)}")
    text, mmproj = Path(text), Path(mmproj)
    if name is not None:
        validate_ollama_name(name) if layout == "ollama" else validate_name(name, "NAME")
    if publisher is not None:
        if layout == "ollama":
            raise InputError("--publisher applies to --lmstudio only")
        validate_name(publisher, "PUBLISHER")
    t_reader = gguf_file.open_gguf(text, "text GGUF")
    m_reader = gguf_file.open_gguf(mmproj, "mmproj GGUF")
    if int(gguf_file.value(t_reader, gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 0) or 0) > 1:
        raise InputError(f"{text}: is one shard of a split GGUF; pack takes a text model in one file",
                         "merge the shards first: llama-gguf-split --merge FIRST-SHARD.gguf merged.gguf")
    name = name or default_name(t_reader, text)
    publisher = (publisher or DEFAULT_PUBLISHER) if layout == "lmstudio" else None
    target = _target(Path(out_dir), [publisher, name] if publisher else [name], force)
    fixes = projector_fixes(m_reader)
    if not fixes:  # nothing to rewrite: check the pair before anything is written
        report = _checked(text, mmproj)
    text_file = f"{name}-{type_label(t_reader)}.gguf"
    mmproj_file = f"mmproj-{name}-{type_label(m_reader)}.gguf"

    made_parent = not target.parent.exists()
    try:
        target.parent.mkdir(exist_ok=True)
        with staged_folder(target, force) as stage:
            text_method = place(text, stage / text_file, link)
            if fixes:
                rewrite_with_keys(m_reader, stage / mmproj_file, fixes)
                report = _checked(text, stage / mmproj_file)  # check the pair that ships
                report.mmproj["path"] = str(target / mmproj_file)
                mmproj_method = "rewritten"
            else:
                mmproj_method = place(mmproj, stage / mmproj_file, link)
            files = [_packed("text", stage / text_file, target, text_method),
                     _packed("mmproj", stage / mmproj_file, target, mmproj_method)]
            result = PackResult(layout, str(target), name, publisher, files, report.to_dict(),
                                mmproj_fixes=[_describe_fix(m_reader, key, val) for key, (_, val) in fixes.items()])
            info = _card_info(result, t_reader, m_reader, fixes)
            writer = _write_lmstudio if layout == "lmstudio" else _write_ollama
            for role, file_name, content in writer(result, info, t_reader, m_reader, report):
                (stage / file_name).write_text(content, encoding="utf-8")
                result.files.append(_packed(role, stage / file_name, target, "written"))
    except BaseException as e:
        if made_parent and target.parent.exists() and not any(target.parent.iterdir()):
            target.parent.rmdir()
        if isinstance(e, OSError):  # e.g. a full disk while rewriting or writing
            raise InputError(f"{target}: cannot write the package: {e.strerror or e}") from None
        raise
    return result


def _describe_fix(mmproj: gguf.GGUFReader, key: str, new: Any) -> str:
    old = gguf_file.value(mmproj, key)
    return f"{key} = {new!r} (was {'missing' if old is None else repr(old)})"


def _card_info(result: PackResult, text: gguf.GGUFReader, mmproj: gguf.GGUFReader,
               fixes: dict[str, tuple[V, Any]]) -> dict[str, Any]:
    """What the model card and Modelfile say about the pair (the mmproj as shipped, with fixes)."""
    def v(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
        return fixes[key][1] if reader is mmproj and key in fixes else gguf_file.value(reader, key, default)

    prov = provenance(mmproj)
    t_arch = v(text, gguf.Keys.General.ARCHITECTURE, "")
    donor = prov.get("donor") or prov.get("source") or str(v(mmproj, gguf.Keys.General.NAME) or Path(mmproj.path).stem)
    if prov.get("source_architecture"):
        donor = f"{donor} ({prov['source_architecture']})"
    return {
        "name": result.name, "publisher": result.publisher, "donor": donor,
        "recipient": prov.get("recipient") or v(text, gguf.Keys.General.NAME) or Path(text.path).stem,
        "text": {"architecture": t_arch, "embedding_length": v(text, f"{t_arch}.embedding_length")},
        "mmproj": {"projector_type": v(mmproj, gguf.Keys.Clip.PROJECTOR_TYPE),
                   "projection_dim": v(mmproj, gguf.Keys.ClipVision.PROJECTION_DIM),
                   "vision_width": v(mmproj, gguf.Keys.ClipVision.EMBEDDING_LENGTH),
                   "vision_blocks": v(mmproj, gguf.Keys.ClipVision.BLOCK_COUNT),
                   "image_size": v(mmproj, gguf.Keys.ClipVision.IMAGE_SIZE),
                   "patch_size": v(mmproj, gguf.Keys.ClipVision.PATCH_SIZE)},
    }


def _write_lmstudio(result: PackResult, info: dict, text: gguf.GGUFReader, mmproj: gguf.GGUFReader,
                    report: CheckReport) -> Iterator[tuple[str, str, str]]:
    repo = f"{result.publisher}/{result.name}"
    result.commands = [f"lms import --user-repo {shlex.quote(repo)} --hard-link -y {shlex.quote(f.path)}"
                       for f in result.files]
    card = model_card(info, report, result.files, result.mmproj_fixes, provenance(mmproj), result.commands)
    yield "readme", "README.md", card
    yield "checksums", "SHA256SUMS", "".join(f"{f.sha256}  {Path(f.path).name}\n" for f in result.files)


def _write_ollama(result: PackResult, info: dict, text: gguf.GGUFReader, mmproj: gguf.GGUFReader,
                  report: CheckReport) -> Iterator[tuple[str, str, str]]:
    v = gguf_file.value
    bos = token_text(text, v(text, gguf.Keys.Tokenizer.BOS_ID)) or ""
    eot = end_of_turn_tokens(text)
    eos = token_text(text, v(text, gguf.Keys.Tokenizer.EOS_ID)) or ""
    fmt = match_chat_format(v(text, gguf.Keys.Tokenizer.CHAT_TEMPLATE), bos, eos,
                            bool(v(text, gguf.Keys.Tokenizer.ADD_BOS, True)))
    result.template = fmt.name if fmt else None
    result.stop = eot + [s for s in (fmt.stops if fmt else ()) if s not in eot]
    header = [f"{result.name}: written by ggraft {__version__} (`ggraft pack --ollama`)",
              f"text model: {info['recipient']}; vision: {info['donor']}, projector {info['mmproj']['projector_type']}",
              "Ollama runs a text model + mmproj pair in its llama.cpp-based runner."]
    files = result.files
    result.commands = [f"ollama create {result.name} -f {shlex.quote(str(Path(result.folder) / 'Modelfile'))}"]
    yield "modelfile", "Modelfile", modelfile(Path(files[0].path).name, Path(files[1].path).name, fmt, eos,
                                              result.stop, header)


def ollama_create(result: PackResult) -> bool:
    """Run ``ollama create NAME -f Modelfile`` when the ``ollama`` binary is on PATH.

    Returns False when it is not (the caller prints the command); its output goes to stderr.
    """
    exe = shutil.which("ollama")
    if exe is None:
        return False
    folder = Path(result.folder)
    proc = subprocess.run([exe, "create", result.name, "-f", str(folder / "Modelfile")], cwd=folder,
                          stdout=2, stderr=2)  # our stdout stays for data (--json)
    if proc.returncode != 0:
        raise EngineError(f"ollama create {result.name} exited with status {proc.returncode} (its output is above)",
                          f"the package in {folder} is complete; fix the problem and run: {result.commands[0]}")
    return True
