"""DeepSeek-OCR 2 -> ``deepseekocr2`` and Unlimited-OCR -> ``deepseekocr``: a SAM tower feeding a second
encoder, then a linear projector (``mm.model.fc``), global view and tiles.

Shared (``SamOcr``):
- the SAM tower (16-pixel patch conv, position grid, windowed and global blocks with decomposed
  relative positions, conv neck, two stride-2 convs) is gguf-py's ``v.sam.*`` table under the
  names transformers saves (the released ones, ``model.sam_model.*``); the relative-position tables
  and the grid are bare parameters, which llama.cpp reads as ``.weight``.
- llama.cpp fixes what the checkpoint may vary (clip.cpp load_hparams, models/deepseekocr.cpp,
  clip-model.h ``global_attn_indices``): 1024-pixel global views in 16-pixel patches, SAM's global
  blocks 2/5/8/11, its norms at eps 1e-6, grey 127 padding; anything else is refused.  SAM's GELU
  is exact in transformers, the tanh form in llama.cpp.
- an image larger than a tile is cut into the grid of ``min_patches``..``max_patches`` tiles closest
  to its aspect ratio, tiles before the global view, on both sides; ``model_inputs`` lays an image
  out with transformers' Pillow image processor (llama.cpp's resize is a port of Pillow's).
- llama.cpp resamples SAM's grid for a tile with plain bicubic, transformers with antialiased
  bicubic, and (Unlimited-OCR) scrambles the CLIP position table it resizes for a tile: runtime
  defects no file can fix, as the global view needs the tables as stored (``runtime_reference``
  runs transformers the runtime's way; the global view alone matches strictly).
Layouts: the names transformers 5 saves and its module names (``model.vision_tower.*``, ...).
"""
from __future__ import annotations

import re
from typing import ClassVar

import gguf
import numpy as np

from ggraft.errors import UnsupportedModelError
from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention, RuntimeDefect

from ._image_norms import GELU_ACTS, SIGLIP_MEAN, SIGLIP_STD

T, K = gguf.MODEL_TENSOR, gguf.Keys.ClipVision
SAM_PREFIX = "model.sam_model."
BARE = re.compile(r".*(pos_embed|rel_pos_[hw])")  # parameters saved without .weight
SAM_GLOBAL = (2, 5, 8, 11)  # clip-model.h global_attn_indices()
#: transformers' SAM module names -> the saved ones (its conversion_mapping.py, reversed)
SAM_MODULES = tuple((re.compile(r"model\.vision_tower\.sam_encoder\." + a), SAM_PREFIX + b) for a, b in (
    (r"layers\.(\d+)\.layer_norm([12])\.", r"blocks.\1.norm\2."), (r"layers\.", "blocks."),
    (r"patch_embed\.projection\.", "patch_embed.proj."), (r"neck\.conv1\.", "neck.0."),
    (r"neck\.layer_norm1\.", "neck.1."), (r"neck\.conv2\.", "neck.2."), (r"neck\.layer_norm2\.", "neck.3."),
    (r"proj\.conv1\.", "net_2."), (r"proj\.conv2\.", "net_3."), ("", "")))
#: transformers' SamVisionConfig and image processor defaults
SAM = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=1024, patch_size=16,
           hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, use_abs_pos=True, use_rel_pos=True, window_size=14,
           global_attn_indexes=list(SAM_GLOBAL))
LLAMA = dict(image=1024, patch=16, pad=[127, 127, 127], eps=1e-6)


def tile_defect(projector: str, tile: int, model: str) -> RuntimeDefect:
    return RuntimeDefect(
        projector, f"llama.cpp resamples SAM's position grid to a {tile}-pixel tile with plain bicubic interpolation "
        f"where transformers uses antialiased bicubic: the tiles of images larger than {tile} pixels get other "
        "position embeddings (the global view does not)", "tools/mtmd/models/deepseekocr.cpp:143 "
        f"(GGML_SCALE_MODE_BICUBIC) against {model}SamVisionEncoder.interpolate_pos_encoding (antialias=True)",
        seen_up_to="0.3.36")


