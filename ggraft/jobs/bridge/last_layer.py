"""Data: the last layer of each projector type, where the image embeddings leave the mmproj.

Read from the graphs of the llama.cpp that llama-cpp-python 0.3.36 vendors
(``tools/mtmd/models/*.cpp``; which tensors ``clip.cpp`` loads for each type, and whether as
optional, in its ``load_tensors``).  A bridge composes its map ``y = M x + b`` with that layer:
``W' = M W`` and ``b' = M a + b`` (``a``: the layer's own bias), so the mmproj computes exactly
``M (donor output) + b``.  Where llama.cpp's graph adds no bias after the layer, the map is fitted
through the origin (``b = 0``).  Every projector type ggraft converts has a row here, in
``NOT_LINEAR`` or in ``NOT_PROVEN``; any other type is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from ggraft.errors import InputError, UnsupportedModelError
from ggraft.gguf_io.gguf_file import GGUFIndex
from .fit import LinearMap

T, NAMES = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
MM2 = NAMES[T.V_MMPROJ].format(bid=2)
INPUT_PROJECTION = NAMES[T.V_MM_INP_PROJ]
FC = NAMES[T.V_MMPROJ_FC]
MLP3 = NAMES[T.V_MMPROJ_MLP].format(bid=3)
DEEPSTACK_PREFIX = NAMES[T.V_DS_FC1].split("{bid}")[0]  # v.deepstack.


@dataclass(frozen=True)
class LastLayer:
    """The linear map llama.cpp's graph ends with for a projector type."""

    weight: str
    #: the bias llama.cpp adds after the product (None: the graph adds none)
    bias: str | None
    #: where the graph says so
    source: str
    #: stored as (in, out) in numpy order and multiplied by its transpose (gemma3)
    transposed: bool = False
    #: tensors (by name prefix) and keys of features that go elsewhere than the input embeddings
    leaves_out: tuple[str, ...] = ()
    leaves_out_keys: tuple[str, ...] = ()
    #: why they are left out
    leaves_out_why: str = ""


_MM2 = (f"{MM2}.weight", f"{MM2}.bias")
LAST_LINEAR: dict[str, LastLayer] = {
    "mlp": LastLayer(*_MM2, "models/llava.cpp 170-173: build_mm(mm_2_w) + mm_2_b"),
    "pixtral": LastLayer(*_MM2, "models/pixtral.cpp: build_ffn(mm_1, GELU, mm_2); the [IMG_BREAK] rows are "
                         "concatenated after it (clip.cpp loads mm.2.bias as optional: written when absent)"),
    "lfm2": LastLayer(*_MM2, "models/siglip.cpp: build_ffn(mm_1, GELU, mm_2)"),
    "qwen2vl_merger": LastLayer(*_MM2, "models/qwen2vl.cpp: build_ffn(mm_0, GELU, mm_1 = mm.2)"),
    "qwen2.5vl_merger": LastLayer(*_MM2, "models/qwen2vl.cpp: build_ffn(mm_0, GELU, mm_1 = mm.2), then a "
                                  "reordering of whole rows (window_idx), which commutes with a per-row map"),
    "qwen3vl_merger": LastLayer(
        *_MM2, "models/qwen3vl.cpp: build_ffn(mm_0, GELU, mm_1 = mm.2), DeepStack features concatenated after it",
        leaves_out=(DEEPSTACK_PREFIX,), leaves_out_keys=(gguf.Keys.ClipVision.IS_DEEPSTACK_LAYERS,),
        leaves_out_why="DeepStack features are added to the donor's hidden states inside its first layers, not "
                       "fed as input embeddings; no other text model reads them, so they are left out"),
    "internvl": LastLayer(f"{MLP3}.weight", f"{MLP3}.bias", "models/internvl.cpp: build_ffn(mm_1, GELU, mm_3)"),
    "idefics3": LastLayer(f"{FC}.weight", None, "models/siglip.cpp: build_mm(mm_fc_w) after the pixel shuffle"),
    "llama4": LastLayer(f"{FC}.weight", None, "models/llama4.cpp: build_mm(mm_model_proj) after the adapter MLP"),
    "gemma3": LastLayer(f"{INPUT_PROJECTION}.weight", None, "models/siglip.cpp: ggml_mul_mat(transpose("
                        "mm_input_proj_w), x) after the soft-embedding norm", transposed=True),
    "gemma4v": LastLayer(f"{INPUT_PROJECTION}.weight", None, "models/gemma4v.cpp: build_mm(mm_input_proj_w) "
                         "after an RMS norm (a clamp around it only when the file has clamp bounds)"),
    "gemma4uv": LastLayer(f"{INPUT_PROJECTION}.weight", None, "models/gemma4uv.cpp: build_mm(mm_input_proj_w) "
                          "after an RMS norm"),
}
#: projector types ggraft converts whose graph does not end with a linear map
NOT_LINEAR: dict[str, str] = {
    "gemma3nv": "models/mobilenetv5.cpp ends with an RMS norm after the input projection (Gemma 3n's "
                "embedding_post_projection_norm), which no change of the projection can move to another space",
}
#: projector types ggraft converts whose last layer no bridge test proves yet: refused, not guessed
NOT_PROVEN: tuple[str, ...] = ("glm4v", "glm5v", "paddleocr", "lightonocr", "janus_pro", "minicpmv4_6",
                               "granite4_vision", "step3vl", "hunyuanvl", "exaone4_5", "kimik25", "deepseekocr",
                               "deepseekocr2", "minimax_m3", "qwen2.5o", "muse-glimmer", "nemotron_v2_vl",
                               "dots3note_v")
