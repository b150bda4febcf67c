"""LLaVA-NeXT and LLaVA-OneVision (CLIP or SigLIP tower, anyres tiling) -> projector ``mlp``.

The tower and projector are LLaVA-1.5's (``converters/llava.py``: CLIP or SigLIP, feature layers,
``mm.0``/``mm.2``, zero biases where the projector has none, no post-norm); what is special here:
- ``image_grid_pinpoints`` (HF: ``[height, width]`` pairs) become ``clip.vision.image_grid_pinpoints``
  flattened as ``width, height`` (clip.cpp:1363 reads each pair as a ``clip_image_size{w, h}``), in
  the config's order (ties between candidates go to the first, as in transformers).  A pinpoint that
  is not a multiple of the tower's image size is refused: llama.cpp cuts a partial tile the grid
  does not count and aborts (``GGML_ASSERT`` at mtmd.cpp:1440; its llava graph takes square tiles only).
- ``image_newline`` is written as ``v.image_newline`` (clip.cpp:2388 loads it) and the merge type
  as ``spatial_unpad``, transformers' only one.

Runtime (llama-cpp-python 0.3.36): the CLIP tower has LLaVA-1.5's CLS defect (llava.py).  And
mtmd cuts anyres images into tiles it encodes as separate images (mtmd.cpp:1408-1478): tiles
first, the overview last (``ov_img_first`` false, mtmd.cpp:517), no spatial unpadding, no
``image_newline`` rows (models/llava.cpp never reads it), and no tiles at all for an image no larger
than the tower (mtmd-image.cpp:520), where transformers always adds them.  Only the base image's
embeddings can match transformers; ``reference_features`` is that base image, the first rows of
what transformers feeds the language model.
"""
from __future__ import annotations

import gguf

from ggraft.mmproj.converter import VisionParams, register
from ggraft.mmproj.facts import RuntimeDefect
from .llava import LlavaClip

PINPOINTS_KEY = "clip.vision.image_grid_pinpoints"  # clip-impl.h KEY_IMAGE_GRID_PINPOINTS; not in gguf-py 0.19
MERGE_TYPE_KEY = "clip.vision.mm_patch_merge_type"  # clip-impl.h KEY_MM_PATCH_MERGE_TYPE
NEWLINE = "model.image_newline"  # TensorNameMap's name for v.image_newline
ANYRES = RuntimeDefect(
    "mlp", "llama.cpp encodes LLaVA-NeXT/OneVision anyres tiles as separate images: no spatial unpadding, no "
    "image_newline rows, the overview after the tiles, and no tiles for images up to the tower's size; only the "
    "base image's embeddings match transformers'", "tools/mtmd/mtmd.cpp:517,1408-1478", seen_up_to="0.3.36",
    with_tensor=gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_IMGNL])


@register
class LlavaNext(LlavaClip):
    architectures = ("LlavaNextForConditionalGeneration",)
    family = "LLaVA-NeXT"
    runtime_defects = (*LlavaClip.runtime_defects, ANYRES)
    vision_prefixes = (*LlavaClip.vision_prefixes, NEWLINE)
    layout_aliases = (("image_newline", NEWLINE), *LlavaClip.layout_aliases)
    defaults = dict(LlavaClip.defaults,  # LlavaNextConfig's
                    image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])

    @classmethod
    def refuses(cls, config):
        if reason := super().refuses(config):
            return reason
        top, v = cls.settings(config)
        pins, size = top["image_grid_pinpoints"], v["image_size"]
        if not isinstance(pins, list) or not pins or not all(
                isinstance(p, list) and len(p) == 2 and all(type(x) is int and x > 0 for x in p) for p in pins):
            return "image_grid_pinpoints must be a non-empty list of [height, width] pairs of positive integers"
        if odd := [p for p in pins if p[0] % size or p[1] % size]:
            return (f"image_grid_pinpoints {odd[0]} is not a multiple of the tower's image_size {size}: llama.cpp "
                    "aborts on the partial tiles it would cut")
        return None

    def params(self) -> VisionParams:
        params = super().params()
        pins = self.settings(self.config)[0]["image_grid_pinpoints"]
        params.extra[PINPOINTS_KEY] = [x for h, w in pins for x in (w, h)]
        params.extra[MERGE_TYPE_KEY] = "spatial_unpad"
        return params

    def model_inputs(self, pixel_values):
        """The processor's anyres layout of the image (base image and tiles, image_sizes): what the
        forward reads (probe); verify compares through ``reference_features``."""
        return self.processor_inputs(pixel_values)

    def reference_features(self, model, pixel_values):
        """transformers' embeddings of the base image: the first rows of ``get_image_features`` for
        an image of the tower's size (its anyres tiles are the same pixels, as the processor makes them)."""
        import torch
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        h, w = pixel_values.shape[-2:]
        cfg = model.config
        tiles = image_size_to_num_patches((h, w), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        out = model.get_image_features(
            pixel_values=pixel_values[:, None].expand(1, tiles, *pixel_values.shape[1:]),
            image_sizes=torch.tensor([[h, w]]), vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return out.pooler_output[0][: (self.params().image_size // self.params().patch_size) ** 2]


@register
class LlavaOnevision(LlavaNext):
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    family = "LLaVA-OneVision"
    defaults = dict(LlavaNext.defaults, vision_feature_layer=-1, vision_feature_select_strategy="full",
                    image_grid_pinpoints=[[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)])
    default_tower = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                         num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14)
