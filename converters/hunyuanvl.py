"""HunyuanOCR (``HunYuanVLForConditionalGeneration``) -> projector ``hunyuanvl``.

What is special here:
- the released checkpoints and transformers 5's ``save_pretrained`` use the original module names
  (``vit.layers.N.input_layernorm``, ``mlp.dense_h_to_4h``, ``vit.perceive.proj.0`` ...), which
  TensorNameMap knows; a state dict saved as-is has transformers' own (``model.vision_tower.layers.N.
  layer_norm1``, ``mlp.fc1``, ``patch_merger.proj_conv`` ...), which ``canonical`` maps back.
- the position table's first row (CLS) is read by nothing; llama.cpp asserts a square grid
  (clip.cpp:5385-5386), so it is dropped.
- the perceiver (RMSNorm, Conv2d k=s=2, GELU, Conv2d 1x1, a newline column per row, Linear,
  begin/end rows, RMSNorm) is llama.cpp's graph too (tools/mtmd/models/hunyuanvl.cpp): (w/2 + 1) *
  h/2 + 2 rows.  GELU is exact in transformers, the tanh form in llama.cpp (fixed at clip.cpp:1947).
- mtmd counts tokens with 2x2 merging hard-coded (clip.cpp:4098, 4126) and aborts when the counts
  disagree (mtmd.cpp:1528-1531): other merges are refused.  llama.cpp resizes images to multiples of
  2 patches within ``min_pixels``..``max_pixels``, which the file carries (clip.cpp:1950-1951).

llama.cpp's runtime departs from transformers 5.24 in one way no file can compensate: it samples
the position grid at scale (side + 0.1) / grid (clip.cpp:5391-5426, after Tencent's original
``interpolate(scale_factor=(h + 0.1) / grid)``) where transformers resamples it to the exact side.
``runtime_reference`` runs transformers' model with llama.cpp's sampling.
"""
from __future__ import annotations

import math
import re

import gguf

from ggraft.errors import InputError
from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention, RuntimeDefect
from ._image_norms import CLIP_MEAN, CLIP_STD, GELU_ACTS

CV = gguf.Keys.ClipVision
POSITIONS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_POS] + ".weight"
PERCEIVER_CONV = re.compile(r"vit\.perceive\.proj\.(?P<i>[02])\.(?P<kind>weight|bias)")
#: transformers' module names -> the released checkpoint's (transformers' hunyuan_vl key mapping, reversed)
ORIGINAL_NAMES = ((r"^(vit\.layers\.\d+\.)layer_norm1\.", r"\1input_layernorm."),
                  (r"^(vit\.layers\.\d+\.)layer_norm2\.", r"\1post_attention_layernorm."),
                  (r"^(vit\.layers\.\d+\.mlp\.)fc1\.", r"\1dense_h_to_4h."),
                  (r"^(vit\.layers\.\d+\.mlp\.)fc2\.", r"\1dense_4h_to_h."),
                  (r"^vit\.patch_merger\.proj_conv\.", "vit.perceive.proj.0."),
                  (r"^vit\.patch_merger\.proj_out\.", "vit.perceive.proj.2."),
                  (r"^vit\.patch_merger\.", "vit.perceive."))
LLAMA_MERGE = 2
#: transformers' HunYuanVLVisionConfig / HunYuanVLImageProcessor defaults
DEFAULTS = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                patch_size=16, max_image_size=2048, rms_norm_eps=1e-5, hidden_act="gelu", spatial_merge_size=2,
                interpolate_mode="bilinear", num_channels=3)
MIN_PIXELS, MAX_PIXELS, TEXT_WIDTH = 512 * 512, 2048 * 2048, 4096
BOI, EOI, IMAGE, NEWLINE = (f"<｜hy_place▁holder▁no▁{n}｜>" for n in (100, 101, 102, 103))


