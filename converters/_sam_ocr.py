"""What DeepSeek-OCR 2 (``deepseekocr2.py``) and Unlimited-OCR (``unlimited_ocr.py``) share: a SAM tower
feeding a second encoder, then a linear projector (``mm.model.fc``), global view and tiles.

``SamOcr`` (not registered: each family subclasses it):
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
from ggraft.mmproj.converter import Converter, VisionParams, preprocessing
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
