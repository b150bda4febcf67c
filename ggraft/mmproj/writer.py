"""The shared mmproj writer: keys, one dtype policy, streaming, atomic output.

Tensors arrive lazy (``gguf.lazy.LazyNumpyTensor``); their shapes are known without reading
data, so the header is written first and each tensor is then computed, converted and written
in turn, so peak memory stays near the largest tensor.  Output goes to a temporary file beside
the target, renamed into place only when complete.
"""
from __future__ import annotations

from pathlib import Path

import gguf

from ggraft import __version__
from ggraft.gguf_io import output_types
from ggraft.gguf_io.output import FILE_TYPES, PROVENANCE_PREFIX, Q, check_output, parse_outtype, write_gguf
from .requirements_fit import refuse_unloadable
from .converter import Converter, VisionParams

#: tensors kept in f32 whatever the output type: embeddings added to activations, the
#: text-model rows llama.cpp splices in, and every vector (norms, biases, scales; also when
#: shaped (1, C, 1, 1) to broadcast over feature maps, as ggml's binary ops take no f16 operand)
KEEP_F32 = ("v.position_embd", "v.class_embd", "v.token_embd.", "v.sam.pos_embd")
PATCH_EMBD = "v.patch_embd."
#: weights llama.cpp's graphs copy transposed (``ggml_cont(ggml_transpose(w))``, gemma3's input
#: projection): ggml copies a strided view of a block-quantized tensor block by block as if each
#: block were one element, which overruns the destination and corrupts the heap, so they are
#: never quantized (llama.cpp's own converter forces f16, citing ggml-org/llama.cpp#13025)
TRANSPOSED_IN_GRAPH = ("mm.input_projection.",)
#: matrices llama.cpp's graphs add to activations as stored (granite4_vision's Q-Former queries and
#: window positions, ``v.proj_blk.N.query`` / ``.img_pos``, models/granite4-vision.cpp): ggml's CPU
#: add takes an f32 activation only with an f32 second operand (ggml-cpu/binary-ops.cpp binary_op)
ADDED_IN_GRAPH = (".query", ".img_pos")
#: tables llama.cpp's graphs resample with ``ggml_interpolate``, which asserts f32 (ggml.c:5176):
#: DeepSeek-OCR's SAM relative positions, resized for tiles (models/deepseekocr.cpp get_rel_pos)
RESAMPLED_IN_GRAPH = (".attn.pos_h.weight", ".attn.pos_w.weight")
#: MoE routers (dots3-note's tower): clip.cpp's build_moe_ffn picks experts from them, and ggml rounds
#: their input to the weight's type, so near-tied choices flip; llama.cpp's converter keeps them f32 too
ROUTERS = (".ffn_gate_inp.",)
#: stacked experts (experts, rows, cols): matrices for ggml_mul_mat_id (which takes bf16 and q8_0), not kernels
EXPERTS = ("_exps.",)
#: the image tokens (and their ids) a converted mmproj expects, written by convert and graft
IMAGE_TOKENS_KEY, IMAGE_TOKEN_IDS_KEY = PROVENANCE_PREFIX + "image_tokens", PROVENANCE_PREFIX + "image_token_ids"


def tensor_type(name: str, shape: tuple[int, ...], outtype: Q) -> Q:
    """The one dtype policy for mmproj tensors (see the module docstring)."""
    experts = any(e in name for e in EXPERTS)
    if sum(d > 1 for d in shape) < 2 or name.startswith(KEEP_F32) or any(r in name for r in ROUTERS) \
            or name.endswith((".bias", *ADDED_IN_GRAPH, *RESAMPLED_IN_GRAPH)):
        return Q.F32
    if name.startswith(PATCH_EMBD) or (len(shape) > 2 and not experts):  # a convolution kernel: ggml's take f32 or f16,
        # and a depthwise one (one input channel per group) only f16: ggml_conv_2d_dw builds an f16 im2col
        depthwise = len(shape) == 4 and shape[1] == 1
        return Q.F32 if outtype == Q.F32 and not depthwise else Q.F16
    if outtype == Q.Q8_0:
        if name.startswith(TRANSPOSED_IN_GRAPH):
            return Q.F16
        block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
        return Q.Q8_0 if (len(shape) == 2 or experts) and shape[-1] % block == 0 else Q.F16
    return outtype


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


def convert(converter: Converter, out: Path, outtype: str = output_types.DEFAULT, force: bool = False,
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
    if converter.text_rows or converter.recipient is not None:  # rows of the text model: record whose ids
        ids = converter.token_ids()
        write_extra(w, {IMAGE_TOKENS_KEY: list(ids), IMAGE_TOKEN_IDS_KEY: list(ids.values())} if ids else {})
    write_extra(w, params.extra)
    meta = {"version": __version__, "source": converter.ckpt.path.name,
            "source_architecture": converter.ckpt.architecture, **(provenance or {})}
    for key, value in meta.items():
        w.add_string(PROVENANCE_PREFIX + key, str(value))
    refuse_unloadable(w, converter.projector_type, converter.ckpt.path)  # what llama.cpp cannot load is never written
    planned = [(name, t, tensor_type(name, tuple(t.shape), qtype)) for name, t in converter.tensors()]
    refuse_unloadable(w, converter.projector_type, converter.ckpt.path, [(n, t) for n, t, _ in planned])
    planned.reverse()  # handed over one by one: a tensor kept here would keep its computed data to the end
    return write_gguf(out, w, (planned.pop() for _ in range(len(planned))), label=f"convert {out.name}")


