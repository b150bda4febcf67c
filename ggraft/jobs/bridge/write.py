"""Writing a bridged mmproj: the donor's keys and tensors, with its last layer composed with the
map, the text-model rows it carries replaced, and the recipient's width in every key that holds it.

Every tensor keeps the donor's type unless ``--outtype`` asks for another (the shared dtype policy
then decides per tensor); the composed layer takes the policy's type for the donor's own type at
its new shape.  What the installed llama.cpp could not load is refused before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from ggraft import __version__
from ggraft.errors import InputError
from ggraft.gguf_io import output
from ggraft.gguf_io.gguf_file import GGUFIndex, TensorInfo
from ggraft.jobs.graft import REENCODE_HINT, writable
from ggraft.mmproj import writer as mmproj
from ggraft.mmproj.converter import Lazy, in_memory
from ggraft.mmproj.requirements_fit import refuse_unloadable
from .fit import LinearMap
from .last_layer import LastLayer, composed_bias, composed_weight

Q = gguf.GGMLQuantizationType
P = output.PROVENANCE_PREFIX
#: every key that holds the width of the text model an mmproj feeds: clip.cpp reads it into
#: hparams.projection_dim (the qwen2.5vl graph reshapes by it); the family keys clip.cpp reads
#: (merge and scale factors, windows, tiles, feature layers, DeepStack flags) hold none
WIDTH_KEYS = (gguf.Keys.ClipVision.PROJECTION_DIM,)
#: provenance of the donor that no longer holds for the bridged file (the image-token ids are the
#: donor tokenizer's; a graft's recipient is not this one)
STALE_PROVENANCE = tuple(P + k for k in ("version", "image_tokens", "image_token_ids", "donor", "recipient",
                                         "recipient_header_sha256"))
BRIDGE = P + "bridge."


@dataclass
class BridgePlan:
    """What changes between the donor mmproj and the bridged one."""

    layer: LastLayer
    linear: LinearMap
    width: int
    #: mmproj tensor name -> its new row (text-model rows the mmproj carries)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)


def _values(m: GGUFIndex, t: TensorInfo) -> np.ndarray:
    """A tensor of the donor as float32 in numpy order."""
    return gguf.quants.dequantize(m.raw(t), t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))


def _stored(m: GGUFIndex, t: TensorInfo) -> Lazy:
    """A tensor of the donor as float32 in numpy order, read only when it is written."""
    return _computed(tuple(int(n) for n in reversed(t.shape)), lambda: _values(m, t))


def _computed(shape: tuple[int, ...], compute: Callable[[], np.ndarray]) -> Lazy:
    return Lazy(meta=Lazy.meta_with_dtype_and_shape(np.float32, shape), args=(), func=compute)


def _copy_keys(m: GGUFIndex, w: gguf.GGUFWriter, plan: BridgePlan, qtype: Q | None) -> None:
    skip = {gguf.Keys.General.ARCHITECTURE, *STALE_PROVENANCE, *plan.layer.leaves_out_keys}
    if qtype is not None:
        skip.add(gguf.Keys.General.FILE_TYPE)
    for key, f in m.fields.items():
        if key in skip or key.startswith(BRIDGE) or (f.type == gguf.GGUFValueType.ARRAY and not f.count):
            continue  # (GGUFWriter cannot write an empty array; llama.cpp reads none as absent)
        if key in WIDTH_KEYS:
            w.add_key_value(key, plan.width, f.type)
        else:
            w.add_key_value(key, m.value(key, raw_strings=True), f.type, sub_type=f.item_type)
    for key in WIDTH_KEYS:
        if key not in m.fields:
            w.add_uint32(key, plan.width)
    if qtype is not None:
        w.add_file_type(output.FILE_TYPES[qtype])
    w.add_string(P + "version", __version__)
    mmproj.write_extra(w, {BRIDGE + k: v for k, v in plan.provenance.items()})


def _own_type(m: GGUFIndex, t: TensorInfo, shape: tuple[int, ...], qtype: Q | None, changed: bool) -> Q:
    if qtype is not None:
        return mmproj.tensor_type(t.name, shape, qtype)
    if changed:  # the policy, for the donor's own type, at the new shape
        return mmproj.tensor_type(t.name, shape, t.tensor_type if t.tensor_type in output.FILE_TYPES else Q.F16)
    if not writable(t.tensor_type):
        raise InputError(f"{m.path}: tensor {t.name} is {t.tensor_type.name}, which gguf-py cannot write back",
                         hint=REENCODE_HINT)
    return t.tensor_type


def _last_layer_tensors(m: GGUFIndex, plan: BridgePlan) -> dict[str, Lazy]:
    """The composed weight and (where the type has one) bias, computed when written."""
    layer, linear = plan.layer, plan.linear
    weight, bias = m.tensor(layer.weight), m.tensor(layer.bias) if layer.bias else None
    rows, cols = (int(n) for n in reversed(weight.shape))
    shape = (rows, plan.width) if layer.transposed else (plan.width, cols)
    out = {layer.weight: _computed(shape, lambda: composed_weight(layer, _values(m, weight), linear))}
    if layer.bias:
        out[layer.bias] = _computed((plan.width,), lambda: composed_bias(
            _values(m, bias).reshape(-1) if bias is not None else None, linear))
    return out


def write_bridged(m: GGUFIndex, plan: BridgePlan, projector: str, out: Path, qtype: Q | None) -> Path:
    """Write the bridged mmproj to ``out`` (atomically)."""
    w = gguf.GGUFWriter(path=None, arch="clip")
    _copy_keys(m, w, plan, qtype)
    replaced = {**_last_layer_tensors(m, plan), **{n: in_memory(r.astype(np.float32)) for n, r in plan.rows.items()}}
    tensors = []
    for t in m.tensors:
        if plan.layer.leaves_out and t.name.startswith(plan.layer.leaves_out):
            continue
        source = replaced.pop(t.name, None)
        changed = source is not None
        source = source if changed else _stored(m, t)
        tensors.append((t.name, source, _own_type(m, t, tuple(source.shape), qtype, changed)))
    for name, source in replaced.items():  # a bias or row the donor did not have
        tensors.append((name, source, Q.F32))
    refuse_unloadable(w, projector, m.path, [(name, source) for name, source, _ in tensors])
    return output.write_gguf(out, w, tensors, label=f"bridge {out.name}")
