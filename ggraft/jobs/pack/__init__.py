"""``ggraft pack``: ship a checked pair in the layout a runtime expects (``targets.TARGETS``:
LM Studio's model folder, Ollama's Modelfile folder).

GGUFs are hard-linked where the file system allows, else copied.  An mmproj whose metadata
would not let llama.cpp or Ollama recognise it as a vision projector is rewritten with gguf-py
into the package (the source is never touched).  The pair that ships must pass ``ggraft check``.
Both GGUFs are read through the validated header index (the vocab is never decoded whole); all
is built in a temporary folder beside the target, renamed into place at the end.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf

from ggraft.errors import IncompatibleError, InputError
from ggraft.gguf_io import gguf_file
from ggraft.gguf_io.output import atomic_folder, check_output
from ggraft.pair.check import CheckReport, check_pair

from .files import LINK_MODES, place, sha256
from .names import default_name, type_label, validate_name
from .projector import describe_fix, projector_fixes, provenance, rewrite_with_keys
from .targets import target_named


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


def pack(text: str | Path, mmproj: str | Path, layout: str, out_dir: str | Path, name: str | None = None,
         publisher: str | None = None, link: str = "auto", force: bool = False) -> PackResult:
    """Pack a pair for the target ``layout`` ("lmstudio", "ollama") under ``out_dir`` (created if missing).

    ``link``: "auto" hard-links where possible and copies otherwise, "link" requires hard links,
    "copy" always copies.  Raises InputError (exit 2) for bad names and existing targets,
    IncompatibleError (exit 1) when the pair fails ``ggraft check``.
    """
    kind = target_named(layout)
    if link not in LINK_MODES:
        raise InputError(f"unknown link mode {link!r}; choose one of {', '.join(LINK_MODES)}")
    text, mmproj = Path(text), Path(mmproj)
    if name is not None:
        kind.validate_name(name)
    if publisher is not None:
        if not kind.takes_publisher:
            raise InputError(f"--publisher applies to {' / '.join('--' + t for t in _publishing())} only")
        validate_name(publisher, "PUBLISHER")
    t_index = gguf_file.scan_gguf(text, "text GGUF")
    m_index = gguf_file.scan_gguf(mmproj, "mmproj GGUF")
    if int(gguf_file.value(t_index, gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 0) or 0) > 1:
        raise InputError(f"{text}: is one shard of a split GGUF; pack takes a text model in one file",
                         "merge the shards first: llama-gguf-split --merge FIRST-SHARD.gguf merged.gguf")
    name = name or default_name(t_index, text)
    parts = kind.folder_parts(name, publisher)
    publisher = parts[0] if kind.takes_publisher else None
    target = Path(out_dir).joinpath(*parts)
    check_output(target, force, folder=True, make_parent=True)
    fixes = projector_fixes(m_index)
    report = None if fixes else _checked(t_index, m_index)  # nothing to rewrite: check before writing
    text_file = f"{name}-{type_label(t_index)}.gguf"
    mmproj_file = f"mmproj-{name}-{type_label(m_index)}.gguf"
    with atomic_folder(target, force) as stage:
        text_method = place(text, stage / text_file, link)
        if fixes:
            rewrite_with_keys(gguf_file.open_gguf(mmproj, "mmproj GGUF"), stage / mmproj_file, fixes)
            report = _checked(text, stage / mmproj_file)  # check the pair that ships
            report.mmproj["path"] = str(target / mmproj_file)
            mmproj_method = "rewritten"
        else:
            mmproj_method = place(mmproj, stage / mmproj_file, link)
        files = [_packed("text", stage / text_file, target, text_method),
                 _packed("mmproj", stage / mmproj_file, target, mmproj_method)]
        result = PackResult(layout, str(target), name, publisher, files, report.to_dict(),
                            mmproj_fixes=[describe_fix(m_index, key, val) for key, (_, val) in fixes.items()])
        info = _card_info(result, t_index, m_index, fixes)
        for role, file_name, content in kind.files(result, info, t_index, m_index, report):
            (stage / file_name).write_text(content, encoding="utf-8")
            result.files.append(_packed(role, stage / file_name, target, "written"))
    return result


def _publishing() -> list[str]:
    from .targets import TARGETS

    return [n for n, cls in TARGETS.items() if cls.takes_publisher]


def _checked(text: Path | gguf_file.GGUFIndex, mmproj: Path | gguf_file.GGUFIndex) -> CheckReport:
    report = check_pair(text, mmproj)
    if not report.ok:
        first = next(f for f in report.findings if f.severity == "error")
        raise IncompatibleError(f"ggraft check fails: {first.message}", first.hint or "run 'ggraft check' for details")
    return report


def _packed(role: str, staged: Path, target: Path, method: str) -> PackedFile:
    return PackedFile(role, str(target / staged.name), staged.stat().st_size, sha256(staged), method)


def _card_info(result: PackResult, text: gguf_file.GGUFIndex, mmproj: gguf_file.GGUFIndex,
               fixes: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """What the model card and Modelfile say about the pair (the mmproj as shipped, with fixes)."""
    def v(reader: gguf_file.GGUFIndex, key: str, default: Any = None) -> Any:
        return fixes[key][1] if reader is mmproj and key in fixes else gguf_file.value(reader, key, default)

    prov = provenance(mmproj)
    t_arch = v(text, gguf.Keys.General.ARCHITECTURE, "")
    donor = prov.get("donor") or prov.get("source") or str(v(mmproj, gguf.Keys.General.NAME) or Path(mmproj.path).stem)
    if prov.get("source_architecture"):
        donor = f"{donor} ({prov['source_architecture']})"
    K = gguf.Keys.ClipVision
    return {
        "name": result.name, "publisher": result.publisher, "donor": donor,
        "recipient": prov.get("recipient") or v(text, gguf.Keys.General.NAME) or Path(text.path).stem,
        "text": {"architecture": t_arch, "embedding_length": v(text, f"{t_arch}.embedding_length")},
        "mmproj": {"projector_type": v(mmproj, gguf.Keys.Clip.PROJECTOR_TYPE), "projection_dim": v(mmproj, K.PROJECTION_DIM),
                   "vision_width": v(mmproj, K.EMBEDDING_LENGTH), "vision_blocks": v(mmproj, K.BLOCK_COUNT),
                   "image_size": v(mmproj, K.IMAGE_SIZE), "patch_size": v(mmproj, K.PATCH_SIZE)},
    }
