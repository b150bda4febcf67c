"""The projector's metadata as LM Studio, Ollama and llama.cpp need it: ggraft's provenance keys,
the keys that make a GGUF recognisable as a vision projector, and a copy with keys set."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf

from ggraft.errors import IncompatibleError
from ggraft.gguf_io import gguf_file
from ggraft.gguf_io.output import PROVENANCE_PREFIX

V = gguf.GGUFValueType


def provenance(mmproj: gguf_file.Reader) -> dict[str, Any]:
    """The ``ggraft.*`` keys ggraft writes into the mmproj it converts or grafts."""
    return {k.removeprefix(PROVENANCE_PREFIX): gguf_file.value(mmproj, k) for k in mmproj.fields
            if k.startswith(PROVENANCE_PREFIX)}


def projector_fixes(mmproj: gguf_file.Reader) -> dict[str, tuple[V, Any]]:
    """Keys to set so llama.cpp and Ollama recognise this mmproj as a vision projector.

    Ollama files a GGUF as a projector when general.type is "projector" or when it has
    ``clip.vision.block_count`` but no ``clip.block_count``; llama.cpp loads a vision encoder
    only with ``clip.has_vision_encoder`` true.  Values come from the file's own tensors.
    """
    if gguf_file.value(mmproj, gguf.Keys.General.ARCHITECTURE) != "clip":
        return {}  # not an mmproj at all: check_pair says so
    names = [t.name for t in gguf_file.tensors(mmproj)]
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


def describe_fix(mmproj: gguf_file.Reader, key: str, new: Any) -> str:
    old = gguf_file.value(mmproj, key)
    return f"{key} = {new!r} (was {'missing' if old is None else repr(old)})"
