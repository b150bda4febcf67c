"""EXAONE 4.5 -> projector ``exaone4_5``.

The tower is Qwen2.5-VL's (two-frame patch conv, RMS norms, gated SiLU MLP, windowed attention
but in the periodic full-attention blocks, 2D rope, ``ln_q`` + 2x2 merger MLP: ``converters/
qwen2vl.py``); what is special here:
- attention is grouped-query (``num_key_value_heads``), with q, k and v fused in ``attn.qkv`` (q
  rows, then k, then v).  llama.cpp's exaone4_5 graph slices the fused tensor the same way
  (``tools/mtmd/models/exaone4_5.cpp`` 94-106), so it is written whole, with
  ``clip.vision.attention.head_count_kv``, which clip.cpp requires for this type (``clip.cpp`` 1974).
- clip.cpp requires ``image_min_pixels``/``image_max_pixels`` (``clip.cpp`` 1968-1969): mtmd resizes
  each image itself within them (``mtmd_image_preprocessor_dyn_size``).  They come from the
  preprocessor config (``min_pixels``/``max_pixels``, else transformers' ``size``).
- clip.cpp swaps ``ffn_up``/``ffn_down`` back for this type when ``ffn_down``'s input width is the
  tower's width (its fix for old files, ``clip.cpp`` 2335-2358), i.e. when intermediate_size equals
  hidden_size; such a tower is written with the two swapped so that the runtime swaps them back.
- the hub's layout is transformers 5's (``model.visual.*``); ``visual.*`` is taken too.
- llama.cpp reads no rope base for this type (10000, ``clip.cpp`` 1971-1973): other bases are refused.

llama.cpp's runtime (llama-cpp-python 0.3.36 included) reads no window size for this type either
(``clip.cpp`` 1963-1975 never reads ``clip.vision.window_size``), so ``attn_window_size`` stays 0 and
the runtime attends within 112-pixel windows (``clip.cpp`` 4957).  The released model's windows are
112 pixels; for any other size ``runtime_reference`` runs transformers with 112-pixel windows.
"""
from __future__ import annotations

import re

import gguf

from ggraft.errors import InputError
from ggraft.mmproj.converter import register
from ggraft.mmproj.facts import Convention, RuntimeDefect
from ggraft.mmproj.requirement_parts import INT32_MAX, KEYS
from .qwen2vl import LLAMA_MERGE, LLAMA_WINDOW, QKV, T, Qwen25VL

K = gguf.Keys.ClipVision
HEAD_COUNT_KV = KEYS["Hkv"]  # clip-impl.h KEY_N_HEAD_KV; gguf-py 0.19 has no constant for it
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280  # Qwen2VLImageProcessor's size defaults (EXAONE 4.5's processor)
NAMES = gguf.TENSOR_NAMES
#: ffn_up <-> ffn_down, for towers whose FFN is as wide as the tower (see ``ffn_swapped``)
SWAPS = tuple((re.compile(NAMES[a].replace(".", r"\.").format(bid=r"(?P<bid>\d+)") + r"\.(?P<kind>weight|bias)"), b)
              for a, b in ((T.V_ENC_FFN_UP, T.V_ENC_FFN_DOWN), (T.V_ENC_FFN_DOWN, T.V_ENC_FFN_UP)))
TEST_GRID = (9, 11)  # merged tokens per side of the test image: windows of 4 (patch 14) or 8 (patch 7), partial



def swapped(gguf_name: str) -> str | None:
    """ffn_up's name for ffn_down's and back (None for any other tensor)."""
    for pattern, other in SWAPS:
        if m := pattern.fullmatch(gguf_name):
            return f"{NAMES[other].format(bid=m['bid'])}.{m['kind']}"
    return None


@register
class Exaone45(Qwen25VL):
    architectures = ("Exaone4_5_ForConditionalGeneration",)
    projector_type = "exaone4_5"  # clip-impl.h PROJECTOR_TYPE_EXAONE4_5; not in gguf-py 0.19
    family = "EXAONE 4.5"
    image_tokens = ("<vision>", "<|image_pad|>", "</vision>")
    convention = Convention("EXAONE 4.5", ("<vision>", "</vision>", "<|image_pad|>", "<|video_pad|>"))
    runtime_defects = (RuntimeDefect(
        "exaone4_5", f"llama.cpp's exaone4_5 runtime reads no window size and always attends within "
        f"{LLAMA_WINDOW}-pixel windows: the file matches transformers run with {LLAMA_WINDOW}-pixel windows, the "
        "runtime does not match this checkpoint's window_size", "tools/mtmd/clip.cpp:4957 (no key read at 1963-1975)",
        seen_up_to="0.3.36", unless_key=(K.WINDOW_SIZE, LLAMA_WINDOW)),)
    # vision_prefixes ("visual.",) and the alias model.visual. -> visual. come from Qwen2VL

    @classmethod
    def refuses(cls, config):
        v = config.get("vision_config") or {}
        heads, kv = v.get("num_heads", 16), v.get("num_key_value_heads", 8)
        if kv <= 0 or heads % kv:
            return f"num_key_value_heads {kv} does not divide num_heads {heads}"
        return super().refuses(config)

    def pixel_limits(self) -> tuple[int, int]:
        """(min, max) pixels of the image processor, as transformers' Qwen2VLImageProcessor reads them."""
        pre = self.ckpt.preprocessor_config  # the hub's min_pixels / max_pixels, else transformers 5's size
        low, high = pre.get("min_pixels"), pre.get("max_pixels")
        if low is None or high is None:
            size = pre.get("size") or {}
            low = size.get("shortest_edge", MIN_PIXELS) if low is None else low
            high = size.get("longest_edge", MAX_PIXELS) if high is None else high
        for name, value in (("min_pixels", low), ("max_pixels", high)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= INT32_MAX:
                raise InputError(f"{self.ckpt.path}: preprocessor {name} is {value!r}; expected a positive integer")
        return low, high

    def extra(self):
        low, high = self.pixel_limits()
        return {**super().extra(), HEAD_COUNT_KV: self.vision_config.get("num_key_value_heads", 8),
                K.IMAGE_MIN_PIXELS: low, K.IMAGE_MAX_PIXELS: high}

    @property
    def ffn_swapped(self) -> bool:
        """clip.cpp will swap ffn_up and ffn_down back (clip.cpp 2335-2358)."""
        embd, ffn, _ = self.widths()
        return ffn == embd

    def modify(self, gguf_name, tensor):
        if QKV.fullmatch(gguf_name):  # fused q | k | v rows, as llama.cpp's graph slices them
            yield gguf_name, tensor
        elif self.ffn_swapped and (other := swapped(gguf_name)):
            yield other, tensor  # clip.cpp swaps them back
        else:
            yield from super().modify(gguf_name, tensor)

    def test_image_size(self):
        """9 x 11 merged tokens (several windows, some partial), scaled up until no side is resized."""
        side, low = self.params().patch_size * LLAMA_MERGE, self.pixel_limits()[0]
        n = 1
        while n * n * TEST_GRID[0] * TEST_GRID[1] * side * side < low:
            n += 1
        return n * TEST_GRID[0] * side, n * TEST_GRID[1] * side
