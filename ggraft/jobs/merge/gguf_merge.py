"""Merging GGUF text models directly: each tensor is dequantized with gguf-py (any type it can
dequantize), merged in float32 a chunk of rows at a time, and written as the output type.

Metadata and tokenizer come from the metadata source (``metadata_source``; by default the base
model, for ``linear`` without a base the first model), architecture included, so a VLM's
language model (``qwen2vl``, with its M-RoPE sections) merges with text-only siblings of the
same tensors (``qwen2``) when the config says whose metadata the output takes.  Then tensors
only the metadata source has are copied from it.  Slices that stack layers renumber the blocks
and rewrite ``{arch}.block_count`` and every per-layer array of the metadata.
``general.file_type`` says what was written, ``general.base_model.*`` lists the merged models,
and ``ggraft.merge_*`` records the method and configuration.

Output types follow the spirit of ``ggraft.mmproj.tensor_type``: 1-D tensors (norms, biases)
stay float32, tensors the base stores in float32 among quantized ones stay float32 (llama.cpp's
converters keep them so on purpose), and q8_0 is used only where a row fits its 32-value blocks
(f16 otherwise).

Nothing whole is held: chunks of rows (computed by worker threads) are encoded and written one
at a time through gguf-py's writer into a temporary file renamed into place at the end
(``ggraft.gguf_io.output.atomic_path``), and the mapped pages of input rows already merged are handed
back, so memory stays at a few chunks per thread whatever the size of the models (TIES: plus
one float32 tensor for its thresholds).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from ggraft import __version__
from ggraft.gguf_io import gguf_file, numeric, output_types
from ggraft.errors import InputError
from ggraft.gguf_io.output import FILE_TYPES, PROVENANCE_PREFIX, atomic_path, check_output, parse_outtype, progress_bar
from .buffers import Scratch
from .config import MergeConfig, ModelSpec
from .forms import TEXT
from .methods import Contribution
from .naming import GgufNaming
from .plan import Layers, Planner, Tensor, TensorPlan
from .rows import CHUNK_ELEMENTS
from .stream import Encoder, TensorMerge, Workers, encoder, merged_rows, tensor_merge, write_merged

Q = gguf.GGMLQuantizationType
VOCAB_TENSORS = ("token_embd.weight", "output.weight")
NATIVE = (Q.F32, Q.F16)  # no gguf-py dequantization step
#: Linux's default fault_around_bytes: a page fault maps the aligned 64 KiB block around it, so
#: reading a chunk's first rows maps again up to 64 KiB of rows before them, already released
FAULT_AROUND = 64 << 10
#: keys not copied from the base: written by the writer, or describing the output anew
NOT_COPIED = (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE,
              gguf.Keys.General.QUANTIZATION_VERSION, "general.base_model.")


class GgufRows:
    """One GGUF tensor as rows (leading dimensions flattened), dequantized on read (float16: into
    its model's scratch); the mapped pages of rows merged are handed back."""

    def __init__(self, index: gguf_file.GGUFIndex, tensor: gguf_file.TensorInfo, scratch: Scratch):
        shape = numpy_shape(tensor)
        self.row_len = shape[-1] if shape else 1
        self.n_rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        self.type = tensor.tensor_type
        self._index, self._scratch = index, scratch
        self._bytes = index.raw(tensor).reshape(self.n_rows, -1)  # a view of the mapped file
        self._start, self._row_bytes = tensor.offset, self._bytes.shape[1]

    def read(self, first: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        raw = self._bytes[first:stop]
        if self.type == Q.F16:
            out = self._scratch.array((stop - first, self.row_len), np.float32) if out is None else out
            return numeric.to_float32(raw.view(np.float16), out=out)
        values = raw.view(np.float32) if self.type == Q.F32 else gguf.quants.dequantize(raw, self.type)
        if out is None:
            return values
        out[...] = values
        return out

    def release(self, first: int, stop: int) -> None:
        """Drop the mapped pages of rows ``first:stop``, and of the ``FAULT_AROUND`` bytes before
        them (the faults of these rows mapped them again), from this process; a page another
        thread still reads is simply mapped again."""
        self._index.drop_pages(self._start + first * self._row_bytes - FAULT_AROUND,
                               self._start + min(stop, self.n_rows) * self._row_bytes)


@dataclass
class GgufInput:
    spec: ModelSpec
    index: gguf_file.GGUFIndex
    scratch: Scratch = field(default_factory=Scratch)
    tensors: dict[str, gguf_file.TensorInfo] = field(init=False)

    def __post_init__(self) -> None:
        self.tensors = {t.name: t for t in self.index.tensors}

    @property
    def label(self) -> str:
        return self.spec.ref

    def rows(self, name: str) -> GgufRows:
        return GgufRows(self.index, self.index.tensor(name), self.scratch)

    def release(self, name: str) -> None:
        t = self.index.tensor(name)
        self.index.drop_pages(t.offset - FAULT_AROUND, t.offset + t.n_bytes)


class StreamedTensor:
    """Tensor data for ``GGUFWriter.write_tensor_data``, which asks it only for ``nbytes`` and
    ``tofile(fout)``: no whole tensor is held.  Each chunk is written at its offset in the file
    by the thread that computed it (``os.pwrite``), so writing runs in parallel with computing;
    where the OS has no ``pwrite``, chunks are written in order by the calling thread."""

    def __init__(self, nbytes: int, row_bytes: int, merge: TensorMerge, encode: Encoder, workers: Workers,
                 progress: Callable[[int], None]):
        self.nbytes, self._row_bytes, self._merge, self._encode = nbytes, row_bytes, merge, encode
        self._workers, self._progress = workers, progress

    def tofile(self, fout) -> None:
        fout.flush()
        start, fd = fout.tell(), fout.fileno()

        def write_at(first_row: int, encoded: np.ndarray) -> None:
            data, offset = memoryview(encoded).cast("B"), start + first_row * self._row_bytes
            while data:
                n = os.pwrite(fd, data, offset)
                data, offset = data[n:], offset + n

        if hasattr(os, "pwrite"):
            sizes = write_merged(self._merge, self._encode, write_at, self._workers)
        else:
            sizes = (fout.write(memoryview(c).cast("B")) for c in merged_rows(self._merge, self._encode, self._workers))
        written = 0
        for n in sizes:
            written += n
            self._progress(n)
        if written != self.nbytes:
            raise InputError(f"merge produced {written} bytes for a tensor of {self.nbytes}")
        fout.seek(start + written)


def numpy_shape(tensor: gguf_file.TensorInfo) -> tuple[int, ...]:
    return tuple(reversed(tensor.shape))


def open_inputs(config: MergeConfig) -> dict[str, GgufInput]:
    """Every input by reference, the metadata source first, checked to be whole text GGUFs of one
    architecture (or of several when the config names the metadata source) whose tensor types
    gguf-py can dequantize."""
    if set(config.modules) != {TEXT}:
        raise InputError("a GGUF text model has only a text decoder; 'modules' with a vision_tower or "
                         "multi_modal_projector merges Hugging Face folders")
    refs = [metadata_reference(config)] + [m.ref for m in config.inputs]
    inputs = {}
    for ref in dict.fromkeys(refs):
        spec = config.spec(ref)
        index = gguf_file.scan_gguf(spec.path, "GGUF model")
        parts = index.value(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 1)
        if parts > 1:
            raise InputError(f"{spec.ref}: is one part of a GGUF split in {parts}; merge whole models",
                             hint="join the parts first: llama-gguf-split --merge FIRST-PART OUT.gguf")
        if index.order != "<":
            raise InputError(f"{spec.ref}: is a big-endian GGUF; merge little-endian models")
        inputs[ref] = GgufInput(spec, index)
    ref = next(iter(inputs.values()))
    arch = ref.index.value(gguf.Keys.General.ARCHITECTURE)
    for model in inputs.values():
        kind = model.index.value(gguf.Keys.General.ARCHITECTURE)
        if kind == "clip":
            raise InputError(f"{model.label}: is an mmproj (vision encoder), not a text model",
                             hint="merge text models; give the mmproj to --check-with")
        if kind != arch and config.metadata_source is None:
            raise InputError(f"{model.label}: architecture {kind!r} differs from {ref.label}'s {arch!r}; add "
                             "'metadata_source: MODEL' to the config to say whose architecture and metadata the "
                             "output takes", hint="e.g. a VLM's language model (qwen2vl) merges with its text-only "
                             "siblings (qwen2) when every merged tensor has the same name and shape")
        _check_dequantizable(model)
    return inputs


def _check_dequantizable(model: GgufInput) -> None:
    seen: set[Q] = set()
    for t in model.index.tensors:
        if t.tensor_type in NATIVE or t.tensor_type in seen:
            continue
        try:
            gguf.quants.dequantize(model.index.raw(t, 0, 1), t.tensor_type)
        except NotImplementedError:
            raise InputError(f"{model.label}: tensor {t.name!r} is {t.tensor_type.name}, which gguf-py "
                             "cannot dequantize (only float and block-quantized tensors merge)") from None
        seen.add(t.tensor_type)


def metadata_reference(config: MergeConfig) -> str:
    """The model whose metadata the output takes."""
    return config.metadata_source or config.inputs[0].ref


def default_outtype(index: gguf_file.GGUFIndex) -> str:
    """The base model's own type when it is one ggraft writes, else the default (f16)."""
    own = output_types.by_file_type(index.value(gguf.Keys.General.FILE_TYPE, -1))
    return own.name if own else output_types.DEFAULT


def tensor_type(shape: tuple[int, ...], outtype: Q, stored: Q, keeps_f32: bool) -> Q:
    """The output type of one tensor (see the module docstring)."""
    if len(shape) < 2 or (keeps_f32 and stored == Q.F32):
        return Q.F32
    if outtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return outtype


def copy_metadata(index: gguf_file.GGUFIndex, w: gguf.GGUFWriter, replaced: dict | None = None) -> None:
    """Every key of the metadata source (tokenizer included) but those in NOT_COPIED, strings byte
    for byte; ``replaced``: new values for some keys (of the same types)."""
    replaced = replaced or {}
    for name, field in index.fields.items():
        if not name.startswith(NOT_COPIED):
            value = replaced[name] if name in replaced else index.value(name, raw_strings=True)
            w.add_key_value(name, value, field.type, sub_type=field.item_type)


def layer_keys(ref: GgufInput, inputs: dict[str, GgufInput], layers: Layers) -> dict:
    """The keys a stack of layers changes: ``{arch}.block_count``, and each per-layer array (an
    array under ``{arch}.`` with one value per block) rebuilt from the models the layers come from."""
    arch = ref.index.value(gguf.Keys.General.ARCHITECTURE)
    count_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    count = ref.index.value(count_key)
    out: dict = {count_key: len(layers.origin)}
    for name, field in ref.index.fields.items():
        if (not name.startswith(arch + ".") or field.type != gguf.GGUFValueType.ARRAY
                or name == gguf.Keys.Rope.DIMENSION_SECTIONS.format(arch=arch)):  # M-RoPE's 4 sections
            continue
        if len(ref.index.value(name)) != count:
            continue
        values = []
        for model, layer in layers.origin:
            theirs = inputs[model].index.value(name)
            if not isinstance(theirs, list) or layer >= len(theirs):
                raise InputError(f"{model}: has no per-layer {name!r} for its layer {layer} (which {ref.label} has)")
            values.append(theirs[layer])
        out[name] = values
    return out


def write_provenance(w: gguf.GGUFWriter, config: MergeConfig, inputs: list[GgufInput]) -> None:
    w.add_base_model_count(len(inputs))
    for i, model in enumerate(inputs):
        w.add_base_model_name(i, model.index.value(gguf.Keys.General.NAME) or Path(model.spec.path).stem)
    w.add_string(PROVENANCE_PREFIX + "version", __version__)
    w.add_string(PROVENANCE_PREFIX + "merge_method", config.method.name)
    w.add_string(PROVENANCE_PREFIX + "merge_config", json.dumps(config.describe(), sort_keys=True))


def merge_gguf(config: MergeConfig, out: Path, outtype: str | None = None, force: bool = False,
               embed_common: bool = False, chunk_elements: int = CHUNK_ELEMENTS,
               threads: int | None = None) -> tuple[int, str]:
    """Write the merged text GGUF to ``out``; returns (tensor count, output type)."""
    check_output(out, force)
    inputs = open_inputs(config)
    ref = next(iter(inputs.values()))
    outtype = outtype or config.outtype or default_outtype(ref.index)
    qtype = parse_outtype(outtype)
    plans, layers = plan_gguf(config, inputs, embed_common)
    keeps_f32 = any(t.tensor_type != Q.F32 and len(t.shape) > 1 for t in ref.tensors.values())
    types = {p.name: tensor_type(p.shape, qtype, stored_type(inputs, p.reference), keeps_f32) for p in plans}

    w = gguf.GGUFWriter(path=None, arch=ref.index.value(gguf.Keys.General.ARCHITECTURE))
    copy_metadata(ref.index, w, layer_keys(ref, inputs, layers) if layers else None)
    w.add_file_type(FILE_TYPES[qtype])
    if Q.Q8_0 in types.values():
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_provenance(w, config, [inputs[m.ref] for m in config.inputs])
    sizes = {}
    for p in plans:
        shape, dtype = numeric.encoded_layout(p.shape, types[p.name])
        sizes[p.name] = math.prod(shape) * dtype.itemsize
        w.add_tensor_info(p.name, shape, dtype, sizes[p.name], raw_dtype=types[p.name])

    total = sum(sizes.values())
    with atomic_path(out) as tmp, progress_bar(total, f"merge {out.name}") as bar, Workers(threads) as workers:
        task = bar.add_task("merge", total=total)
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p in plans:
            merge = _tensor_merge(inputs, p, chunk_elements)
            row_bytes = sizes[p.name] // max(1, math.prod(p.shape[:-1]))
            w.write_tensor_data(StreamedTensor(sizes[p.name], row_bytes, merge, encoder(types[p.name]), workers,
                                               lambda n: bar.advance(task, n)))
            for tensor in {p.reference, p.base, *(part.tensor for part in p.models)} - {None}:
                inputs[tensor.model].release(tensor.name)
        w.close()
    return len(plans), outtype


def plan_gguf(config: MergeConfig, inputs: dict[str, GgufInput],
              embed_common: bool) -> tuple[list[TensorPlan], Layers | None]:
    """Every output tensor planned (and, for stacked slices, where each output layer comes from)."""
    ref = next(iter(inputs.values()))
    arch = ref.index.value(gguf.Keys.General.ARCHITECTURE)
    tables = {label: {n: numpy_shape(t) for n, t in m.tensors.items()} for label, m in inputs.items()}
    n_layers = ref.index.value(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch), 0)
    module = config.modules[TEXT]
    planner = Planner(config, module, tables, ref.label, GgufNaming(arch, n_layers if isinstance(n_layers, int) else 0),
                      VOCAB_TENSORS, embed_common)
    if module.whole_models:
        return planner.whole(copy_only_in_reference=config.metadata_source is not None), None
    return planner.sliced()


def stored_type(inputs: dict[str, GgufInput], tensor: Tensor) -> Q:
    return inputs[tensor.model].tensors[tensor.name].tensor_type


def _tensor_merge(inputs: dict[str, GgufInput], plan: TensorPlan, chunk_elements: int) -> TensorMerge:
    def rows(tensor: Tensor) -> GgufRows:
        return inputs[tensor.model].rows(tensor.name)

    models = [Contribution(rows(p.tensor), p.weight, p.density) for p in plan.models]
    return tensor_merge(plan.method, plan, rows(plan.reference), rows(plan.base) if plan.base else None, models,
                        plan.settings, chunk_elements)
