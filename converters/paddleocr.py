"""PaddleOCR-VL (SigLIP-style tower with 2D rope, ``mlp_AR`` projector) -> projector ``paddleocr``.

Saved layouts, all writing the same file: the hub's (``visual.vision_model.*``, ``mlp_AR.*``, text
keys at the top of config.json; ``packing_position_embedding`` and the pooling ``head``, which
nobody runs, are left out), transformers' ``save_pretrained`` (the same names, its own config) and
the module names (``model.visual.*``, ``model.projector.*``).  llama.cpp's converter takes the hub's
only: it picks its class by ``vision_config.architectures`` (conversion/base.py:2902) and reads
``min_pixels``/``max_pixels`` (conversion/ernie.py:176), which only the hub's files have.

What is special here:
- the learned position table (``image_size / patch_size`` per side, ``clip.vision.image_size`` in
  pixels) is resampled to each image's patch grid; 2D rope on top.  Min/max pixels come from the
  preprocessor (``min_pixels``/``max_pixels``, else transformers' ``size``).
- the projector is LayerNorm (eps 1e-5 on both sides), a 2x2 merge, Linear, GELU, Linear:
  ``mm.input_norm``, ``mm.1``, ``mm.2`` (named here: TensorNameMap's ``mlp_AR.linear_{bid}`` row
  only reaches bid < the vision block count).
- llama.cpp's graph fixes the merge at 2x2 and the rope base at 10000 and runs the tower's
  activation in the projector too (transformers: exact GELU); other configs are refused.

llama.cpp's runtime (llama-cpp-python 0.3.36 included) departs from transformers in one way no
file can compensate: it resamples the position table with antialiased bilinear interpolation
(``tools/mtmd/models/paddleocr.cpp:20`` calls ``resize_position_embeddings()`` with its default,
``tools/mtmd/clip-graph.h:12``: ``BILINEAR | ANTIALIAS``) where transformers'
``PaddleOCRVisionEmbeddings`` resamples plain bilinear (``align_corners=False``).  They agree where
the grid has at least the table's size on both sides (antialiasing only widens the filter when
shrinking), not on a side with fewer patches.  At the table's own size llama.cpp uses the stored rows
as they are (``clip.cpp:321``), so storing other rows would break that size to mend smaller ones.
``runtime_reference`` runs transformers with the antialiased table (``F.interpolate(...,
antialias=True)``, the filter ggml implements).
"""
from __future__ import annotations

import gguf

from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention, RuntimeDefect
from ._image_norms import CLIP_MEAN, CLIP_STD, GELU_ACTS

TOWER, PROJECTOR = "model.vision_model.", "mlp_AR."  # TensorNameMap's names (hub layout, visual. -> model.)
T, K = gguf.MODEL_TENSOR, gguf.Keys.ClipVision
LLAMA_MERGE = 2  # clip.cpp load_hparams: hparams.n_merge = 2 for paddleocr, whatever the config says
LLAMA_ROPE_THETA = 10000.0  # models/paddleocr.cpp: ggml_rope_multi(..., 10000, ...)
PROJECTOR_NAMES = {f"{PROJECTOR}linear_{i}.{kind}": f"{gguf.TENSOR_NAMES[T.V_MMPROJ].format(bid=i)}.{kind}"
                   for i in (1, 2) for kind in ("weight", "bias")}
UNUSED = (TOWER + "embeddings.packing_position_embedding.", TOWER + "head.")  # hub extras nobody runs
MIN_PIXELS, MAX_PIXELS = 384 * 384, 1536 * 1536  # PaddleOCRVLImageProcessor's defaults
#: transformers' PaddleOCRVisionConfig defaults
DEFAULTS = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                spatial_merge_size=2)