class SamOcr(Converter):
    """What DeepSeek-OCR 2 and Unlimited-OCR share (not registered)."""

    image_tokens = ("<image>",)
    convention = Convention("LLaVA", image_tokens, projectors=("mlp",))  # the token LLaVA's processors use too
    modules: ClassVar[tuple] = ()  # the family's other module names -> the saved ones
    tile: ClassVar[int] = 768  # clip.cpp preproc_tile_size
    max_tiles: ClassVar[int] = 6  # the image processor's max_patches default
    tile_grid: ClassVar[bool] = False  # get_image_features takes patches_grid

    @classmethod
    def sam_refuses(cls, config) -> str | None:
        sam = cls.sam(config)
        fixed = {"image_size": LLAMA["image"], "patch_size": LLAMA["patch"], "layer_norm_eps": LLAMA["eps"],
                 "qkv_bias": True, "use_abs_pos": True, "use_rel_pos": True}
        for key, want in fixed.items():
            if sam[key] != want:
                return f"SAM {key} {sam[key]} (llama.cpp's {cls.projector_type} graph runs {want})"
        if list(sam["global_attn_indexes"]) != [i for i in SAM_GLOBAL if i < sam["num_hidden_layers"]]:
            return f"SAM global_attn_indexes {list(sam['global_attn_indexes'])} (llama.cpp's are {list(SAM_GLOBAL)})"
        if sam["hidden_act"] not in GELU_ACTS:
            return f"SAM activation {sam['hidden_act']!r} (llama.cpp's {cls.projector_type} graph runs GELU)"
        return None

    @staticmethod
    def sam(config) -> dict:
        return {**SAM, **((config.get("vision_config") or {}).get("sam_config") or {})}

    def processor(self) -> dict:
        defaults = dict(size={"height": 1024, "width": 1024}, tile_size=self.tile, crop_to_patches=True, min_patches=2,
                        max_patches=self.max_tiles, background_color=LLAMA["pad"])
        pre = {**defaults, **{k: v for k, v in self.ckpt.preprocessor_config.items() if k in defaults}}
        size = pre["size"] if isinstance(pre["size"], dict) else {}
        for what, value, want in (("size", [size.get("height"), size.get("width")], [LLAMA["image"]] * 2),
                                  ("tile_size", pre["tile_size"], self.tile),
                                  ("crop_to_patches", pre["crop_to_patches"], True),
                                  ("background_color", list(pre["background_color"]), LLAMA["pad"])):
            if value != want:
                raise UnsupportedModelError(f"{self.ckpt.path}: preprocessor {what} {value} (llama.cpp's is {want})")
        return pre

    def vision_params(self, **encoder) -> VisionParams:
        sam, pre = self.sam(self.config), self.processor()
        mean, std = preprocessing(self.ckpt, SIGLIP_MEAN, SIGLIP_STD)  # the image processors' 0.5
        extra = {K.SAM.BLOCK_COUNT: sam["num_hidden_layers"], K.SAM.EMBEDDING_LENGTH: sam["hidden_size"],
                 K.SAM.HEAD_COUNT: sam["num_attention_heads"], K.WINDOW_SIZE: sam["window_size"],
                 K.PREPROC_MIN_TILES: pre["min_patches"], K.PREPROC_MAX_TILES: pre["max_patches"],
                 **encoder.pop("extra")}
        return VisionParams(image_size=LLAMA["image"], patch_size=LLAMA["patch"], image_mean=mean, image_std=std,
                            projection_dim=(self.text_config or {}).get("hidden_size", 4096), extra=extra, **encoder)

    @property
    def name_map(self):
        if not hasattr(self, "_name_map"):  # SAM's blocks, its 4-part neck and the encoder's blocks
            blocks = max(self.sam(self.config)["num_hidden_layers"], 4, self.params().block_count)
            self._name_map = gguf.TensorNameMap(gguf.MODEL_ARCH.MMPROJ, blocks)
        return self._name_map

    def canonical(self, name):
        for pattern, repl in SAM_MODULES + self.modules:
            if pattern.match(name):
                return pattern.sub(repl, name, count=1)
        return name

    def rename(self, canonical):
        name = super().rename(canonical)
        return name + ".weight" if name and BARE.fullmatch(canonical) else name

    def tensors(self):
        """In name order, so every layout writes its tensors in the same order."""
        return iter(sorted(super().tensors(), key=lambda item: item[0]))

    def test_image_size(self):
        return self.tile, self.tile  # not tiled: one global view (resized to 1024 pixels)

    def model_inputs(self, pixel_values):
        """The image as transformers' Pillow image processor lays it out: tiles (if any), global view."""
        from transformers import DeepseekOcr2ImageProcessorPil
        from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import get_optimal_tiled_canvas

        p, pre = self.params(), self.processor()
        img = pixel_values[0].permute(1, 2, 0).double().numpy() * p.image_std + p.image_mean
        img = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
        kwargs = {k: v for k, v in self.ckpt.preprocessor_config.items() if not k.endswith(("_type", "_class"))}
        out = DeepseekOcr2ImageProcessorPil(**{**kwargs, **pre})(images=[img], return_tensors="pt")
        inputs = {k: out[k] for k in ("pixel_values", "pixel_values_local", "num_local_patches") if k in out}
        if self.tile_grid:
            tiles = (img.shape[:2], (self.tile, self.tile), pre["min_patches"], pre["max_patches"])
            inputs["patches_grid"] = [list(get_optimal_tiled_canvas(*tiles)) if "pixel_values_local" in out else [1, 1]]
        return inputs

    def runtime_resamplers(self, model) -> dict:
        """{module: its interpolate_pos_encoding done the runtime's way}: SAM's grid, plain bicubic."""
        import torch.nn.functional as F

        sam = next(m for m in model.modules() if type(m).__name__.endswith("SamVisionEncoder"))

        def plain_bicubic(height, width):
            grid = sam.pos_embed.permute(0, 3, 1, 2)
            return F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)

        return {sam: plain_bicubic}

    def runtime_reference(self, model, pixel_values):
        """transformers with the tiles' position tables resampled as llama.cpp does (None: no tiles)."""
        inputs = self.model_inputs(pixel_values)
        if "pixel_values_local" not in inputs:
            return None
        resamplers = self.runtime_resamplers(model)
        for module, fn in resamplers.items():
            module.interpolate_pos_encoding = fn
        try:
            return model.get_image_features(**inputs)
        finally:
            for module in resamplers:
                del module.interpolate_pos_encoding


