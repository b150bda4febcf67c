"""The shared mmproj writer: keys, one dtype policy, streaming, atomic output.

Tensors arrive lazy (``gguf.lazy.LazyNumpyTensor``); their shapes are known without reading
data, so the header is written first and each tensor is then computed, converted and written
in turn, so peak memory stays near the largest tensor.  Output goes to a temporary file beside
the target, renamed into place only when complete.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import gguf
import numpy as np
from gguf.lazy import LazyNumpyTensor

from . import __version__, numeric
from .converter import Converter, VisionParams
from .errors import InputError, OutputExistsError

Q = gguf.GGMLQuantizationType
OUTTYPES: dict[str, Q] = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES: dict[Q, gguf.LlamaFileType] = {
    Q.F32: gguf.LlamaFileType.ALL_F32,
    Q.F16: gguf.LlamaFileType.MOSTLY_F16,
    Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
#: tensors kept in f32 whatever the output type: embeddings added to activations, the
#: text-model rows llama.cpp splices in, and every 1-D tensor (norms, biases)
KEEP_F32 = ("v.position_embd", "v.class_embd", "v.token_embd.")
PATCH_EMBD = "v.patch_embd."
#: weights llama.cpp's graphs copy transposed (``ggml_cont(ggml_transpose(w))``, gemma3's input
#: projection): ggml copies a strided view of a block-quantized tensor block by block as if each
#: block were one element, which overruns the destination and corrupts the heap, so they are
#: never quantized (llama.cpp's own converter forces f16, citing ggml-org/llama.cpp#13025)
TRANSPOSED_IN_GRAPH = ("mm.input_projection.",)
PROVENANCE_PREFIX = "ggraft."
#: the image tokens (and their ids) a converted mmproj expects, written by convert and graft
IMAGE_TOKENS_KEY, IMAGE_TOKEN_IDS_KEY = PROVENANCE_PREFIX + "image_tokens", PROVENANCE_PREFIX + "image_token_ids"


def tensor_type(name: str, shape: tuple[int, ...], outtype: Q) -> Q:
    """The one dtype policy for mmproj tensors (see the module docstring)."""
    if len(shape) < 2 or name.startswith(KEEP_F32) or name.endswith(".bias"):
        return Q.F32
    if name.startswith(PATCH_EMBD):  # a convolution kernel: at most f16
        return Q.F32 if outtype == Q.F32 else Q.F16
    if outtype == Q.Q8_0:
        if name.startswith(TRANSPOSED_IN_GRAPH):
            return Q.F16
        block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
        return Q.Q8_0 if len(shape) == 2 and shape[-1] % block == 0 else Q.F16
    return outtype


def convert_tensor(tensor: LazyNumpyTensor, qtype: Q) -> LazyNumpyTensor:
    """Lazily cast/quantize to ``qtype`` (``numeric``: ggml or gguf-py, the same bytes)."""
    if tensor.dtype != np.float32:  # (a lazy astype always copies, even to its own dtype)
        tensor = tensor.astype(np.float32)
    if qtype == Q.F16:  # ggml's vectorised rounding, same results as numpy's, ~25x faster
        return LazyNumpyTensor._wrap_fn(numeric.to_float16, meta_noop=np.float16)(tensor)
    if qtype in numeric.GGML_QUANTIZED:  # ggml's quantizer, same bytes as gguf-py's
        layout = (np.uint8, lambda shape: numeric.encoded_layout(shape, qtype)[0])
        return LazyNumpyTensor._wrap_fn(lambda values: numeric.quantize(values, qtype), meta_noop=layout)(tensor)
    return gguf.quants.quantize(tensor, qtype)


def parse_outtype(name: str) -> Q:
    try:
        return OUTTYPES[name.lower()]
    except KeyError:
        raise InputError(f"unknown output type {name!r}; choose one of {', '.join(OUTTYPES)}") from None


def write_vision_keys(w: gguf.GGUFWriter, p: VisionParams, projector_type: str) -> None:
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(projector_type)
    w.add_vision_image_size(p.image_size)
    w.add_vision_patch_size(p.patch_size)
    w.add_vision_embedding_length(p.embedding_length)
    w.add_vision_feed_forward_length(p.feed_forward_length)
    w.add_vision_block_count(p.block_count)
    w.add_vision_head_count(p.head_count)
    w.add_vision_attention_layernorm_eps(p.layer_norm_eps)
    w.add_vision_projection_dim(p.projection_dim)
    w.add_vision_image_mean(p.image_mean)
    w.add_vision_image_std(p.image_std)
    if p.use_gelu:
        w.add_vision_use_gelu(True)
    if p.use_silu:
        w.add_vision_use_silu(True)


def write_extra(w: gguf.GGUFWriter, extra: dict) -> None:
    """Family keys: ints, floats, bools, strings and lists of them."""
    for key, value in extra.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, list(value))


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: exists; pass --force to overwrite")
    if out.exists() and out.is_dir():
        raise InputError(f"{out}: is a directory")
    if not out.parent.exists():
        raise InputError(f"{out.parent}: output folder does not exist")


@contextmanager
def atomic_path(out: Path) -> Iterator[Path]:
    """A temporary path beside ``out`` that replaces it only if the block completes."""
    tmp = out.with_name(f".{out.name}.ggraft-tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def progress_bar(total: int, label: str):
    """A rich progress bar on a terminal (stderr), nothing otherwise."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal, transient=True)