@register
class PaddleOCR(Converter):
    architectures = ("PaddleOCRVLForConditionalGeneration",)
    projector_type = gguf.VisionProjectorType.PADDLEOCR
    family = "PaddleOCR-VL"
    image_tokens = ("<|IMAGE_START|>", "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_END|>")
    convention = Convention("PaddleOCR-VL", ("<|IMAGE_START|>", "<|IMAGE_END|>", "<|IMAGE_PLACEHOLDER|>"))
    runtime_defects = (RuntimeDefect(
        "paddleocr", "llama.cpp resamples the position table with antialiased bilinear interpolation where "
        "transformers uses plain bilinear: images with fewer patches than the table on a side get other "
        "position embeddings", "tools/mtmd/models/paddleocr.cpp:20, resize_position_embeddings() with "
        "clip-graph.h:12 DEFAULT_INTERPOLATION_MODE", seen_up_to="0.3.36"),)
    vision_prefixes = (TOWER, PROJECTOR)
    layout_aliases = (
        ("visual.vision_model.", TOWER),  # the hub's and save_pretrained's
        ("model.visual.vision_model.", TOWER),  # module names
        ("model.projector.", PROJECTOR),
    )

    @classmethod
    def vision(cls, config) -> dict:
        return {**DEFAULTS, **(config.get("vision_config") or {})}

    @classmethod
    def refuses(cls, config):
        v = cls.vision(config)
        theta = (v.get("rope_parameters") or {}).get("rope_theta", v.get("rope_theta", LLAMA_ROPE_THETA))
        if v["spatial_merge_size"] != LLAMA_MERGE:
            return f"spatial_merge_size {v['spatial_merge_size']}: llama.cpp's paddleocr graph merges 2x2 patches only"
        if float(theta) != LLAMA_ROPE_THETA:
            return f"vision rope_theta {theta}: llama.cpp's paddleocr graph fixes it at {LLAMA_ROPE_THETA:g}"
        if v["hidden_act"] not in GELU_ACTS:
            return (f"vision activation {v['hidden_act']!r}: llama.cpp's paddleocr graph runs it in the projector "
                    "too, where transformers runs GELU")
        if (v["hidden_size"] // v["num_attention_heads"]) % 4:
            return f"vision head size {v['hidden_size'] // v['num_attention_heads']}: the 2D rope needs a multiple of 4"
        return None

    def pixel_limits(self) -> tuple[int, int]:
        """(min, max) pixels of the image processor, as transformers' PaddleOCRVLImageProcessor reads them."""
        pre = self.ckpt.preprocessor_config
        size = pre.get("size") or {}
        return (int(pre.get("min_pixels", size.get("shortest_edge", MIN_PIXELS))),
                int(pre.get("max_pixels", size.get("longest_edge", MAX_PIXELS))))

    def params(self) -> VisionParams:
        v = self.vision(self.config)
        text = self.text_config or self.config  # the hub keeps the text model's keys at the top
        mean, std = preprocessing(self.ckpt, CLIP_MEAN, CLIP_STD)
        low, high = self.pixel_limits()
        return VisionParams(
            image_size=v["image_size"] // v["patch_size"] * v["patch_size"], patch_size=v["patch_size"],
            embedding_length=v["hidden_size"], feed_forward_length=v["intermediate_size"],
            block_count=v["num_hidden_layers"], head_count=v["num_attention_heads"],
            layer_norm_eps=v["layer_norm_eps"], projection_dim=text.get("hidden_size", 1024),
            image_mean=mean, image_std=std, use_gelu=True,
            extra={K.IMAGE_MIN_PIXELS: low, K.IMAGE_MAX_PIXELS: high},
        )

    def skip(self, canonical):
        return canonical.startswith(UNUSED)

    def rename(self, canonical):
        return PROJECTOR_NAMES.get(canonical) or super().rename(canonical)

    def test_image_size(self):
        """The position table's size (to whole 2x2 merges), grown or shrunk until neither side resizes it."""
        p = self.params()
        unit, (low, high) = LLAMA_MERGE * p.patch_size, self.pixel_limits()
        side = max(unit, p.image_size // unit * unit)
        while side * side < low:
            side += unit
        while side * side > high and side > unit:
            side -= unit
        return side, side

    def patches(self, pixel_values):
        """transformers' processor layout of one image: (patches, 3, p, p) in raster order, and its grid."""
        import torch

        p = self.params().patch_size
        gh, gw = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        x = pixel_values[0].reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, p, p)
        return x.contiguous(), torch.tensor([[1, gh, gw]])

    def model_inputs(self, pixel_values):
        flat, grid_thw = self.patches(pixel_values)
        return {"pixel_values": flat, "image_grid_thw": grid_thw}

    def runtime_reference(self, model, pixel_values):
        """transformers with the position table resampled the way llama.cpp does (antialiased
        bilinear), passed in as precomputed interpolation weights; None where the two agree."""
        import torch
        import torch.nn.functional as F

        flat, grid_thw = self.patches(pixel_values)
        n = self.params().image_size // self.params().patch_size
        gh, gw = int(grid_thw[0, 1]), int(grid_thw[0, 2])
        if gh >= n and gw >= n:
            return None

        def resample(size: int):  # (size, n): row i holds output i's weights over the table's rows
            eye = torch.eye(n)[None, None]  # the identity resampled along its rows only
            return F.interpolate(eye, size=(size, n), mode="bilinear", align_corners=False, antialias=True)[0, 0]

        weights = (resample(gh)[:, None, :, None] * resample(gw)[None, :, None, :]).reshape(gh * gw, n * n)
        indices = torch.arange(n * n).expand(gh * gw, -1)
        return model.get_image_features(pixel_values=flat, image_grid_thw=grid_thw,
                                        interp_indices=indices, interp_weights=weights)
