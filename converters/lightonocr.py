"""LightOnOCR (``LightOnOcrForConditionalGeneration``, ``LightOnOcrModel``, and the hub's first
``LightOnOCRForConditionalGeneration`` spelling) -> projector ``lightonocr``.

The tower is Pixtral's and the projector Mistral 3's (RMSNorm, patch merger, GELU MLP), so this is
``converters/pixtral.py``'s converter with what differs:
- names: ``model.vision_encoder.`` / ``model.vision_projection.`` (``vision_encoder.`` / ``vision_projection.``
  for the bare ``LightOnOcrModel``), mapped onto Pixtral's ``vision_tower.`` / ``multi_modal_projector.``;
- no [IMG_BREAK]: llama.cpp's lightonocr loads no ``v.token_embd.img_break`` (tools/mtmd/clip.cpp:2810) and
  inserts no break rows (models/pixtral.cpp:60), so Pixtral's NaN [IMG_BREAK] deviation does not arise;
- the merger always runs (``spatial_merge_size``) on the last hidden state: no ``vision_feature_layer``;
- a missing key takes the default transformers takes: ``LightOnOcrConfig``'s sub-config defaults when a
  whole sub-config is missing, ``PixtralVisionConfig``'s / ``Qwen3Config``'s when one key of it is;
- llama.cpp resizes every image so its longest edge is ``clip.vision.preproc_image_size`` (else
  ``image_size``), ceil-aligned to patch x merge (clip.cpp:1545-1555, mtmd-image.cpp:868-889); the key is
  written from preprocessor_config.json's ``size.longest_edge``, the edge transformers' processor uses.

Known departures of the runtime, neither of which a file can carry:
- it *upscales* an image smaller than the longest edge (mtmd-image.cpp:135-139: the scale is not capped
  at 1), where transformers' ``PixtralImageProcessor`` only shrinks (image_processing_pixtral.py:79): the
  same small image gives llama.cpp more image tokens.  Images at the longest edge are not resized, which
  is what verify compares (the whole image: there is no tiling);
- the merger's RMSNorm takes the vision eps (models/pixtral.cpp:32), transformers' the text model's
  ``rms_norm_eps`` (1e-6 for Qwen3): one file key serves both; 1e-5 for 1e-6 moves the fixture's cosine by 2e-12.
"""
from __future__ import annotations

import gguf

from ggraft.errors import InputError
from ggraft.hf.config_values import SIDE_MAX
from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention, RuntimeDefect
from ._image_norms import CLIP_MEAN, CLIP_STD
from .pixtral import NORM_EPS, Pixtral
from .qwen2vl import Qwen2VL

#: LightOnOcrConfig's sub-configs when config.json has none (configuration_lighton_ocr.py)
LIGHTONOCR_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=1540, patch_size=14, hidden_act="silu")
LIGHTONOCR_TEXT = dict(hidden_size=1024)
#: PixtralVisionConfig's / Qwen3Config's defaults for a key missing from a sub-config that is there
PIXTRAL_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=1024, patch_size=16, hidden_act="gelu")
QWEN3_TEXT = dict(hidden_size=4096)


