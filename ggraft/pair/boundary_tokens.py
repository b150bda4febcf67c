"""Data: the text tokens llama.cpp puts around image embeddings, per projector type.

``BOUNDARY_TOKENS`` is read from ``tools/mtmd/mtmd.cpp`` (``mtmd_context::init_vision``) of the
llama.cpp that llama-cpp-python 0.3.36 vendors (``LLAMA_CPP_SOURCE``).  There a projector type
sets ``img_beg``/``img_end`` (text tokenized with special tokens parsed: a marker that is not one
token in the vocab is split into pieces the model never saw) and looks tokens up by their exact
piece (``lookup_token``: a missing piece becomes token id -1 in the batch).  Update the table
together with the llama-cpp-python pin.
"""
from __future__ import annotations

from dataclasses import dataclass

LLAMA_CPP_SOURCE = "ggml-org/llama.cpp@0c1e57098"
LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release that vendors LLAMA_CPP_SOURCE


@dataclass(frozen=True)
class Boundary:
    """One token llama.cpp inserts next to image embeddings."""

    text: str
    role: str
    looked_up: bool = False  # True: mtmd.cpp's lookup_token (exact piece); False: tokenized text


def _pair(begin: str, end: str) -> tuple[Boundary, ...]:
    return (Boundary(begin, "image start"), Boundary(end, "image end"))


_SLICES = (Boundary("<image>", "overview start", True), Boundary("</image>", "overview end", True),
           Boundary("<slice>", "slice start", True), Boundary("</slice>", "slice end", True),
           Boundary("\n", "row end", True))

#: projector type -> alternatives (each a tuple of boundary tokens).  mtmd.cpp uses the first
#: alternative whose first token is in the vocab, else the last one (only kimik25 has two).
#: An empty tuple: the projector inserts no text tokens (its markers, if any, are embeddings).
BOUNDARY_TOKENS: dict[str, tuple[tuple[Boundary, ...], ...]] = {
    **{p: ((),) for p in ("mlp", "ldp", "ldpv2", "adapter", "cogvlm", "janus_pro", "phi4",
                          "deepseek4v", "nemotron_v2_vl")},
    **{p: (_pair("<|vision_start|>", "<|vision_end|>"),)
       for p in ("qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger", "ling3vl", "mimovl", "youtuvl", "qwen2.5o")},
    "resampler": (_SLICES,),
    "minicpmv4_6": (_SLICES,),
    "minimax_m3": (_pair("]<]start of image[>[", "]<]end of image[>["),),
    "muse-glimmer": (_pair("<|image_start|>", "<|image_end|>"),),
    "yasa2": (_pair("<image>", "</image>"),),
    "gemma3": (_pair("<start_of_image>", "<end_of_image>"),),
    "gemma3nv": (_pair("<start_of_image>", "<end_of_image>"),),
    "idefics3": ((Boundary("\n\n", "overview start", True), Boundary("<fake_token_around_image>", "overview start", True),
                  Boundary("<global-img>", "overview start", True), Boundary("\n", "row end", True),
                  Boundary("<row_1_col_1>", "tile (<row_i_col_j>)")),),
    "pixtral": ((Boundary("[IMG_END]", "image end"),),),
    "llama4": (_pair("<|image_start|>", "<|image_end|>"),),
    "step3vl": ((Boundary("<im_start>", "overview start", True), Boundary("<im_end>", "overview end", True),
                 Boundary("<patch_start>", "tile start", True), Boundary("<patch_end>", "tile end", True),
                 Boundary("<patch_newline>", "row end", True)),),
    "internvl": (_pair("<img>", "</img>"),),
    "kimivl": (_pair("<|media_start|>", "<|media_end|>"),),
    "kimik25": (_pair("<|begin_of_image|>", "<|end_of_image|>"), _pair("<|media_begin|>", "<|media_end|>")),
    "lightonocr": (_pair("<|im_start|>", "<|im_end|>"),),
    "dots_ocr": (_pair("<|img|>", "<|endofimg|>"),),
    "dots3note_v": (_pair("<|img|>", "<|endofimg|>"),),
    "lfm2": ((*_pair("<|image_start|>", "<|image_end|>"), Boundary("<|img_thumbnail|>", "thumbnail start", True),
              Boundary("<|img_row_1_col_1|>", "tile (<|img_row_i_col_j|>)")),),
    "glm4v": (_pair("<|begin_of_image|>", "<|end_of_image|>"),),
    "glm5v": (_pair("<|begin_of_image|>", "<|end_of_image|>"),),
    "paddleocr": (_pair("<|IMAGE_START|>", "<|IMAGE_END|>"),),
    "gemma4v": (_pair("<|image>", "<image|>"),),
    "gemma4uv": (_pair("<|image>", "<image|>"),),
    "deepseekocr": ((Boundary("\n", "image end"),),),
    "deepseekocr2": ((Boundary("\n", "image end"),),),
    "hunyuanvl": (_pair("<｜hy_place▁holder▁no▁100｜>", "<｜hy_place▁holder▁no▁101｜>"),),
    "exaone4_5": (_pair("<vision>", "</vision>"),),
    "granite4_vision": ((Boundary("\n", "image end"),),),
}
