"""LLaVA-NeXT and LLaVA-OneVision (CLIP or SigLIP tower, anyres tiling) -> projector ``mlp``.

The tower and projector are LLaVA-1.5's (``converters/llava.py``: feature layers, ``mm.0``/``mm.2``,
no post-norm); what is special here:
- ``image_grid_pinpoints`` (HF: ``[height, width]`` pairs) become ``clip.vision.image_grid_pinpoints``
  flattened as ``width, height`` (clip.cpp:1363 reads each pair as a ``clip_image_size{w, h}``), in
  the config's order (ties between candidates go to the first, as in transformers).  A pinpoint that
  is not a multiple of the tower's image size is refused: llama.cpp cuts a partial tile the grid
  does not count and aborts (``GGML_ASSERT`` at mtmd.cpp:1440; its llava graph takes square tiles only).
- ``image_newline`` is written as ``v.image_newline`` (clip.cpp:2388 loads it) and the merge type
  as ``spatial_unpad``, transformers' only one.
- a SigLIP tower (OneVision) has no CLS: strategy ``full`` is what llama.cpp runs without a class
  embedding (clip.cpp:5202); ``default`` on SigLIP would drop a real patch and is refused, as is
  ``full`` on CLIP.  SigLIP's pooling ``head`` is left out.
- ``multimodal_projector_bias: false``: llama.cpp adds ``mm.0``/``mm.2`` biases unconditionally
  (models/llava.cpp:167), so zero biases are written.

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
import numpy as np

from ggraft.mmproj.converter import VisionParams, in_memory, preprocessing, register
from ggraft.mmproj.facts import RuntimeDefect
from ggraft.errors import UnsupportedModelError
from ._image_norms import CLIP_MEAN, CLIP_STD, GELU_ACTS
from .llava import FEATURE_LAYER_KEY, LlavaClip

PINPOINTS_KEY = "clip.vision.image_grid_pinpoints"  # clip-impl.h KEY_IMAGE_GRID_PINPOINTS; not in gguf-py 0.19
MERGE_TYPE_KEY = "clip.vision.mm_patch_merge_type"  # clip-impl.h KEY_MM_PATCH_MERGE_TYPE
NEWLINE = "model.image_newline"  # TensorNameMap's name for v.image_newline
#: transformers' vision config class defaults, by model_type (a vision_config that omits a key)
TOWERS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
STRATEGY = {"clip_vision_model": "default", "siglip_vision_model": "full"}  # what llama.cpp's graph runs
ACTIVATIONS = {**{act: {"use_gelu": True} for act in GELU_ACTS}, "silu": {"use_silu": True}, "quick_gelu": {}}
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
    #: the config class's defaults (LlavaNextConfig) and its vision_config when there is none
    defaults = dict(vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                    multimodal_projector_bias=True,
                    image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    default_tower = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                         num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14)

    @classmethod
    def settings(cls, config) -> tuple[dict, dict]:
        """(top-level settings, vision settings), each missing key at transformers' default."""
        top = {k: config.get(k, d) for k, d in cls.defaults.items()}
        given = config.get("vision_config") or {}
        kind = given.get("model_type", cls.default_tower["model_type"])
        base = {**TOWERS.get(kind, {}), **({} if given else cls.default_tower), "model_type": kind}
        return top, {k: given.get(k, d) for k, d in base.items()}

    @classmethod
    def refuses(cls, config):
        top, v = cls.settings(config)
        kind, size = v["model_type"], v.get("image_size")
        pins = top["image_grid_pinpoints"]
        if kind not in TOWERS:
            return f"vision tower {kind!r} is neither CLIP nor SigLIP (llama.cpp's llava graph runs those)"
        if top["vision_feature_select_strategy"] != STRATEGY[kind]:
            return (f"vision_feature_select_strategy {top['vision_feature_select_strategy']!r} on a {kind} tower: "
                    f"llama.cpp keeps exactly the patches ({STRATEGY[kind]!r})")
        if v["hidden_act"] not in ACTIVATIONS:
            return f"vision activation {v['hidden_act']!r} has no llama.cpp equivalent"
        if top["projector_hidden_act"] not in GELU_ACTS:
            return f"projector_hidden_act {top['projector_hidden_act']!r}: llama.cpp's mlp projector applies GELU"
        if not isinstance(pins, list) or not pins or not all(
                isinstance(p, list) and len(p) == 2 and all(type(x) is int and x > 0 for x in p) for p in pins):
            return "image_grid_pinpoints must be a non-empty list of [height, width] pairs of positive integers"
        if odd := [p for p in pins if p[0] % size or p[1] % size]:
            return (f"image_grid_pinpoints {odd[0]} is not a multiple of the tower's image_size {size}: llama.cpp "
                    "aborts on the partial tiles it would cut")
        return None

    def feature_layers(self) -> list[int]:
        top, v = self.settings(self.config)
        n, chosen = v["num_hidden_layers"], top["vision_feature_layer"]
        chosen = chosen if isinstance(chosen, list) else [chosen]
        absolute = [k if k >= 0 else n + 1 + k for k in chosen]
        if absolute != sorted(absolute) or not all(0 < k <= n for k in absolute):
            raise UnsupportedModelError(f"vision_feature_layer {chosen} cannot be expressed for llama.cpp")
        return absolute

    def params(self) -> VisionParams:
        top, v = self.settings(self.config)
        n, layers = v["num_hidden_layers"], self.feature_layers()
        established = layers == [n - 1]  # llama.cpp's default: the input of the last block
        mean, std = preprocessing(self.ckpt, CLIP_MEAN, CLIP_STD)  # both image processors' defaults
        extra = {} if established else {FEATURE_LAYER_KEY: layers}
        extra[PINPOINTS_KEY] = [x for h, w in top["image_grid_pinpoints"] for x in (w, h)]
        extra[MERGE_TYPE_KEY] = "spatial_unpad"
        return VisionParams(
            image_size=v["image_size"], patch_size=v["patch_size"], embedding_length=v["hidden_size"],
            feed_forward_length=v["intermediate_size"], block_count=n if established else max(layers),
            head_count=v["num_attention_heads"], layer_norm_eps=v["layer_norm_eps"],
            projection_dim=self.text_config.get("hidden_size", 4096), image_mean=mean, image_std=std,
            **ACTIVATIONS[v["hidden_act"]], extra=extra)

    def skip(self, canonical):
        return canonical.startswith("vision_tower.vision_model.head.") or super().skip(canonical)

    def extra_tensors(self):
        yield from super().extra_tensors()
        if not self.settings(self.config)[0]["multimodal_projector_bias"]:
            zeros = in_memory(np.zeros(self.params().projection_dim, np.float32))
            for i in (0, 2):
                yield f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ].format(bid=i)}.bias", zeros

    @property
    def runtime_note(self):
        return "; ".join(f"{d.summary} ({d.reference})" for d in LlavaClip.runtime_defects)

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

    def runtime_reference(self, model, pixel_values):
        """The CLS defect (llava.py) exists only with a class embedding (CLIP)."""
        if self.settings(self.config)[1]["model_type"] != "clip_vision_model":
            return None
        return super().runtime_reference(model, pixel_values)


@register
class LlavaOnevision(LlavaNext):
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    family = "LLaVA-OneVision"
    defaults = dict(LlavaNext.defaults, vision_feature_layer=-1, vision_feature_select_strategy="full",
                    image_grid_pinpoints=[[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)])
    default_tower = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                         num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14)
