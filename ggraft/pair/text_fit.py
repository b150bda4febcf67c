"""Data and one check: can the text model's architecture take this mmproj?  (``ggraft check``)

A width match is not enough for two kinds of mmproj, and the tables below say why, read from the
llama.cpp that llama-cpp-python 0.3.36 vendors (``boundary_tokens.LLAMA_CPP_SOURCE``):

- **Multi-axis positions.**  mtmd gives image tokens (t, h, w) positions only when the text
  model's rope type is M-RoPE or interleaved M-RoPE, and consecutive 1-D positions otherwise
  (``tools/mtmd/mtmd.cpp`` 550-565, from ``llama_model_rope_type`` in ``src/llama-model.cpp``
  3023-3209).  The projector types in ``NEEDS_MROPE`` are paired, by every converter llama.cpp
  has for them, with text architectures it runs with M-RoPE: their text models were trained on
  grid positions.  (``qwen2vl_merger`` is not among them: llama.cpp converts Sarashina2-Vision as
  a ``llama`` text model with a ``qwen2vl_merger`` mmproj, ``conversion/sarashina2.py``.)
- **DeepStack.**  A ``qwen3vl_merger`` mmproj appends one feature per DeepStack layer to each
  image token's embedding (``tools/mtmd/clip.cpp`` 5998-6000; the layers counted by their
  ``v.deepstack.N.fc1.weight`` tensors, 2322-2331).  Only the ``DEEPSTACK_ARCHS`` read those
  slices, adding slice k to the output of text layer k-1 (``src/models/qwen3vl.cpp`` 4 and
  153-157, ``qwen3vlmoe.cpp`` 4 and 164-167), as many as their ``n_deepstack_layers`` says; any
  other architecture, or another count, reads the features as part of one wider embedding.

Update the tables together with the llama-cpp-python pin.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import gguf

from .findings import ERROR, INFO

if TYPE_CHECKING:
    from ggraft.gguf_io.gguf_file import GGUFIndex

    from .findings import CheckedPair

K = gguf.Keys
DEEPSTACK_FC1 = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_DS_FC1] + ".weight"

#: text architectures llama.cpp always runs with multi-axis RoPE (llama-model.cpp 3187-3196)
MROPE_ARCHS: dict[str, str] = {
    "qwen2vl": "M-RoPE", "paddleocr": "M-RoPE",
    **{a: "interleaved M-RoPE" for a in ("qwen3vl", "qwen3vlmoe", "qwen35", "qwen35moe", "qwen4exp", "qwen3tts")},
}
#: ... and those it runs with M-RoPE only when the file has rope sections: hparams.use_mrope(),
#: sections 0 and 1 both non-zero (llama-hparams.cpp 352-354; llama-model.cpp 3096-3098, 3198-3204)
MROPE_IF_SECTIONS = ("bailingmoe3", "glm4", "glm4moe", "hunyuan_vl")

#: projector type -> the text architectures llama.cpp's converters pair it with, all run with M-RoPE
NEEDS_MROPE: dict[str, tuple[str, ...]] = {
    "qwen2.5vl_merger": ("qwen2vl",),                                         # conversion/qwenvl.py 14-22, 43-68
    "qwen2.5o": ("qwen2vl",),                                                 # conversion/qwenvl.py 165-179
    "qwen3vl_merger": ("qwen3vl", "qwen3vlmoe", "qwen35", "qwen35moe", "qwen4exp"),  # conversion/qwen3vl.py 16,
    # 280-306, 353-378; conversion/qwen.py 652-660; conversion/qwen4exp.py 16-26
    "ling3vl": ("bailingmoe3",),             # conversion/bailingmoe3.py 198-222 (always writes rope sections)
    "glm4v": ("glm4", "glm4moe"),  # conversion/glm.py 17-29, 89-108, 111; conversion/base.py 1497-1503
    "paddleocr": ("paddleocr",),                                              # conversion/ernie.py 160-168
    "hunyuanvl": ("hunyuan_vl",),  # conversion/hunyuan.py 330-360; 1-D positions abort mtmd (mtmd.cpp:1531)
}

#: text architectures that read DeepStack features, from ``{arch}.n_deepstack_layers``
DEEPSTACK_ARCHS = ("qwen3vl", "qwen3vlmoe")
DEEPSTACK_PROJECTOR = "qwen3vl_merger"
#: text architectures that read DeepStack slices by ``{arch}.deepstack_mapping`` (one slice index per
#: layer, -1 for none; the count is the distinct indices: src/models/granite.cpp 13-22,
#: granite-swa.cpp 22-31), and the projector whose mmproj appends one slice per ``clip.vision.feature_layer``
#: entry after the first (clip.cpp clip_n_mmproj_embd: projector blocks x projection_dim)
MAPPED_DEEPSTACK_ARCHS = ("granite", "granite_swa")
MAPPED_DEEPSTACK_PROJECTOR = "granite4_vision"
FEATURE_LAYER = "clip.vision.feature_layer"  # clip-impl.h KEY_FEATURE_LAYERS; not in gguf-py 0.19


def _number(value, kind: type = int):
    """``value`` if it is a ``kind`` (a damaged header may hold anything), else 0 (or [] for lists)."""
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    return kind()


def text_rope(t: GGUFIndex, arch: str) -> str | None:
    """The multi-axis RoPE llama.cpp runs ``arch`` with, or None for 1-D RoPE (or none)."""
    if arch in MROPE_ARCHS:
        return MROPE_ARCHS[arch]
    sections = _number(t.value(K.Rope.DIMENSION_SECTIONS.format(arch=arch)), list)
    if arch in MROPE_IF_SECTIONS and sections and len(sections) >= 2 and _number(sections[0]) > 0 \
            and _number(sections[1]) > 0:
        return "M-RoPE"
    return None


def text_deepstack(t: GGUFIndex, arch: str) -> int:
    """How many DeepStack slices llama.cpp's graph for ``arch`` reads from each input embedding."""
    if arch in MAPPED_DEEPSTACK_ARCHS:
        mapping = _number(t.value(f"{arch}.deepstack_mapping"), list)
        return len({i for i in mapping if isinstance(i, int) and not isinstance(i, bool) and i >= 0})
    return _number(t.value(K.LLM.NUM_DEEPSTACK_LAYERS.format(arch=arch))) if arch in DEEPSTACK_ARCHS else 0