#: clamp bounds clip.cpp applies to gemma4v's output after the product (clip.cpp load_tensors, gemma4v)
OUTPUT_CLAMPS = (".output_min", ".output_max")


def last_layer(m: GGUFIndex, projector: str) -> LastLayer:
    """The last layer of an mmproj of type ``projector``, or an UnsupportedModelError saying why
    there is none to compose with."""
    if projector in NOT_LINEAR:
        raise UnsupportedModelError(f"{m.path}: projector type {projector!r} does not end with a linear layer: "
                                    f"{NOT_LINEAR[projector]}")
    if projector in NOT_PROVEN:
        raise UnsupportedModelError(f"{m.path}: ggraft bridge does not take {projector!r} mmprojs yet (no test "
                                    f"proves its last layer); it takes {', '.join(sorted(LAST_LINEAR))}")
    layer = LAST_LINEAR.get(projector)
    if layer is None:
        raise UnsupportedModelError(f"{m.path}: projector type {projector!r}: ggraft bridge knows the last layer of "
                                    f"{', '.join(sorted(LAST_LINEAR))}")
    weight = m.tensor(layer.weight)
    if weight is None or len(weight.shape) != 2:
        raise InputError(f"{m.path}: has no 2-D {layer.weight}, the last layer of a {projector!r} mmproj")
    clamped = [s for s in OUTPUT_CLAMPS if m.tensor(layer.weight.removesuffix(".weight") + s) is not None]
    if projector == "gemma4v" and clamped:
        raise UnsupportedModelError(f"{m.path}: {layer.weight} has {clamped[0]}: llama.cpp clamps the projection's "
                                    "output, so the last operation is not linear")
    return layer


def output_width(m: GGUFIndex, layer: LastLayer) -> int:
    """How wide the last layer's output is (the donor text model's width)."""
    shape = m.tensor(layer.weight).shape  # ggml order: ne0 = input of a row
    return int(shape[0] if layer.transposed else shape[1])


def composed_weight(layer: LastLayer, weight: np.ndarray, linear: LinearMap) -> np.ndarray:
    """The last layer's weight (numpy order, as stored) after ``linear``, in float32."""
    if layer.transposed:  # x @ W: (in, out) -> (in, out')
        return (weight.astype(np.float64) @ linear.weight.T).astype(np.float32)
    return (linear.weight @ weight.astype(np.float64)).astype(np.float32)  # W @ x: (out, in) -> (out', in)


def composed_bias(bias: np.ndarray | None, linear: LinearMap) -> np.ndarray:
    """The bias after ``linear`` (the layer had none: ``linear``'s own), in float32."""
    inner = linear.weight @ bias.astype(np.float64) if bias is not None else 0.0
    return (inner + linear.bias).astype(np.float32)