def computed_in_background(tensors: Iterable[LazyNumpyTensor]) -> Iterator[np.ndarray]:
    """Each lazy tensor computed, the next one on a worker thread while the caller writes the
    current one (numpy and file writes release the GIL), so reading/converting overlaps writing.
    At most two tensors are held at once."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for tensor in tensors:
            job = pool.submit(LazyNumpyTensor.to_eager, tensor)
            del tensor
            if pending is not None:
                yield pending.result()
            pending = job
        if pending is not None:
            yield pending.result()


def write_gguf(out: Path, w: gguf.GGUFWriter, tensors: Iterable[tuple[str, LazyNumpyTensor, Q]],
               label: str = "writing") -> Path:
    """Register every tensor's info, then stream header, keys and data to ``out`` atomically.

    ``tensors`` yields (name, lazy source, target type); each tensor is computed only when its
    turn to be written comes, and released after.
    """
    plan: list[tuple[str, LazyNumpyTensor]] = []  # lazy: nothing is read yet
    for name, tensor, qtype in tensors:
        converted = convert_tensor(tensor, qtype)
        w.add_tensor_info(name, converted.shape, converted.dtype, converted.nbytes, raw_dtype=qtype)
        plan.append((name, converted))
    total = sum(int(t.nbytes) for _, t in plan)
    with atomic_path(out) as tmp, progress_bar(total, label) as bar:
        task = bar.add_task(label, total=total)
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        plan.reverse()  # popped as written, so each computed tensor is released after its turn
        for data in computed_in_background(plan.pop()[1] for _ in range(len(plan))):
            w.write_tensor_data(data)
            bar.advance(task, data.nbytes)
            del data
        w.close()
    return out


def convert(converter: Converter, out: Path, outtype: str = "f16", force: bool = False,
            provenance: dict[str, str] | None = None) -> Path:
    """Write ``converter``'s mmproj to ``out``."""
    out = Path(out)
    check_output(out, force)
    qtype = parse_outtype(outtype)
    params = converter.params()
    w = gguf.GGUFWriter(path=None, arch="clip")
    w.add_name(f"{converter.ckpt.path.name} (mmproj)")
    w.add_file_type(FILE_TYPES[qtype])
    write_vision_keys(w, params, converter.projector_type)
    write_extra(w, params.extra)
    meta = {"version": __version__, "source": converter.ckpt.path.name,
            "source_architecture": converter.ckpt.architecture, **(provenance or {})}
    for key, value in meta.items():
        w.add_string(PROVENANCE_PREFIX + key, str(value))
    planned = ((name, t, tensor_type(name, tuple(t.shape), qtype)) for name, t in converter.tensors())
    return write_gguf(out, w, planned, label=f"convert {out.name}")


