"""``ggraft inspect``: what a GGUF file is, from its header (through ``gguf_file.scan_gguf``).

Architecture, general.type, widths and block counts (text model or mmproj), projector type,
tensor count and bytes by type, and the provenance ggraft writes (``ggraft.*`` keys).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from ggraft.gguf_io.gguf_file import GGUFIndex, scan_gguf
from ggraft.gguf_io.output import PROVENANCE_PREFIX
from ggraft.pair.headers import projection_width, projector_type
from ggraft.pair.libmtmd import llama_cpp_knows

K = gguf.Keys
TEXT_KEYS = ("context_length", "embedding_length", "feed_forward_length", "block_count",
             "attention.head_count", "attention.head_count_kv", "expert_count", "n_deepstack_layers")
CLIP_KEYS = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count",
             "projection_dim", "image_size", "patch_size", "num_mel_bins")


@dataclass
class InspectReport:
    path: str
    size_bytes: int
    version: int
    architecture: str | None
    type: str | None
    name: str | None
    file_type: str | None
    widths: dict[str, Any] = field(default_factory=dict)
    projector: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    tensor_count: int = 0
    tensor_bytes: int = 0
    tensor_types: dict[str, dict[str, int]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    key_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _file_type(index: GGUFIndex) -> str | None:
    ft = index.value(K.General.FILE_TYPE)
    if not isinstance(ft, int):
        return None
    try:
        return gguf.LlamaFileType(ft).name
    except ValueError:
        return str(ft)


def _text_widths(index: GGUFIndex, arch: str) -> dict[str, Any]:
    return {k: v for k in TEXT_KEYS if (v := index.value(f"{arch}.{k}")) is not None}


def _clip_widths(index: GGUFIndex) -> dict[str, Any]:
    out = {}
    for part in ("vision", "audio"):
        values = {k: v for k in CLIP_KEYS if (v := index.value(f"clip.{part}.{k}")) is not None}
        if values:
            out[part] = values
    return out


def _projector(index: GGUFIndex) -> dict[str, Any]:
    proj = projector_type(index)
    width, source = projection_width(index, proj)
    return {"type": proj, "known_to_llama_cpp": llama_cpp_knows(proj) if proj else None,
            "output_width": width, "output_width_from": source,
            "has_vision_encoder": bool(index.value(K.Clip.HAS_VISION_ENCODER, False)),
            "has_audio_encoder": bool(index.value(K.Clip.HAS_AUDIO_ENCODER, False)),
            "audio_projector_type": index.value(K.ClipAudio.PROJECTOR_TYPE)}


def inspect_gguf(path: str | Path) -> InspectReport:
    index = scan_gguf(path, "GGUF file")
    try:
        arch = index.value(K.General.ARCHITECTURE)
        report = InspectReport(str(index.path), index.size, index.version, arch,
                               index.value(K.General.TYPE), index.value(K.General.NAME), _file_type(index),
                               key_count=len(index.fields))
        if arch == "clip":
            report.widths = _clip_widths(index)
            report.projector = _projector(index)
        elif arch:
            report.widths = _text_widths(index, arch)
        tokens = index.fields.get(K.Tokenizer.LIST)
        if tokens is not None:
            template = index.value(K.Tokenizer.CHAT_TEMPLATE)
            report.tokenizer = {"model": index.value(K.Tokenizer.MODEL), "tokens": tokens.count,
                                "chat_template": isinstance(template, str) and bool(template.strip())}
        split = {k: index.value(key) for k, key in (("no", K.Split.LLM_KV_SPLIT_NO), ("count", K.Split.LLM_KV_SPLIT_COUNT))
                 if index.value(key) is not None}
        report.split = split
        counts, sizes = Counter(), Counter()
        for t in index.tensors:
            counts[t.tensor_type.name] += 1
            sizes[t.tensor_type.name] += t.n_bytes
        report.tensor_count = len(index.tensors)
        report.tensor_bytes = sum(sizes.values())
        report.tensor_types = {name: {"count": counts[name], "bytes": sizes[name]} for name in sorted(counts)}
        report.provenance = {k[len(PROVENANCE_PREFIX):]: index.value(k) for k in index.fields
                             if k.startswith(PROVENANCE_PREFIX)}
        return report
    finally:
        index.close()
