"""What the installed llama.cpp requires of a vision mmproj, per projector type, as data.

Read from llama.cpp@0c1e57098 (vendored by llama-cpp-python 0.3.36): ``tools/mtmd/clip.cpp``
(``load_hparams``: each key's getter, which aborts on any other GGUF type; its sanity checks;
``load_tensors``: ``get_tensor(name, required)``) and the graphs in ``tools/mtmd/models/*.cpp``,
which dereference tensors the loader treats as optional and abort (``GGML_ASSERT``) when a
matrix product, reshape or broadcast does not fit.  A file that breaks these rules makes
llama.cpp refuse it, abort or segfault; ``check`` reports each broken rule instead.

Shapes are in ggml order (``ne0`` first, as ``GGUFIndex`` and gguf-py's reader give them).  A
dimension is an int or an expression over symbols: ``E`` width, ``H`` heads, ``Hkv`` KV heads,
``D`` head width, ``N`` blocks, ``S`` image size, ``P`` patch size, ``G`` = S/P patches per side,
``M`` merge factor, ``Lf`` feature layers stacked; any other symbol (``F``, ``T``, ``X``, ``Q``
...) is bound where it is first seen and must then agree (``*``: anything).  ``{bid}`` tensors
are checked for every block 0..N-1.  ``requirements_fit`` applies the rules to a header.
"""
from __future__ import annotations

from .requirement_parts import (ABSENT, ATTN_OUT, CV, EXPECTED, OPTIONAL, REQUIRED, CLASS, DEEPSTACK, FC, FFN, FFN_SWAPPED, FIXED_GRID, IMG_BREAK,
    INPUT_PROJ, INPUT_PROJ_T, KEYS, Key, LLAVA_Q_K_V, LOADED_BLOCK, MERGER_MLP, MERGE_DIVIDES_GRID,
    MERGE_OVER_ONE, MLP_NORM, MLP_PLAIN, MT, NORMS, NO_BIAS_NO_CLASS, OneOf, PATCH_BIAS, PATCH_CONV,
    PIXTRAL_MERGER, PIXTRAL_MLP, POOL_FITS_GRID, POS, POS_CLS, POS_SQUARE, POS_XY, PRE_POST_LN, Projector,
    QWEN_MERGE, QWEN_PATCH, Q_K_V, Rule, SIGLIP_BASE, TN, Tensor, VIT, VIT_SWAPPABLE, VT, b, mm,
    q_k_v_with_bias, scale_factor, spatial_merge, u32, vit_merger, w)

#: DeepSeek-OCR 2 / Unlimited-OCR (clip.cpp load_hparams PROJECTOR_TYPE_DEEPSEEKOCR*): SAM's keys, all required
SAM_KEYS = (Key(CV.SAM.BLOCK_COUNT, u32, REQUIRED), Key(CV.SAM.HEAD_COUNT, u32, REQUIRED, "Hs"),
            Key(CV.SAM.EMBEDDING_LENGTH, u32, REQUIRED, "Es"), Key(CV.WINDOW_SIZE, u32, REQUIRED, "window"))
#: models/deepseekocr.cpp build_sam: 16-pixel patch conv (clip.cpp counts tokens by 16-pixel patches), position
#: grid, blocks v.sam.blk.<i> (checked here for i = 0), conv neck, two stride-2 convs ending at the encoder's width
SAM_TOWER = (w(MT.V_SAM_PATCH_EMBD, 16, 16, 3, "Es"), b(MT.V_SAM_PATCH_EMBD, "Es", need=REQUIRED),
             w(MT.V_SAM_POS_EMBD, "Es", "R", "R"),
             *(Tensor(TN[t].format(bid=0) + suffix, shape) for t, suffix, shape in (
                 (MT.V_SAM_ATTN_QKV, ".weight", ("Es", "3*Es")), (MT.V_SAM_ATTN_QKV, ".bias", ("3*Es",)),
                 (MT.V_SAM_ATTN_OUT, ".weight", ("Es", "Es")), (MT.V_SAM_ATTN_OUT, ".bias", ("Es",)),
                 (MT.V_SAM_PRE_NORM, ".weight", ("Es",)), (MT.V_SAM_PRE_NORM, ".bias", ("Es",)),
                 (MT.V_SAM_POST_NORM, ".weight", ("Es",)), (MT.V_SAM_POST_NORM, ".bias", ("Es",)),
                 (MT.V_SAM_MLP_LIN_1, ".weight", ("Es", "Fs")), (MT.V_SAM_MLP_LIN_1, ".bias", ("Fs",)),
                 (MT.V_SAM_MLP_LIN_2, ".weight", ("Fs", "Es")), (MT.V_SAM_MLP_LIN_2, ".bias", ("Es",)),
                 (MT.V_SAM_ATTN_POS_H, ".weight", ("*", "*")), (MT.V_SAM_ATTN_POS_W, ".weight", ("*", "*")))),
             mm(0, "weight", 1, 1, "Es", "C", table=MT.V_SAM_NECK), mm(1, "weight", "C", table=MT.V_SAM_NECK),
             mm(1, "bias", "C", table=MT.V_SAM_NECK), mm(2, "weight", 3, 3, "C", "C", table=MT.V_SAM_NECK),
             mm(3, "weight", "C", table=MT.V_SAM_NECK), mm(3, "bias", "C", table=MT.V_SAM_NECK),
             w(MT.V_SAM_NET_2, 3, 3, "C", "C2"), w(MT.V_SAM_NET_3, 3, 3, "C2", "E"))