ENCODER2 = re.compile(r"model\.qwen2_model\.model\.model\.layers\.(?P<bid>\d+)\.(?P<part>.+)\.(?P<kind>weight|bias)")
#: the Qwen2 encoder's block parts (gguf-py 0.19 has no ``qwen2_model`` rows)
ENCODER2_PARTS = {"self_attn.q_proj": T.V_ENC_ATTN_Q, "self_attn.k_proj": T.V_ENC_ATTN_K,
                  "self_attn.v_proj": T.V_ENC_ATTN_V, "self_attn.o_proj": T.V_ENC_ATTN_O,
                  "input_layernorm": T.V_ENC_INPUT_NORM, "post_attention_layernorm": T.V_ENC_POST_ATTN_NORM,
                  "mlp.gate_proj": T.V_ENC_FFN_GATE, "mlp.up_proj": T.V_ENC_FFN_UP, "mlp.down_proj": T.V_ENC_FFN_DOWN}
QUERY = re.compile(r"model\.qwen2_model\.query_(?P<side>768|1024)\.weight")
RESAMPLE_QUERY = "v.resample_query_{side}.weight"  # clip-impl.h TN_RESMPL_QUERY
#: transformers' DeepseekOcr2VisionEncoderConfig defaults
ENCODER2_DEFAULTS = dict(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, hidden_act="silu", rms_norm_eps=1e-6, use_sliding_window=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


@register
class DeepseekOcr2(SamOcr):
    """The Qwen2 encoder (``v.blk.*``, ``v.post_ln``) reads the SAM grid and then 256 learned queries (a
    1024-pixel view) or 144 (a 768-pixel tile), bidirectional over the grid, causal over the queries;
    only the queries reach ``mm.model.fc``, and ``v.view_seperator`` ends the global view.  llama.cpp
    runs its rope at base 1e6 (models/deepseekocr2.cpp)."""

    architectures = ("DeepseekOcr2ForConditionalGeneration",)
    projector_type = "deepseekocr2"  # clip-impl.h PROJECTOR_TYPE_DEEPSEEKOCR2; not in gguf-py 0.19
    family = "DeepSeek-OCR 2"
    runtime_defects = (tile_defect("deepseekocr2", 768, "DeepseekOcr2"),)
    vision_prefixes = (SAM_PREFIX, "model.qwen2_model.", "model.projector.", "model.view_seperator")
    modules = tuple((re.compile(a), b) for a, b in (
        (r"model\.vision_tower\.vision_encoder\.", "model.qwen2_model.model.model."),
        (r"model\.vision_tower\.query_(768|1024)_resolution\.", r"model.qwen2_model.query_\1."),
        (r"model\.multi_modal_projector\.", "model.projector.layers."),
        (r"model\.view_separator$", "model.view_seperator")))

    @classmethod
    def encoder(cls, config) -> dict:
        enc = {**ENCODER2_DEFAULTS, **((config.get("vision_config") or {}).get("encoder_config") or {})}
        return {**enc, "num_key_value_heads": enc["num_key_value_heads"] or enc["num_attention_heads"]}

    @classmethod
    def refuses(cls, config):
        enc = cls.encoder(config)
        rope = enc.get("rope_parameters") or {}
        if reason := cls.sam_refuses(config):
            return reason
        if enc["hidden_act"] != "silu" or enc["use_sliding_window"]:
            return "an encoder without SiLU or with sliding windows (llama.cpp runs SiLU over the whole sequence)"
        if rope.get("rope_type", "default") != "default" or rope.get("rope_theta") != 1e6:
            return f"encoder rope {rope} (llama.cpp's deepseekocr2 graph runs default rope at base 1e6)"
        return None

    def params(self) -> VisionParams:
        enc = self.encoder(self.config)
        return self.vision_params(
            embedding_length=enc["hidden_size"], feed_forward_length=enc["intermediate_size"],
            block_count=enc["num_hidden_layers"], head_count=enc["num_attention_heads"],
            layer_norm_eps=enc["rms_norm_eps"], use_gelu=True,  # SAM's
            extra={gguf.Keys.Attention.HEAD_COUNT_KV.format(arch="clip.vision"): enc["num_key_value_heads"]})

    def rename(self, canonical):
        if m := ENCODER2.fullmatch(canonical):
            part = ENCODER2_PARTS.get(m["part"])
            return part and f"{gguf.TENSOR_NAMES[part].format(bid=m['bid'])}.{m['kind']}"
        if m := QUERY.fullmatch(canonical):
            return RESAMPLE_QUERY.format(side=m["side"])
        if canonical == "model.qwen2_model.model.model.norm.weight":
            return gguf.TENSOR_NAMES[T.V_POST_NORM] + ".weight"
        return super().rename(canonical)


QKV = re.compile(gguf.TENSOR_NAMES[T.V_ENC_ATTN_QKV].replace(".", r"\.").format(bid=r"(?P<bid>\d+)")
                 + r"\.(?P<kind>weight|bias)")
#: transformers' UnlimitedOcrVisionEncoderConfig defaults
CLIP_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@register
class UnlimitedOcr(SamOcr):
    """A CLIP encoder (``v.blk.*``, CLS, learned positions, ``v.pre_ln``; quick GELU and eps 1e-5 fixed in
    llama.cpp) takes the SAM grid as its patch embeddings; each token's CLIP and SAM features, side by
    side, go through ``mm.model.fc``; ``v.image_newline`` ends every row of tokens and
    ``v.view_seperator`` the global view.  A fused ``qkv_proj`` (the saved layout) is split into q, k, v
    (transformers' module layout), so both layouts write the same file."""

    architectures = ("UnlimitedOcrForConditionalGeneration",)
    projector_type = gguf.VisionProjectorType.DEEPSEEKOCR
    family = "Unlimited-OCR"
    runtime_defects = (tile_defect("deepseekocr", 640, "UnlimitedOcr"), RuntimeDefect(
        "deepseekocr", "llama.cpp resizes the CLIP position table for a 640-pixel tile's grid wrongly: it interpolates "
        "the 2-D table as an image of (width, rows) and reads CLS's row at a byte offset meant as a row index, so "
        "every tile token gets scrambled positions (the global view keeps the table's own size)",
        "tools/mtmd/models/deepseekocr.cpp:328-338", seen_up_to="0.3.36"))
    vision_prefixes = (SAM_PREFIX, "model.vision_model.", "model.projector.", "model.view_seperator",
                       "model.image_newline")
    modules = tuple((re.compile(a), b) for a, b in (
        (r"model\.vision_tower\.vision_encoder\.encoder\.", "model.vision_model.transformer."),
        (r"model\.vision_tower\.vision_encoder\.", "model.vision_model."),
        (r"model\.multi_modal_projector\.", "model.projector.layers."),
        (r"model\.view_separator$", "model.view_seperator")))
    tile, max_tiles, tile_grid = 640, 32, True

    @classmethod
    def clip(cls, config) -> dict:
        return {**CLIP_DEFAULTS, **((config.get("vision_config") or {}).get("encoder_config") or {})}

    @classmethod
    def refuses(cls, config):
        clip = cls.clip(config)
        if reason := cls.sam_refuses(config):
            return reason
        if clip["hidden_act"] != "quick_gelu" or clip["layer_norm_eps"] != 1e-5:
            return (f"a CLIP encoder with {clip['hidden_act']!r} at eps {clip['layer_norm_eps']} (llama.cpp's "
                    "deepseekocr graph runs quick GELU at eps 1e-5)")
        return None

    def params(self) -> VisionParams:
        clip = self.clip(self.config)
        return self.vision_params(
            embedding_length=clip["hidden_size"], feed_forward_length=clip["intermediate_size"],
            block_count=clip["num_hidden_layers"], head_count=clip["num_attention_heads"],
            layer_norm_eps=clip["layer_norm_eps"], use_gelu=True, extra={})  # use_gelu: SAM's

    def runtime_resamplers(self, model) -> dict:
        """SAM's grid, and CLIP's table as models/deepseekocr.cpp:328-338 resizes it for a tile: rows 0..n-1
        (CLS's row first) taken as the grid, ggml_interpolate run over the (width, rows) plane of the 2-D
        table and the result read back as rows, then the "CLS" row viewed at a byte offset of n (the
        float32 values from n / 4 on) appended, all added to [CLS, patches] in that order."""
        import torch
        import torch.nn.functional as F

        emb = next(m for m in model.modules() if type(m).__name__ == "UnlimitedOcrVisionEmbeddings")
        own = emb.interpolate_pos_encoding

        def as_llama(embeddings, height, width):
            table, side = emb.position_embedding.weight, height // emb.patch_size
            n = table.shape[0] - 1
            if side * side == n:
                return own(embeddings, height, width)
            plane = F.interpolate(table[None, None, :n], size=(side, side), mode="bicubic", align_corners=False)
            rows = plane.reshape(-1).repeat(table.shape[1]).reshape(side * side, table.shape[1])
            return torch.cat([rows, table.reshape(-1)[n // 4:n // 4 + table.shape[1]][None]], 0)[None]

        return {**super().runtime_resamplers(model), emb: as_llama}

    def modify(self, gguf_name, tensor):
        if m := QKV.fullmatch(gguf_name):
            n = tensor.shape[0] // 3
            for i, part in enumerate((T.V_ENC_ATTN_Q, T.V_ENC_ATTN_K, T.V_ENC_ATTN_V)):
                yield f"{gguf.TENSOR_NAMES[part].format(bid=m['bid'])}.{m['kind']}", tensor[i * n:(i + 1) * n]
        else:
            yield gguf_name, tensor