def mmproj_deepstack(m: GGUFIndex, projector: str | None) -> int:
    """How many DeepStack features the mmproj appends per image token, counted as clip.cpp does."""
    if projector == MAPPED_DEEPSTACK_PROJECTOR:
        return max(len(_number(m.value(FEATURE_LAYER), list)) - 1, 0)
    if projector != DEEPSTACK_PROJECTOR:
        return 0
    blocks = _number(m.value(K.ClipVision.BLOCK_COUNT))
    return sum(m.tensor(DEEPSTACK_FC1.format(bid=i)) is not None for i in range(blocks))


def text_architecture_fit(p: CheckedPair) -> None:
    """One finding when the text architecture cannot take the mmproj (error, with every reason),
    or says why it can when positions or DeepStack are at stake (info)."""
    if p.projector is None:
        return
    arch = p.text.value(K.General.ARCHITECTURE, "")
    arch = arch if isinstance(arch, str) else ""
    rope, provided = text_rope(p.text, arch), mmproj_deepstack(p.mmproj, p.projector)
    read = text_deepstack(p.text, arch)
    reasons = []
    if p.projector in NEEDS_MROPE and rope is None:
        reasons.append(f"llama.cpp runs {arch!r} with 1-D RoPE, so image tokens get consecutive positions, while "
                       f"every text model llama.cpp pairs with a {p.projector!r} mmproj "
                       f"({', '.join(NEEDS_MROPE[p.projector])}) reads them at (t, h, w) grid positions (M-RoPE)")
    readers = MAPPED_DEEPSTACK_ARCHS if p.projector == MAPPED_DEEPSTACK_PROJECTOR else DEEPSTACK_ARCHS
    if provided and arch not in readers:
        reasons.append(f"the mmproj appends {provided} DeepStack feature(s) to each image embedding but {arch!r} "
                       f"does not read DeepStack features (only {', '.join(readers)} do): it would take "
                       "them as part of one embedding")
    elif provided != read:
        reasons.append(f"{arch!r} with n_deepstack_layers = {read} reads {read} DeepStack slice(s) of each image "
                       f"embedding, but the {p.projector!r} mmproj provides {provided}")
    if reasons:
        p.report.add("text-architecture", ERROR, f"text architecture {arch!r} cannot take this mmproj: "
                     + "; ".join(reasons), "use the text model this mmproj was converted with (same family and "
                     "llama.cpp architecture)")
    elif p.projector in NEEDS_MROPE or provided:
        stack = f" and reads the mmproj's {provided} DeepStack feature(s)" if provided else ""
        p.report.add("text-architecture", INFO, f"llama.cpp runs {arch!r} with {rope or '1-D RoPE'}{stack}, "
                     f"as a {p.projector!r} mmproj needs")