SAM_RULES = (Rule(lambda h: h["Hs"] > 0 and h["Es"] % h["Hs"] == 0,
                  "{Es_key} {Es} is not a multiple of {Hs_key} {Hs}: llama.cpp's SAM attention would not fit the width"),
             Rule(lambda h: h["window"] > 0, "{window_key} is {window}; llama.cpp's SAM windows divide by it"),
             Rule(lambda h: h["min_tiles"] <= h["max_tiles"] <= 256,
                  "{min_tiles_key} {min_tiles} and {max_tiles_key} {max_tiles} break clip.cpp's assertion min <= max <= 256"))

PROJECTORS: dict[str, Projector] = {
    "mlp": Projector(  # models/llava.cpp; mm.3 present makes it llama.cpp's mlp_norm (Yi)
        tensors=(PATCH_CONV, PATCH_BIAS, OneOf(((CLASS, POS_CLS), (w(MT.V_ENC_EMBD_POS, "E", "G*G"),))),
                 *PRE_POST_LN, OneOf((MLP_PLAIN, MLP_NORM))),
        blocks=(*LLAVA_Q_K_V, *ATTN_OUT, OneOf((FFN, FFN_SWAPPED)), *NORMS), rules=FIXED_GRID),
    "gemma3": Projector(  # models/siglip.cpp: avg-pool by M, soft-emb norm, transposed input projection
        keys=(scale_factor(4),), tensors=(*SIGLIP_BASE, POS, w(MT.V_MM_SOFT_EMB_NORM, "E"), INPUT_PROJ_T),
        blocks=VIT_SWAPPABLE, rules=FIXED_GRID + POOL_FITS_GRID),
    "idefics3": Projector(  # models/siglip.cpp: pixel shuffle by M, then mm.model.fc
        keys=(scale_factor(1),), tensors=(*SIGLIP_BASE, POS, FC), blocks=VIT_SWAPPABLE,
        rules=FIXED_GRID + MERGE_OVER_ONE),
    "lfm2": Projector(  # models/siglip.cpp: positions resized to the image, pixel unshuffle, norm + MLP
        keys=(scale_factor(1),),
        tensors=(*SIGLIP_BASE, POS_SQUARE, w(MT.V_MM_INP_NORM, "E*M*M", need=OPTIONAL),
                 b(MT.V_MM_INP_NORM, "E*M*M"), mm(1, "weight", "E*M*M", "X"), mm(1, "bias", "X"),
                 mm(2, "weight", "X", "T"), mm(2, "bias", "T")),
        blocks=VIT, rules=MERGE_OVER_ONE),
    "pixtral": Projector(  # models/pixtral.cpp: 2D rope, optional patch merger, MLP, [IMG_BREAK] rows
        keys=(spatial_merge(1),), tensors=(PATCH_CONV, PATCH_BIAS, *PRE_POST_LN, PIXTRAL_MERGER, *PIXTRAL_MLP,
                                           IMG_BREAK), blocks=VIT),
    "lightonocr": Projector(keys=(spatial_merge(1),), tensors=(PATCH_CONV, PATCH_BIAS, *PRE_POST_LN, PIXTRAL_MERGER,
                                                               *PIXTRAL_MLP), blocks=VIT),
    "qwen2vl_merger": Projector(  # models/qwen2vl.cpp: two-frame patch conv, M-RoPE, 2x2 merger MLP
        keys=(spatial_merge(2),), tensors=(*QWEN_PATCH, *NO_BIAS_NO_CLASS, *PRE_POST_LN, *MERGER_MLP),
        blocks=(*q_k_v_with_bias("H"), *ATTN_OUT, OneOf((FFN, FFN_SWAPPED)), *NORMS), rules=QWEN_MERGE),
    "qwen2.5vl_merger": Projector(
        keys=(spatial_merge(2), Key(CV.N_WA_PATTERN, u32, REQUIRED)),
        tensors=(*QWEN_PATCH, *NO_BIAS_NO_CLASS, *PRE_POST_LN, *MERGER_MLP),
        blocks=(*q_k_v_with_bias("H"), *ATTN_OUT, OneOf((FFN, FFN_SWAPPED)), *NORMS), rules=QWEN_MERGE),
    "qwen3vl_merger": Projector(  # models/qwen3vl.cpp: fused qkv, patch bias, resized positions, deepstack
        keys=(spatial_merge(2), Key(CV.IS_DEEPSTACK_LAYERS, VT.ARRAY, item_type=VT.BOOL)),
        tensors=(*QWEN_PATCH, b(MT.V_ENC_EMBD_PATCH, "E", need=REQUIRED), POS_SQUARE,
                 Tensor(TN[MT.V_ENC_EMBD_CLS], need=ABSENT), *PRE_POST_LN, *MERGER_MLP),
        blocks=(w(MT.V_ENC_ATTN_QKV, "E", "3*E"), b(MT.V_ENC_ATTN_QKV, "3*E", need=REQUIRED), *ATTN_OUT,
                OneOf((FFN,)), *NORMS, DEEPSTACK),
        rules=QWEN_MERGE + (Rule(lambda h: h["H"] * h["D"] == h["E"],
                                 "{H_key} {H} times the head width {D} is not {E_key} {E}"),)),
    "glm4v": Projector(  # models/glm4v.cpp: two-frame patch conv with bias, post-conv norm and positions
        # resized to the image (GLM-OCR has neither), fused qkv (GLM-OCR: per-head q/k norms), 2x2 conv merger,
        # then fc, LayerNorm + GELU and a gated MLP
        keys=(spatial_merge(2),),
        tensors=(*QWEN_PATCH, b(MT.V_ENC_EMBD_PATCH, "E", need=REQUIRED), Tensor(TN[MT.V_ENC_EMBD_CLS], need=ABSENT),
                 w(MT.V_ENC_EMBD_NORM, "E", need=OPTIONAL), b(MT.V_ENC_EMBD_NORM, "E"),
                 w(MT.V_ENC_EMBD_POS, "E", "Q*Q", need=OPTIONAL), *PRE_POST_LN,
                 w(MT.V_MM_PATCH_MERGER, "M", "M", "E", "Y"), b(MT.V_MM_PATCH_MERGER, "Y", need=REQUIRED),
                 w(MT.V_MMPROJ_FC, "Y", "Y"), w(MT.V_MM_POST_NORM, "Y"), b(MT.V_MM_POST_NORM, "Y"),
                 w(MT.V_MM_GATE, "Y", "X"), b(MT.V_MM_GATE, "X"), w(MT.V_MM_UP, "Y", "X"), b(MT.V_MM_UP, "X"),
                 w(MT.V_MM_DOWN, "X", "T"), b(MT.V_MM_DOWN, "T")),
        blocks=(w(MT.V_ENC_ATTN_QKV, "E", "3*E"), b(MT.V_ENC_ATTN_QKV, "3*E"), *ATTN_OUT, OneOf((FFN,)), *NORMS,
                w(MT.V_ENC_ATTN_Q_NORM, "D", need=OPTIONAL), w(MT.V_ENC_ATTN_K_NORM, "D", need=OPTIONAL)),
        rules=QWEN_MERGE + (Rule(lambda h: h["H"] * h["D"] == h["E"],
                                 "{H_key} {H} times the head width {D} is not {E_key} {E}"),
                            Rule(lambda h: h["D"] % 4 == 0,
                                 "the head width {D} is not a multiple of 4: llama.cpp's glm4v rope splits each "
                                 "head in four sections"))),
    "gemma4v": Projector(  # models/gemma4v.cpp: x/y position tables, 2D rope, avg-pool by M, projection
        keys=(scale_factor(3),),
        tensors=(PATCH_CONV, POS_XY, w(MT.V_STD_BIAS, "E", need=OPTIONAL, suffix=""),
                 w(MT.V_STD_SCALE, "E", need=OPTIONAL, suffix=""), INPUT_PROJ), blocks=VIT),
    "gemma4uv": Projector(  # models/gemma4uv.cpp: patches of P*M pixels, normed, linear; no ViT blocks run
        keys=(scale_factor(3),), derive=lambda h: {"P": h["P"] * h["M"], "M": 1},
        tensors=(w(MT.V_ENC_EMBD_PATCH, "3*P*P", "E"), b(MT.V_ENC_EMBD_PATCH, "E", need=REQUIRED), POS_XY,
                 *(Tensor(f"v.patch_norm.{i}.{kind}", (dim,)) for i, dim in ((1, "3*P*P"), (2, "E"), (3, "E"))
                   for kind in ("weight", "bias")), INPUT_PROJ),
        blocks=LOADED_BLOCK),
    "gemma3nv": Projector(  # models/mobilenetv5.cpp: a MobileNet, no ViT blocks
        keys=(scale_factor(1),),
        tensors=(w(MT.V_ENC_CONV_STEM, "*", "*", 3, "*"), w(MT.V_MM_SOFT_EMB_NORM, "E"), INPUT_PROJ)),
    "internvl": Projector(  # models/internvl.cpp: CLS + positions, pixel shuffle by M, norm + MLP
        keys=(scale_factor(1), Key(CV.PREPROC_MIN_TILES, u32, symbol="min_tiles", default=1),
              Key(CV.PREPROC_MAX_TILES, u32, symbol="max_tiles", default=12)),
        tensors=(PATCH_CONV, PATCH_BIAS, CLASS, POS_CLS, *PRE_POST_LN,
                 mm(0, "weight", "E*M*M", table=MT.V_MMPROJ_MLP), mm(0, "bias", "E*M*M", table=MT.V_MMPROJ_MLP),
                 mm(1, "weight", "E*M*M", "X", table=MT.V_MMPROJ_MLP), mm(1, "bias", "X", table=MT.V_MMPROJ_MLP),
                 mm(3, "weight", "X", "T", table=MT.V_MMPROJ_MLP), mm(3, "bias", "T", table=MT.V_MMPROJ_MLP)),
        blocks=VIT, rules=FIXED_GRID + MERGE_DIVIDES_GRID + (
            Rule(lambda h: h["min_tiles"] <= h["max_tiles"], "{min_tiles_key} {min_tiles} is over {max_tiles_key} "
                 "{max_tiles}"),)),
    "nemotron_v2_vl": Projector(  # models/nemotron-v2-vl.cpp: CLS/register rows first (Y of them), positions added
        # as stored (one per patch of an image_size image), pixel shuffle by M, RMS norm + ReLU² MLP without biases
        keys=(scale_factor(1),),
        tensors=(PATCH_CONV, PATCH_BIAS, Tensor(TN[MT.V_ENC_EMBD_CLS], ("E", "Y")), w(MT.V_ENC_EMBD_POS, "E", "G*G"),
                 *PRE_POST_LN, mm(0, "weight", "E*M*M", table=MT.V_MMPROJ_MLP),
                 mm(1, "weight", "E*M*M", "X", table=MT.V_MMPROJ_MLP), mm(3, "weight", "X", "T", table=MT.V_MMPROJ_MLP)),
        blocks=VIT, rules=FIXED_GRID + MERGE_OVER_ONE + MERGE_DIVIDES_GRID),
    "llama4": Projector(  # models/llama4.cpp: linear patches, CLS + positions, pixel shuffle, MLP, projection
        keys=(scale_factor(1),),
        tensors=(w(MT.V_ENC_EMBD_PATCH, "3*P*P", "E"), CLASS, POS_CLS, *PRE_POST_LN,
                 mm(1, "weight", "E*M*M", "X", table=MT.V_MMPROJ_MLP), mm(2, "weight", "X", "Y", table=MT.V_MMPROJ_MLP),
                 Tensor(TN[MT.V_MMPROJ_FC] + ".weight", ("Y", "T"))),
        blocks=VIT, rules=FIXED_GRID + MERGE_DIVIDES_GRID),
    "janus_pro": Projector(  # models/siglip.cpp
        tensors=(*SIGLIP_BASE, POS, mm(0, "weight", "E", "X"), mm(0, "bias", "X"), mm(1, "weight", "X", "T"),
                 mm(1, "bias", "T")), blocks=VIT, rules=FIXED_GRID),
    "phi4": Projector(  # models/siglip.cpp: positions resized to the image
        keys=(Key(CV.IMAGE_MIN_PIXELS, u32, REQUIRED), Key(CV.IMAGE_MAX_PIXELS, u32, REQUIRED)),
        tensors=(*SIGLIP_BASE, POS_SQUARE, mm(0, "weight", "E", "X"), mm(0, "bias", "X"), mm(2, "weight", "X", "T"),
                 mm(2, "bias", "T")), blocks=VIT),
    "paddleocr": Projector(  # models/paddleocr.cpp: positions resized to the image, 2D rope, norm, 2x2 merge, MLP
        keys=(Key(CV.IMAGE_MIN_PIXELS, u32, REQUIRED), Key(CV.IMAGE_MAX_PIXELS, u32, REQUIRED)),
        tensors=(*SIGLIP_BASE, POS_SQUARE, w(MT.V_MM_INP_NORM, "E"), b(MT.V_MM_INP_NORM, "E", need=REQUIRED),
                 mm(1, "weight", "4*E", "X"), mm(1, "bias", "X"), mm(2, "weight", "X", "T"), mm(2, "bias", "T")),
        blocks=VIT,
        rules=(Rule(lambda h: h["D"] % 4 == 0, "the head width {D} is not a multiple of 4: llama.cpp's paddleocr "
                    "rope splits each head in four sections"),)),
    "dots3note_v": Projector(  # models/dotsocr.cpp via build_vit: fused qkv + per-head q/k norms, 2D rope, dense
        # or MoE FFN per block (clip.cpp 2303-2320, build_moe_ffn 706-757), mm.post_norm (post_ln), 2x2 merger MLP
        keys=(Key(CV.SPATIAL_MERGE_SIZE, u32, REQUIRED, "M"), Key(CV.IMAGE_MIN_PIXELS, u32, REQUIRED, "min_px"),
              Key(CV.IMAGE_MAX_PIXELS, u32, REQUIRED, "max_px"),
              Key("clip.vision.expert_used_count", u32, REQUIRED, "K")),  # clip-impl.h:79; not in gguf-py 0.19
        tensors=(PATCH_CONV, PATCH_BIAS, *PRE_POST_LN, w(MT.V_MM_POST_NORM, "E"), w(MT.V_MM_INP_NORM, "E"),
                 b(MT.V_MM_INP_NORM, "E", need=REQUIRED), mm(0, "weight", "E*M*M", "X"),
                 mm(0, "bias", "X", need=REQUIRED), mm(2, "weight", "X", "T"), mm(2, "bias", "T", need=REQUIRED)),
        blocks=(w(MT.V_ENC_ATTN_QKV, "E", "3*E"), b(MT.V_ENC_ATTN_QKV, "3*E"), *ATTN_OUT,
                OneOf((FFN, (Tensor("v.blk.{bid}.ffn_gate_exps.weight", ("E", "Fe", "Ne")),  # clip-impl.h 124-128
                             Tensor("v.blk.{bid}.ffn_up_exps.weight", ("E", "Fe", "Ne")),
                             Tensor("v.blk.{bid}.ffn_down_exps.weight", ("Fe", "E", "Ne")),
                             Tensor("v.blk.{bid}.ffn_gate_inp.weight", ("E", "Ne")),
                             Tensor("v.blk.{bid}.exp_probs_b.weight", ("Ne",), OPTIONAL)))),
                *NORMS, w(MT.V_ENC_ATTN_Q_NORM, "D", need=OPTIONAL), w(MT.V_ENC_ATTN_K_NORM, "D", need=OPTIONAL)),
        rules=MERGE_OVER_ONE + (
            Rule(lambda h: h["H"] * h["D"] == h["E"], "{H_key} {H} times the head width {D} is not {E_key} {E}"),
            Rule(lambda h: h["D"] % 4 == 0, "the head width {D} is not a multiple of 4: llama.cpp's dots3note_v "
                 "rope splits each head in four sections"),
            Rule(lambda h: h["K"] > 0, "{K_key} is {K}: llama.cpp's MoE blocks assert at least one expert per token"),
            Rule(lambda h: h["min_px"] > 0 and h["max_px"] > 0, "{min_px_key} {min_px} and {max_px_key} {max_px}: "
                 "mtmd's dyn-size preprocessor asserts both positive"))),
    "granite4_vision": Projector(  # models/granite4-vision.cpp: SigLIP blocks (no CLS), one Window Q-Former
        # per feature layer (v.proj_blk.<b>.*, b < len(feature_layer); checked here for b = 0), anyres tiles
        keys=(Key("clip.vision.feature_layer", VT.ARRAY, REQUIRED, "features", item_type=VT.INT32),
              Key("clip.vision.projector.spatial_offsets", VT.ARRAY, REQUIRED, "offsets", item_type=VT.INT32),
              Key("clip.vision.projector.query_side", u32, REQUIRED, "Qs"),
              Key("clip.vision.projector.window_side", u32, REQUIRED, "Ws"),
              Key("clip.vision.image_grid_pinpoints", VT.ARRAY, REQUIRED, "pinpoints", item_type=VT.INT32)),
        tensors=(PATCH_CONV, PATCH_BIAS, w(MT.V_ENC_EMBD_POS, "E", "G*G"), Tensor(TN[MT.V_ENC_EMBD_CLS], need=ABSENT),
                 Tensor("v.image_newline", ("T",)),
                 *(Tensor(f"v.proj_blk.0.{n}", s) for n, s in (("query", ("E", "Qs*Qs")), ("img_pos", ("E", "Ws*Ws")))),
                 *(Tensor(f"v.proj_blk.0.{n}.{k}", ("E",)) for n in ("norm", "post_norm", "self_attn_norm",
                   "cross_attn_norm", "ffn_norm") for k in ("weight", "bias")),
                 *(Tensor(f"v.proj_blk.0.{n}.weight", ("E", "E")) for n in ("self_attn_q", "self_attn_k", "self_attn_v",
                   "self_attn_out", "cross_attn_q", "cross_attn_k", "cross_attn_v", "cross_attn_out")),
                 *(Tensor(f"v.proj_blk.0.{n}.bias", ("E",)) for n in ("self_attn_q", "self_attn_k", "self_attn_v",
                   "self_attn_out", "cross_attn_q", "cross_attn_k", "cross_attn_v", "cross_attn_out", "ffn_down")),
                 Tensor("v.proj_blk.0.ffn_up.weight", ("E", "Xq")), Tensor("v.proj_blk.0.ffn_up.bias", ("Xq",)),
                 Tensor("v.proj_blk.0.ffn_down.weight", ("Xq", "E")),
                 Tensor("v.proj_blk.0.linear.weight", ("E", "T")), Tensor("v.proj_blk.0.linear.bias", ("T",))),
        blocks=VIT, rules=FIXED_GRID + (
            Rule(lambda h: len(h["features"]) > 0 and all(0 <= f < h["N"] for f in h["features"]),
                 "{features_key} {features} must name blocks 0..{N}-1: the graph asserts it (and needs one)"),
            Rule(lambda h: len(h["offsets"]) == len(h["features"]),
                 "{offsets_key} and {features_key} differ in length; llama.cpp refuses the file"),
            Rule(lambda h: h["E"] % 64 == 0, "{E_key} {E} is not a multiple of the Q-Former's 64-wide heads"),
            Rule(lambda h: h["Ws"] > 0 and h["Qs"] > 0 and h["G"] % h["Ws"] == 0 and h["Ws"] % h["Qs"] == 0,
                 "{Ws_key} {Ws} and {Qs_key} {Qs} do not tile the {G}x{G} patch grid in whole windows"),
            Rule(lambda h: all(o < 0 for o in h["offsets"]) or h["Ws"] == 2 * h["Qs"],
                 "spatial offsets need {Ws_key} = 2 x {Qs_key}"),
            Rule(lambda h: len(h["pinpoints"]) >= 2 and all(p > 0 and p % h["S"] == 0 for p in h["pinpoints"]),
                 "{pinpoints_key} {pinpoints} must be multiples of {S_key} {S}: mtmd tiles the image by them"))),
    "minicpmv4_6": Projector(  # models/minicpmv.cpp: positions looked up on a 70x70 grid, ViT merger (16x only), 2x2 merger MLP
        keys=(scale_factor(4),),
        tensors=(PATCH_CONV, PATCH_BIAS, w(MT.V_ENC_EMBD_POS, "E", 4900), *PRE_POST_LN,
                 OneOf(((vit_merger("ln1", "E"), vit_merger("ln1", "E", kind="bias"),
                         *(vit_merger(f"attn_{p}", "E", "E") for p in ("q", "k", "v", "out")),
                         *(vit_merger(f"attn_{p}", "E", kind="bias", need=OPTIONAL) for p in ("q", "k", "v", "out")),
                         vit_merger("ds_ln", "4*E"), vit_merger("ds_ln", "4*E", kind="bias"),
                         vit_merger("ds_ffn_up", "4*E", "X"), vit_merger("ds_ffn_up", "X", kind="bias", need=OPTIONAL),
                         vit_merger("ds_ffn_down", "X", "E"), vit_merger("ds_ffn_down", "E", kind="bias", need=OPTIONAL)),
                        ())),
                 w(MT.V_MM_INP_NORM, "4*E"), b(MT.V_MM_INP_NORM, "4*E"),
                 w(MT.V_MM_UP, "4*E", "Y"), b(MT.V_MM_UP, "Y"), w(MT.V_MM_DOWN, "Y", "T"), b(MT.V_MM_DOWN, "T")),
        blocks=(*Q_K_V, *ATTN_OUT, OneOf((FFN, FFN_SWAPPED)), *NORMS),
        rules=(Rule(lambda h: h["M"] in (2, 4), "{M_key} is {M}; llama.cpp's minicpmv4_6 graph aborts unless it is "
                    "2 (4x) or 4 (16x)"),
               Rule(lambda h: h["S"] % max(h["P"] * h["M"], 1) == 0, "{S_key} {S} is not a multiple of {P_key} {P} "
                    "times the merge factor {M}: llama.cpp's 2x2 merges would leave patch rows out"))),
    "step3vl": Projector(  # models/step3vl.cpp: positions resized to the image, 2D rope, two 3x3 stride-2
        # convolutions (mm.0, mm.1), then mm.model.fc
        keys=(scale_factor(4),),
        tensors=(PATCH_CONV, PATCH_BIAS, Tensor(TN[MT.V_ENC_EMBD_CLS], need=ABSENT), POS_SQUARE, *PRE_POST_LN,
                 mm(0, "weight", 3, 3, "E", "X"), mm(0, "bias", "X", need=OPTIONAL), mm(1, "weight", 3, 3, "X", "Y"),
                 mm(1, "bias", "Y", need=OPTIONAL), Tensor(TN[MT.V_MMPROJ_FC] + ".weight", ("Y", "T"))),
        blocks=VIT,
        rules=(Rule(lambda h: h["M"] == 4, "{M_key} is {M}; llama.cpp's step3vl graph downsamples 4x (two stride-2 "
                    "convolutions) and counts image tokens by this factor"),
               Rule(lambda h: h["G"] % 4 == 0, "the {G} patches per side are not a multiple of 4: llama.cpp's step3vl "
                    "graph counts {G}/4 tokens per side where its two stride-2 convolutions make more"),
               Rule(lambda h: h["D"] % 4 == 0, "the head width {D} is not a multiple of 4: llama.cpp's 2D rope turns "
                    "pairs in each half of a head"))),
    "hunyuanvl": Projector(  # models/hunyuanvl.cpp: positions resized to the image, RMSNorm, conv merge by M,
        # GELU, 1x1 conv, a newline column, fc, begin/end rows, RMSNorm
        keys=(spatial_merge(2),),
        tensors=(PATCH_CONV, PATCH_BIAS, POS_SQUARE, *PRE_POST_LN, w(MT.V_MM_PRE_NORM, "E"),
                 mm(0, "weight", "M", "M", "E", "X"), mm(0, "bias", "X"), mm(2, "weight", 1, 1, "X", "Y"),
                 mm(2, "bias", "Y"), Tensor(TN[MT.V_ENC_EMBD_IMGNL], ("Y",)), w(MT.V_MMPROJ_FC, "Y", "T"),
                 b(MT.V_MMPROJ_FC, "T", need=REQUIRED), w(MT.V_MM_POST_NORM, "T"),
                 Tensor(TN[MT.V_TOK_IMG_BEGIN], ("T",)), Tensor(TN[MT.V_TOK_IMG_END], ("T",)),
                 Tensor(TN[MT.V_ENC_EMBD_VSEP], ("T",), need=OPTIONAL)),
        blocks=VIT,
        rules=(Rule(lambda h: h["M"] == 2, "{M_key} is {M}; llama.cpp counts hunyuanvl image tokens as patches / 2 "
                    "per side and aborts on any other merge"),)),
    "exaone4_5": Projector(  # models/exaone4_5.cpp: qwen2.5vl's tower with fused GQA qkv (q | k | v rows)
        keys=(spatial_merge(2), Key(CV.N_WA_PATTERN, u32),
              Key(KEYS["Hkv"], u32, REQUIRED, "Hkv", default=1),  # default: only for needed_tensors' minimal file
              Key(CV.IMAGE_MIN_PIXELS, u32, REQUIRED, "min_px"), Key(CV.IMAGE_MAX_PIXELS, u32, REQUIRED, "max_px"),
              Key(CV.PROJECTION_DIM, u32, REQUIRED, "T")),  # the windowed path reshapes the output by it
        tensors=(*QWEN_PATCH, *NO_BIAS_NO_CLASS, *PRE_POST_LN, *MERGER_MLP),
        blocks=(w(MT.V_ENC_ATTN_QKV, "E", "H*D+2*Hkv*D"), b(MT.V_ENC_ATTN_QKV, "H*D+2*Hkv*D"), *ATTN_OUT,
                OneOf((FFN, FFN_SWAPPED)), *NORMS),
        rules=QWEN_MERGE + (Rule(lambda h: h["H"] * h["D"] == h["E"],
                                 "{H_key} {H} times the head width {D} is not {E_key} {E}"),
                            Rule(lambda h: h["D"] % 4 == 0, "the head width {D} is not a multiple of 4: llama.cpp's "
                                 "exaone4_5 rope splits each head in four sections"))),
    "kimik25": Projector(  # models/kimik25.cpp: 3-D position grid resized bicubically, 2D rope, norm, MxM merge, MLP
        keys=(scale_factor(1), Key(CV.IMAGE_MIN_PIXELS, u32), Key(CV.IMAGE_MAX_PIXELS, u32)),
        tensors=(PATCH_CONV, PATCH_BIAS, *PRE_POST_LN, w(MT.V_ENC_EMBD_POS, "E", "Wp", "Hp"),
                 w(MT.V_MM_INP_NORM, "E"), b(MT.V_MM_INP_NORM, "E", need=REQUIRED),
                 mm(1, "weight", "E*M*M", "X"), mm(1, "bias", "X"), mm(2, "weight", "X", "T"), mm(2, "bias", "T")),
        blocks=VIT,
        rules=MERGE_OVER_ONE + (Rule(lambda h: h["D"] % 4 == 0, "the head width {D} is not a multiple of 4: "
                                     "llama.cpp's kimik25 2D rope splits each head in four sections"),)),
    "muse-glimmer": Projector(  # models/muse-glimmer.cpp: patch conv, square positions resized to the grid,
        # windowed 2D-rope ViT, 2x2 pixel shuffle, three bias-free linears (clip.cpp 1701-1711, 2541-2547)
        keys=(spatial_merge(2),),
        tensors=(PATCH_CONV, PATCH_BIAS, POS_SQUARE, *PRE_POST_LN,
                 mm(0, "weight", "E*M*M", "X"), mm(1, "weight", "X", "Y"), mm(2, "weight", "Y", "T")),
        blocks=VIT,
        rules=(Rule(lambda h: h["M"] == 2, "{M_key} is {M}; llama.cpp counts muse-glimmer image tokens as 2x2 merges"),
               Rule(lambda h: h["H"] <= 0 or (h["E"] // h["H"]) % 4 == 0,
                    "{E_key} {E} over {H_key} {H} heads: llama.cpp's 2D rope needs a head width that is a multiple of 4"))),
    "minimax_m3": Projector(  # models/minimax-m3.cpp: two-frame patch conv, 3D rope ViT, per-patch MLP, 2x2 merge MLP
        keys=(spatial_merge(2),),
        tensors=(*QWEN_PATCH, *NO_BIAS_NO_CLASS, *PRE_POST_LN,
                 Tensor("mm.1.weight", ("E", "X")),
                 Tensor("mm.1.bias", ("X",)), Tensor("mm.2.weight", ("X", "T")), Tensor("mm.2.bias", ("T",)),
                 Tensor("mm.merger.fc1.weight", ("T*M*M", "Y")), Tensor("mm.merger.fc1.bias", ("Y",)),
                 Tensor("mm.merger.fc2.weight", ("Y", "Z")), Tensor("mm.merger.fc2.bias", ("Z",))),
        blocks=(*Q_K_V, *ATTN_OUT, OneOf((FFN,)), *NORMS),
        rules=(Rule(lambda h: h["M"] == 2, "{M_key} is {M}; llama.cpp counts minimax_m3 image tokens as 2x2 merges"),)),
    "deepseekocr": Projector(  # clip.cpp PROJECTOR_TYPE_DEEPSEEKOCR, models/deepseekocr.cpp: CLIP over the SAM grid
        # (CLS, positions, pre-norm), each token's CLIP and SAM features side by side through mm.model.fc, a newline
        # after each row of tokens (read unconditionally, though loaded as optional) and the view separator
        keys=SAM_KEYS + (Key(CV.PREPROC_MIN_TILES, u32, symbol="min_tiles", default=2),
                         Key(CV.PREPROC_MAX_TILES, u32, symbol="max_tiles", default=9)),
        tensors=(*SAM_TOWER, CLASS, w(MT.V_ENC_EMBD_POS, "E", "*"), w(MT.V_PRE_NORM, "E", need=EXPECTED),
                 b(MT.V_PRE_NORM, "E"), w(MT.V_MMPROJ_FC, "2*E", "T"), b(MT.V_MMPROJ_FC, "T", need=REQUIRED),
                 Tensor(TN[MT.V_ENC_EMBD_IMGNL], ("T",)), Tensor(TN[MT.V_ENC_EMBD_VSEP], ("T",))),
        blocks=VIT, rules=SAM_RULES),
    "deepseekocr2": Projector(  # clip.cpp PROJECTOR_TYPE_DEEPSEEKOCR2, models/deepseekocr2.cpp: a Qwen2 encoder (GQA:
        # head_count_kv required) over the SAM grid and 144 or 256 learned queries (clip-impl.h TN_RESMPL_QUERY,
        # loaded as optional, read unconditionally), the queries' outputs through mm.model.fc, the view separator
        keys=SAM_KEYS + (Key(KEYS["Hkv"], u32, REQUIRED, "Hkv"),
                         Key(CV.PREPROC_MIN_TILES, u32, symbol="min_tiles", default=2),
                         Key(CV.PREPROC_MAX_TILES, u32, symbol="max_tiles", default=6)),
        tensors=(*SAM_TOWER, Tensor("v.resample_query_768.weight", ("E", 144)),
                 Tensor("v.resample_query_1024.weight", ("E", 256)), w(MT.V_POST_NORM, "E", need=EXPECTED),
                 w(MT.V_MMPROJ_FC, "E", "T"), b(MT.V_MMPROJ_FC, "T", need=REQUIRED), Tensor(TN[MT.V_ENC_EMBD_VSEP], ("T",))),
        blocks=VIT, rules=SAM_RULES),
}
#: clip.cpp:1291-1296 reads a qwen2.5o file's vision side as qwen2.5vl_merger before any key or tensor
PROJECTORS["qwen2.5o"] = PROJECTORS["qwen2.5vl_merger"]

#: models/glm4v.cpp runs glm5v too (clip.cpp 1090-1094, loader shared at 2613-2627); clip.cpp 1775-1787 adds a
#: required SwiGLU clamp (clip-impl.h:66, not in gguf-py 0.19) and token budget, asserted positive by mtmd's
#: glm5v layout (mtmd-image.cpp:802)
PROJECTORS["glm5v"] = Projector(
    keys=(spatial_merge(2), Key("clip.vision.swiglu_clamp", VT.FLOAT32, REQUIRED),
          Key(CV.IMAGE_MIN_PIXELS, u32, REQUIRED, "min_px"), Key(CV.IMAGE_MAX_PIXELS, u32, REQUIRED, "max_px")),
    tensors=PROJECTORS["glm4v"].tensors, blocks=PROJECTORS["glm4v"].blocks,
    rules=PROJECTORS["glm4v"].rules + (
        Rule(lambda h: h["min_px"] > 0 and h["max_px"] > 0, "{min_px_key} {min_px} and {max_px_key} {max_px}: "
             "mtmd's glm5v layout needs a positive token budget (it aborts otherwise)"),))