@register
class LightOnOcr(Pixtral):
    architectures = ("LightOnOcrForConditionalGeneration", "LightOnOCRForConditionalGeneration", "LightOnOcrModel")
    reference_classes = {"LightOnOCRForConditionalGeneration": "LightOnOcrForConditionalGeneration"}
    projector_type = gguf.VisionProjectorType.LIGHTONOCR
    family = "LightOnOCR"
    #: mtmd wraps each image in <|im_start|> ... <|im_end|> (tools/mtmd/mtmd.cpp:823-828); the processor
    #: puts <|image_pad|> in the text (replace_image_token)
    image_tokens = ("<|im_start|>", "<|image_pad|>", "<|im_end|>")
    convention = Convention(Qwen2VL.convention.family, Qwen2VL.convention.tokens)  # Qwen's tokenizer
    runtime_defects = (RuntimeDefect(
        "lightonocr", "llama.cpp resizes every image to the longest edge, upscaling smaller ones that transformers' "
        "processor keeps at their size (more image tokens, other embeddings)",
        "tools/mtmd/mtmd-image.cpp:135, the longest-edge scale is not capped at 1", seen_up_to="0.3.36"),)
    text_rows = {}
    layout_aliases = (
        ("model.vision_encoder.", "vision_tower."), ("model.vision_projection.", "multi_modal_projector."),
        ("vision_encoder.", "vision_tower."), ("vision_projection.", "multi_modal_projector."),  # LightOnOcrModel
    )

    def __init__(self, ckpt, recipient=None):
        super().__init__(ckpt, recipient)
        self.merges = True
        self.vision_config = {**(PIXTRAL_VISION if "vision_config" in self.config else LIGHTONOCR_VISION),
                              **self.vision_config}
        self.text_config = {**(QWEN3_TEXT if "text_config" in self.config else LIGHTONOCR_TEXT), **self.text_config}

    @classmethod
    def refuses(cls, config):
        v = (config["vision_config"] if "vision_config" in config else LIGHTONOCR_VISION) or {}
        if v.get("model_type", "pixtral") != "pixtral":
            return f"vision tower {v['model_type']!r} is not Pixtral"
        theta = (v.get("rope_parameters") or {}).get("rope_theta", v.get("rope_theta", 10000.0))
        if float(theta) != 10000.0:
            return f"vision rope_theta {theta}: llama.cpp's lightonocr graph fixes it at 10000"
        if v.get("hidden_act", "gelu") not in ("gelu", "silu"):
            return f"vision hidden_act {v['hidden_act']!r} has no llama.cpp equivalent"
        merge = config.get("spatial_merge_size", 2)
        if not isinstance(merge, int) or isinstance(merge, bool) or merge < 1:
            return f"spatial_merge_size {merge!r}: llama.cpp merges a whole number of patches"
        return None

    @property
    def longest_edge(self) -> int:
        """The edge transformers' processor resizes to (preprocessor_config.json), else the tower's size."""
        size = self.ckpt.preprocessor_config.get("size")
        edge = size.get("longest_edge") if isinstance(size, dict) else None
        if isinstance(edge, int) and edge > SIDE_MAX:
            raise InputError(f"preprocessor_config.json: size.longest_edge {edge} is not an image side (at most {SIDE_MAX})")
        return int(edge) if isinstance(edge, int) and edge > 0 else int(self.vision_config["image_size"])

    def params(self) -> VisionParams:
        v = self.vision_config
        mean, std = preprocessing(self.ckpt, CLIP_MEAN, CLIP_STD)  # PixtralImageProcessor's defaults
        return VisionParams(
            image_size=v["image_size"], patch_size=v["patch_size"], embedding_length=v["hidden_size"],
            feed_forward_length=v["intermediate_size"], block_count=v["num_hidden_layers"],
            head_count=v["num_attention_heads"], layer_norm_eps=NORM_EPS,
            projection_dim=self.text_config["hidden_size"], image_mean=mean, image_std=std,
            use_gelu=v["hidden_act"] == "gelu", use_silu=v["hidden_act"] == "silu",
            extra={gguf.Keys.ClipVision.SPATIAL_MERGE_SIZE: self.merge,
                   gguf.Keys.ClipVision.PREPROC_IMAGE_SIZE: self.longest_edge},
        )

    def test_image_size(self):
        """Longest edge (ceil-aligned as llama.cpp aligns it) by about 3/4 of it: the runtime leaves it as is."""
        side = self.params().patch_size * self.merge
        width = -(-self.longest_edge // side) * side
        return max(side, width * 3 // 4 // side * side), width

    # Pixtral's model_inputs (pixel_values, image_sizes); no vision_feature_layer, no [IMG_BREAK] rows to take out
    reference_features, llama_rows = Converter.reference_features, Converter.llama_rows