@register
class HunyuanVL(Converter):
    architectures = ("HunYuanVLForConditionalGeneration",)
    projector_type = gguf.VisionProjectorType.HUNYUANVL
    family = "HunyuanOCR"
    image_tokens = (BOI, IMAGE, EOI)
    convention = Convention("HunyuanVL", (BOI, EOI, IMAGE, NEWLINE))
    runtime_defects = (RuntimeDefect(
        "hunyuanvl", "llama.cpp samples the learned position grid at scale (side + 0.1) / grid (after Tencent's "
        "original code) where transformers 5.24 resamples it to the exact side",
        "tools/mtmd/clip.cpp:5394-5395", seen_up_to="0.3.36"),)
    vision_prefixes = ("vit.",)
    layout_aliases = (("model.vision_tower.", "vit."),)

    @classmethod
    def refuses(cls, config):
        v = {**DEFAULTS, **(config.get("vision_config") or {})}
        if v["spatial_merge_size"] != LLAMA_MERGE:
            return f"llama.cpp's hunyuanvl runtime merges {LLAMA_MERGE}x{LLAMA_MERGE} patches only"
        if v["hidden_act"] not in GELU_ACTS:
            return f"vision activation {v['hidden_act']!r}: llama.cpp's hunyuanvl graph always uses GELU"
        if v["interpolate_mode"] != "bilinear":
            return f"interpolate_mode {v['interpolate_mode']!r}: llama.cpp resamples the position grid bilinearly"
        if v["num_channels"] != 3 or v["max_image_size"] < v["patch_size"]:
            return "llama.cpp needs 3 channels and a position grid of at least one patch"
        return None

    def vision(self) -> dict:
        v = {**DEFAULTS, **self.vision_config}  # transformers maps layer_norm_eps onto rms_norm_eps
        v["rms_norm_eps"] = self.vision_config.get("rms_norm_eps", v.get("layer_norm_eps", DEFAULTS["rms_norm_eps"]))
        return v

    def params(self) -> VisionParams:
        v = self.vision()
        text = self.config.get("text_config") or self.config  # released configs keep the text keys at the top
        mean, std = preprocessing(self.ckpt, CLIP_MEAN, CLIP_STD)
        extra = {CV.SPATIAL_MERGE_SIZE: LLAMA_MERGE, CV.IMAGE_MIN_PIXELS: self.pixels("min_pixels", "shortest_edge",
                                                                                      MIN_PIXELS),
                 CV.IMAGE_MAX_PIXELS: self.pixels("max_pixels", "longest_edge", MAX_PIXELS)}
        return VisionParams(
            image_size=v["max_image_size"] // v["patch_size"] * v["patch_size"], patch_size=v["patch_size"],
            embedding_length=v["hidden_size"], feed_forward_length=v["intermediate_size"],
            block_count=v["num_hidden_layers"], head_count=v["num_attention_heads"],
            layer_norm_eps=float(v["rms_norm_eps"]),
            projection_dim=text.get("hidden_size", v.get("text_hidden_size", TEXT_WIDTH)),
            image_mean=mean, image_std=std, use_gelu=True, extra=extra,
        )

    def pixels(self, key: str, size_key: str, default: int) -> int:
        """``min_pixels``/``max_pixels``, or transformers 5's ``size`` entries, which are pixel counts here
        (read raw: ConfigSection bounds ``size.*_edge`` as image sides)."""
        pre = self.ckpt.preprocessor_config
        size = pre.get("size") or {}
        value = dict.get(pre, key, dict.get(size, size_key, default))
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
            raise InputError(f"{self.ckpt.path}: preprocessor {key} is {value!r}; expected a pixel count "
                             f"from 1 to {2**31 - 1}")
        return value

    def canonical(self, name):
        name = super().canonical(name)
        for pattern, original in ORIGINAL_NAMES:
            name = re.sub(pattern, original, name)
        return name

    def rename(self, canonical):
        if m := PERCEIVER_CONV.fullmatch(canonical):  # TensorNameMap's row only reaches bid < the block count
            return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ].format(bid=m['i'])}.{m['kind']}"
        return super().rename(canonical)

    def modify(self, gguf_name, tensor):
        yield gguf_name, (tensor[1:] if gguf_name == POSITIONS else tensor)  # the CLS row nothing reads

    def test_image_size(self):
        """3:4 images of whole 2x2-patch tokens, the smallest within the file's pixel budget (not resized)."""
        unit, extra = LLAMA_MERGE * self.params().patch_size, self.params().extra
        k = max(1, math.ceil(math.sqrt(extra[CV.IMAGE_MIN_PIXELS] / (12 * unit * unit))))
        return 3 * k * unit, 4 * k * unit

    def model_inputs(self, pixel_values):
        """HunYuanVLImageProcessor's layout: patches row by row, each (channel, row, column)."""
        import torch

        p = self.params().patch_size
        gh, gw = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        x = pixel_values[0].reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3 * p * p)
        return {"pixel_values": x.contiguous(), "image_grid_thw": torch.tensor([[1, gh, gw]])}

    def runtime_reference(self, model, pixel_values):
        """transformers' model with the position grid sampled as llama.cpp samples it (clip.cpp:5391-5426)."""
        embeddings = model.model.vision_tower.embeddings
        embeddings.interpolate_pos_encoding = lambda _, h, w: llama_positions(embeddings, int(h), int(w))
        try:  # this instance only, removed below
            return model.get_image_features(**self.model_inputs(pixel_values))
        finally:
            del embeddings.interpolate_pos_encoding


def llama_positions(embeddings, height: int, width: int):
    """llama.cpp's position rows for a height x width patch grid: the grid sampled bilinearly at scale
    (side + 0.1) / grid, half-pixel centres, edges clamped, on every side (torch's ``interpolate`` with
    that ``scale_factor``, Tencent's code, leaves a side of the grid's own length as it is)."""
    import torch

    grid = embeddings.position_edge
    table = embeddings.position_embedding.weight[1:].float().reshape(grid, grid, -1)

    def weights(side: int):
        src = (torch.arange(side, dtype=torch.float32) + 0.5) / ((side + 0.1) / grid) - 0.5
        lo = src.floor().clamp(0, grid - 1)
        frac = (src - lo).clamp(0, 1)
        out = torch.zeros(side, grid)
        out[torch.arange(side), lo.long()] += 1 - frac
        out[torch.arange(side), (lo.long() + 1).clamp(max=grid - 1)] += frac
        return out

    rows = torch.einsum("yi,ijc,xj->yxc", weights(height), table, weights(width))
    return rows.reshape(1, height * width, -1)
