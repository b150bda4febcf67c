"""The vocabulary of llama.cpp's requirements (``requirements.py`` is the table by projector type):
keys, tensors, layouts and rules, the generic rules every vision mmproj meets, and the tensor
groups several graphs share.  Shapes and symbols as described in ``requirements``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gguf

VT = gguf.GGUFValueType
K, CV = gguf.Keys, gguf.Keys.ClipVision
TN = {t: n for t, n in gguf.TENSOR_NAMES.items()}
MT = gguf.MODEL_TENSOR
REQUIRED, EXPECTED, OPTIONAL, ABSENT = "required", "expected", "optional", "absent"
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Key:
    """A key clip.cpp reads: its GGUF type (the getter aborts on any other) and, for numbers the
    rules or shapes use, the symbol it defines (``default`` when absent)."""

    name: str
    type: VT
    need: str = OPTIONAL
    symbol: str | None = None
    default: int | None = None
    item_type: VT | None = None


@dataclass(frozen=True)
class Tensor:
    """A tensor the loader or the graph reads, with the shape the graph needs (ggml order)."""

    name: str
    shape: tuple[int | str, ...] | None = None
    need: str = REQUIRED


@dataclass(frozen=True)
class OneOf:
    """The graph reads one of these layouts: the first that fits among those whose first tensor
    is present (an empty layout: none is needed); none present: the first layout is needed."""

    layouts: tuple[tuple[Tensor, ...], ...]


@dataclass(frozen=True)
class Rule:
    """A condition on the symbols; ``message`` is formatted with them and with ``KEYS``."""

    holds: Callable[[dict[str, int]], bool]
    message: str


@dataclass(frozen=True)
class Projector:
    keys: tuple[Key, ...] = ()
    tensors: tuple[Tensor | OneOf, ...] = ()
    blocks: tuple[Tensor | OneOf, ...] = ()  # for each block {bid} = 0..N-1
    rules: tuple[Rule, ...] = ()
    derive: Callable[[dict[str, int]], dict[str, int]] | None = None  # symbols clip.cpp recomputes


def w(tensor: MT, *shape: int | str, need: str = REQUIRED, suffix: str = ".weight") -> Tensor:
    return Tensor(TN[tensor] + suffix, shape, need)


def b(tensor: MT, *shape: int | str, need: str = OPTIONAL) -> Tensor:
    return Tensor(TN[tensor] + ".bias", shape, need)


def mm(i: int, kind: str, *shape: int | str, need: str = REQUIRED, table: MT = MT.V_MMPROJ) -> Tensor:
    return Tensor(TN[table].format(bid=i) + "." + kind, shape, need)


KEYS = {"E": CV.EMBEDDING_LENGTH, "H": CV.Attention.HEAD_COUNT, "Hkv": "clip.vision.attention.head_count_kv",
        "D": "clip.vision.attention.head_dim", "N": CV.BLOCK_COUNT, "S": CV.IMAGE_SIZE, "P": CV.PATCH_SIZE,
        "M_scale": CV.Projector.SCALE_FACTOR, "M_spatial": CV.SPATIAL_MERGE_SIZE}
u32 = VT.UINT32
#: clip.cpp load_hparams, every vision projector
VISION_KEYS = (
    Key(K.Clip.HAS_VISION_ENCODER, VT.BOOL, REQUIRED), Key(K.Clip.PROJECTOR_TYPE, VT.STRING),
    Key(CV.PROJECTOR_TYPE, VT.STRING),
    Key(KEYS["E"], u32, REQUIRED, "E"), Key(KEYS["H"], u32, REQUIRED, "H"), Key(KEYS["Hkv"], u32, symbol="Hkv"),
    Key(KEYS["D"], u32, symbol="D_key"), Key(CV.FEED_FORWARD_LENGTH, u32, REQUIRED),
    Key(KEYS["N"], u32, REQUIRED, "N"), Key(CV.PROJECTION_DIM, u32, REQUIRED),
    Key(CV.Attention.LAYERNORM_EPS, VT.FLOAT32, REQUIRED), Key(KEYS["S"], u32, REQUIRED, "S"),
    Key(KEYS["P"], u32, REQUIRED, "P"), Key(CV.IMAGE_MEAN, VT.ARRAY, REQUIRED, "mean", item_type=VT.FLOAT32),
    Key(CV.IMAGE_STD, VT.ARRAY, REQUIRED, "std", item_type=VT.FLOAT32), Key(CV.USE_GELU, VT.BOOL, symbol="gelu"),
    Key(CV.USE_SILU, VT.BOOL, symbol="silu"),
    Key("clip.vision.feature_layer", VT.ARRAY, symbol="features", item_type=VT.INT32),
    Key("clip.vision.image_grid_pinpoints", VT.ARRAY, symbol="pinpoints", item_type=VT.INT32),
    Key("clip.vision.mm_patch_merge_type", VT.STRING), Key(CV.WINDOW_SIZE, u32, symbol="window"),
    Key(CV.IMAGE_MIN_PIXELS, u32, symbol="min_px"), Key(CV.IMAGE_MAX_PIXELS, u32, symbol="max_px"),
    Key(CV.PREPROC_IMAGE_SIZE, u32), Key(CV.WA_LAYER_INDEXES, VT.ARRAY, item_type=VT.INT32),
)
VISION_RULES = (
    Rule(lambda h: h["E"] > 0, "{E_key} is {E}; llama.cpp needs a positive width"),
    Rule(lambda h: h["H"] > 0, "{H_key} is {H}; llama.cpp divides the width by the head count"),
    Rule(lambda h: h["H"] <= 0 or h.get("D_key") is not None or h["E"] % h["H"] == 0,
         "{E_key} {E} is not a multiple of {H_key} {H}: llama.cpp's attention would not fit the width"),
    Rule(lambda h: h["H"] <= 0 or (h["Hkv"] > 0 and h["H"] % h["Hkv"] == 0),
         "{Hkv_key} {Hkv} does not divide {H_key} {H}"),
    Rule(lambda h: 0 < h["P"] < 65536, "{P_key} is {P}; llama.cpp needs 1..65535"),
    Rule(lambda h: h["S"] <= 8192, "{S_key} {S} is over llama.cpp's limit of 8192"),
    Rule(lambda h: h["S"] >= h["P"], "{S_key} {S} is smaller than {P_key} {P}: not one patch fits the image"),
    Rule(lambda h: 0 < h["M"] < 65536, "the merge factor is {M}; llama.cpp needs 1..65535"),
    Rule(lambda h: h.get("window", 0) <= 4096, "{window_key} {window} is over llama.cpp's limit of 4096"),
    Rule(lambda h: h.get("min_px", -1) <= h.get("max_px", INT32_MAX),
         "{min_px_key} {min_px} is larger than {max_px_key} {max_px}"),
    Rule(lambda h: len(h["mean"]) >= 3 and len(h["std"]) >= 3, "{mean_key} and {std_key} need 3 values each"),
    Rule(lambda h: not (h.get("gelu") and h.get("silu")), "{gelu_key} and {silu_key} are both true"),
    Rule(lambda h: all(f <= h["N"] for f in h.get("features", ())),
         "{features_key} {features} names a layer past {N_key} {N}"),
    Rule(lambda h: len(h.get("pinpoints", ())) % 2 == 0, "{pinpoints_key} has an odd number of values"),
)
FIXED_GRID = (Rule(lambda h: h["S"] % max(h["P"], 1) == 0,
                   "{S_key} {S} is not a multiple of {P_key} {P}: llama.cpp's grid of patches would not cover it"),)
MERGE_OVER_ONE = (Rule(lambda h: h["M"] > 1, "the merge factor is {M}; llama.cpp's pixel shuffle needs more than 1"),)
MERGE_DIVIDES_GRID = (Rule(lambda h: h["G"] % max(h["M"], 1) == 0,
                           "the {G} patches per side are not a multiple of the merge factor {M}"),)
POOL_FITS_GRID = (Rule(lambda h: h["M"] <= h["G"], "the pooling factor {M} is larger than the {G} patches per side"),)
QWEN_MERGE = (Rule(lambda h: h["M"] == 2, "{M_key} is {M}; llama.cpp's Qwen-VL graphs merge 2x2 patches only"),)


def scale_factor(default: int) -> Key:
    return Key(CV.Projector.SCALE_FACTOR, u32, symbol="M", default=default)


def vit_merger(part: str, *shape: int | str, kind: str = "weight", need: str = REQUIRED) -> Tensor:
    return Tensor(f"v.vit_merger.{part}.{kind}", shape, need)  # clip-impl.h TN_VIT_MERGER_* (gguf-py 0.19 has none)


def spatial_merge(default: int) -> Key:
    return Key(CV.SPATIAL_MERGE_SIZE, u32, symbol="M", default=default)


# -- the vision transformer, as clip.cpp's load loop and graphs read it --------------------
PATCH_CONV = w(MT.V_ENC_EMBD_PATCH, "P", "P", 3, "E")
PATCH_CONV_1 = w(MT.V_ENC_EMBD_PATCH, "P", "P", 3, "E", suffix=".weight.1")  # Qwen's second frame
PATCH_BIAS = b(MT.V_ENC_EMBD_PATCH, "E")
CLASS = Tensor(TN[MT.V_ENC_EMBD_CLS], ("E",))
POS = w(MT.V_ENC_EMBD_POS, "E", "G*G", need=EXPECTED)
POS_CLS = w(MT.V_ENC_EMBD_POS, "E", "G*G+1")
POS_SQUARE = w(MT.V_ENC_EMBD_POS, "E", "Q*Q")  # resized to the image: any square grid
POS_XY = w(MT.V_ENC_EMBD_POS, "E", "X", 2)  # gemma4: one table for x, one for y
PRE_POST_LN = (w(MT.V_PRE_NORM, "E", need=OPTIONAL), b(MT.V_PRE_NORM, "E"),
               w(MT.V_POST_NORM, "E", need=OPTIONAL), b(MT.V_POST_NORM, "E"))
Q_K_V = (w(MT.V_ENC_ATTN_Q, "E", "H*D"), w(MT.V_ENC_ATTN_K, "E", "Hkv*D"), w(MT.V_ENC_ATTN_V, "E", "Hkv*D"),
         b(MT.V_ENC_ATTN_Q, "H*D"), b(MT.V_ENC_ATTN_K, "Hkv*D"), b(MT.V_ENC_ATTN_V, "Hkv*D"))
QKV = (w(MT.V_ENC_ATTN_QKV, "E", "3*H*D"), b(MT.V_ENC_ATTN_QKV, "3*H*D"))
ATTN_OUT = (w(MT.V_ENC_ATTN_O, "H*D", "E"), b(MT.V_ENC_ATTN_O, "E"))
FFN = (w(MT.V_ENC_FFN_UP, "E", "F"), w(MT.V_ENC_FFN_DOWN, "F", "E"), w(MT.V_ENC_FFN_GATE, "E", "F", need=OPTIONAL),
       b(MT.V_ENC_FFN_UP, "F"), b(MT.V_ENC_FFN_DOWN, "E"), b(MT.V_ENC_FFN_GATE, "F"))
#: older files name up and down the other way round; for these types clip.cpp swaps them back
FFN_SWAPPED = (w(MT.V_ENC_FFN_UP, "F", "E"), w(MT.V_ENC_FFN_DOWN, "E", "F"), b(MT.V_ENC_FFN_UP, "E"),
               b(MT.V_ENC_FFN_DOWN, "F"))
NORMS = (w(MT.V_ENC_INPUT_NORM, "E", need=EXPECTED), b(MT.V_ENC_INPUT_NORM, "E"),
         w(MT.V_ENC_POST_ATTN_NORM, "E", need=EXPECTED), b(MT.V_ENC_POST_ATTN_NORM, "E"),
         w(MT.V_LAYER_SCALE_1, "E", need=OPTIONAL), w(MT.V_LAYER_SCALE_2, "E", need=OPTIONAL),
         w(MT.V_ENC_ATTN_POST_NORM, "E", need=OPTIONAL), w(MT.V_ENC_FFN_POST_NORM, "E", need=OPTIONAL))
VIT = (OneOf((Q_K_V, QKV)), *ATTN_OUT, OneOf((FFN,)), *NORMS)  # clip_graph::build_vit
VIT_SWAPPABLE = (OneOf((Q_K_V, QKV)), *ATTN_OUT, OneOf((FFN, FFN_SWAPPED)), *NORMS)
#: what the load loop requires of every block even where the graph does not run the blocks
LOADED_BLOCK = (w(MT.V_ENC_ATTN_O, "*", "*"), w(MT.V_ENC_FFN_UP, "*", "*"), w(MT.V_ENC_FFN_DOWN, "*", "*"))


def q_k_v_with_bias(kv_heads: str) -> tuple[Tensor, ...]:
    """q, k, v and their biases, all added unconditionally (llava and qwen2vl graphs)."""
    return (w(MT.V_ENC_ATTN_Q, "E", "H*D"), w(MT.V_ENC_ATTN_K, "E", f"{kv_heads}*D"),
            w(MT.V_ENC_ATTN_V, "E", f"{kv_heads}*D"), b(MT.V_ENC_ATTN_Q, "H*D", need=REQUIRED),
            b(MT.V_ENC_ATTN_K, f"{kv_heads}*D", need=REQUIRED), b(MT.V_ENC_ATTN_V, f"{kv_heads}*D", need=REQUIRED))


LLAVA_Q_K_V = (*q_k_v_with_bias("H")[:3], *Q_K_V[3:])  # llava.cpp reshapes K and V with n_head
MERGER_MLP = (mm(0, "weight", "4*E", "X"), mm(0, "bias", "X"), mm(2, "weight", "X", "T"), mm(2, "bias", "T"))
FC = Tensor(TN[MT.V_MMPROJ_FC] + ".weight", ("E*M*M", "T"))
INPUT_PROJ_T = w(MT.V_MM_INP_PROJ, "T", "E")  # gemma3 multiplies by its transpose
INPUT_PROJ = w(MT.V_MM_INP_PROJ, "E", "T")
IMG_BREAK = Tensor(TN[MT.V_TOK_EMBD_IMG_BREAK], ("T",))
PIXTRAL_MERGER = OneOf(((w(MT.V_MM_PATCH_MERGER, "E*M*M", "E"), w(MT.V_MM_INP_NORM, "E")), ()))
PIXTRAL_MLP = (mm(1, "weight", "E", "X"), mm(1, "bias", "X", need=OPTIONAL), mm(2, "weight", "X", "T"),
               mm(2, "bias", "T", need=OPTIONAL))
QWEN_PATCH = (PATCH_CONV, PATCH_CONV_1)
NO_BIAS_NO_CLASS = (Tensor(TN[MT.V_ENC_EMBD_PATCH] + ".bias", need=ABSENT), Tensor(TN[MT.V_ENC_EMBD_CLS], need=ABSENT))
DEEPSTACK = OneOf(((w(MT.V_DS_FC1, "E*M*M", "Y"), b(MT.V_DS_FC1, "Y"), w(MT.V_DS_FC2, "Y", "T"), b(MT.V_DS_FC2, "T"),
                    w(MT.V_DS_NORM, "E*M*M", need=OPTIONAL), b(MT.V_DS_NORM, "E*M*M")), ()))
SIGLIP_BASE = (PATCH_CONV, PATCH_BIAS, *PRE_POST_LN)
MLP_PLAIN = (mm(0, "weight", "E*Lf", "X"), mm(0, "bias", "X"), mm(2, "weight", "X", "T"), mm(2, "bias", "T"))
MLP_NORM = (mm(3, "weight", "X", "T"), mm(0, "weight", "E*Lf", "X"), mm(0, "bias", "X"), mm(1, "weight", "X"),
            mm(1, "bias", "X"), mm(3, "bias", "T"), mm(4, "weight", "T"), mm(4, "bias", "T"))

#: per projector type (clip-impl.h PROJECTOR_TYPE_NAMES)
