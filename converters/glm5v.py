"""GLM-5 Next (GLM-5.3-Flash) -> projector ``glm5v``.

The tower is GLM-OCR's (``converters/glm4v.py``: two-frame patch conv with bias, no learned
positions and no post-conv norm, fused ``attn.qkv`` with per-head q/k RMS norms, biased blocks
with an MLP of the vision ``intermediate_size``, 2x2 conv ``downsample``, then the merger
``proj`` + LayerNorm + GELU + gated MLP of ``projection_intermediate_size``), and llama.cpp runs
it with the glm4v graph (``tools/mtmd/clip.cpp`` 1090-1094).  What is special here:
- every SwiGLU (each block's MLP and the merger's) clamps its gate to at most ``swiglu_limit``
  and its up projection to +-``swiglu_limit``; llama.cpp does the same (``ggml_swiglu_clamp``,
  clip.cpp 651-653) from ``clip.vision.swiglu_clamp``, which clip.cpp requires for this type
  (clip.cpp 1782).  The clamp belongs to SiLU only there: other activations are refused.
- clip.cpp also requires ``clip.vision.image_min_pixels`` / ``image_max_pixels`` (1783-1784):
  mtmd places each image top-left on a canvas aligned to 2 patches within that token budget,
  padded black, rescaling only to meet the budget (``tools/mtmd/mtmd-image.cpp`` 796-857), as
  ``Glm5NextImageProcessor`` does.  They come from the processor's ``min_image_tokens`` /
  ``max_image_tokens`` (transformers' defaults, 16 / 8000, when the file leaves them out).
Saved layouts: ``model.visual.*`` (save_pretrained, the releases) and ``visual.*`` (transformers' bare
``Glm5NextModel``, and the names llama.cpp's converter reduces them to).
llama.cpp's own converter (``conversion/qwen3vl.py`` 254-277) writes the clamp and the budget only
when the config files name them, so a checkpoint relying on transformers' defaults gives a file
llama.cpp refuses to load ("Key not found"); ggraft writes the defaults.  The runtime matches
transformers (no known deviation; an image mtmd must rescale can differ by the rounding of its
bicubic passes, which mtmd always runs horizontal first, mtmd-image.cpp:469, and Pillow 13 for
some shapes vertical first).
"""
from __future__ import annotations

import dataclasses
import math

import gguf

from ggraft.errors import InputError
from ggraft.mmproj.converter import VisionParams, register
from ggraft.mmproj.requirement_parts import INT32_MAX
from .glm4v import DEFAULTS, GlmOcr
from .qwen2vl import LLAMA_MERGE

PROJECTOR = "glm5v"  # clip-impl.h PROJECTOR_TYPE_GLM5V; not in gguf-py 0.19
SWIGLU_CLAMP = "clip.vision.swiglu_clamp"  # clip-impl.h:66 KEY_SWIGLU_CLAMP; not in gguf-py 0.19
CV = gguf.Keys.ClipVision
#: Glm5NextImageProcessor's defaults: token budget and the canvas alignment factor (over patch x merge)
PROCESSOR = {"min_image_tokens": 16, "max_image_tokens": 8000, "patch_expand_factor": 1}


@register
class Glm5Next(GlmOcr):
    architectures = ("Glm5NextForConditionalGeneration", "Glm5NextModel")  # the bare model holds the same tower
    projector_type = PROJECTOR
    family = "GLM-5 Next"
    # image_tokens and convention: GLM-4V's (<|begin_of_image|> <|image|> <|end_of_image|>, projectors glm4v, glm5v)
    #: transformers' Glm5NextVisionConfig defaults
    defaults = {**DEFAULTS, "hidden_size": 1024, "num_heads": 16, "out_hidden_size": 1536, "intermediate_size": 4096,
                "projection_intermediate_size": 10240, "swiglu_limit": 10.0}

    @classmethod
    def refuses(cls, config):
        v = cls.vision(config)
        limit = v["swiglu_limit"]
        if v["hidden_act"] != "silu":
            return f"vision activation {v['hidden_act']!r}: llama.cpp clamps the SwiGLU only (clip.cpp:651)"
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit < math.inf:
            return f"swiglu_limit {limit!r}: llama.cpp clamps only with a positive limit (clip.cpp:651)"
        return super().refuses(config)

    def token_budget(self) -> tuple[int, int]:
        """(min, max) image tokens of the processor; raises on what mtmd cannot lay out the same way."""
        pre = {**PROCESSOR, **{k: v for k, v in self.ckpt.preprocessor_config.items() if k in PROCESSOR}}
        low, high, expand = pre["min_image_tokens"], pre["max_image_tokens"], pre["patch_expand_factor"]
        side = self.vision(self.config)["patch_size"] * LLAMA_MERGE
        if expand != 1:
            raise InputError(f"{self.ckpt.path}: preprocessor patch_expand_factor {expand!r}: llama.cpp aligns "
                             f"images to {LLAMA_MERGE} patches only (tools/mtmd/mtmd-image.cpp:804)")
        for name, value in (("min_image_tokens", low), ("max_image_tokens", high)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value * side * side <= INT32_MAX:
                raise InputError(f"{self.ckpt.path}: preprocessor {name} is {value!r}; expected a positive "
                                 f"integer of at most {INT32_MAX // (side * side)}")
        if low > high:
            raise InputError(f"{self.ckpt.path}: preprocessor min_image_tokens {low} is over max_image_tokens {high}")
        return low, high

    def params(self) -> VisionParams:
        base = super().params()
        v = self.vision(self.config)
        area = (v["patch_size"] * LLAMA_MERGE) ** 2
        low, high = self.token_budget()
        extra = {SWIGLU_CLAMP: float(v["swiglu_limit"]), CV.IMAGE_MIN_PIXELS: low * area,
                 CV.IMAGE_MAX_PIXELS: high * area}
        return dataclasses.replace(base, extra={**base.extra, **extra})

    def test_image_size(self):
        """A 4:3 grid of at least 12 merged tokens inside the processor's budget (mtmd leaves it as it is)."""
        side = self.params().patch_size * LLAMA_MERGE
        low, high = self.token_budget()
        rows = math.ceil(math.sqrt(max(12, low) * 4 / 3))
        cols = math.ceil(max(12, low) / rows)
        rows, cols = (rows, cols) if rows * cols <= high else (1, low)
        return rows * side, cols * side

