"""Idefics3 and SmolVLM (SigLIP-style vision tower, pixel shuffle, linear connector)
-> projector ``idefics3``.

What is special here:
- the connector pixel-shuffles ``scale_factor x scale_factor`` patches into one token and
  applies one linear map (``mm.model.fc``); ``scale_factor`` is written as
  ``clip.vision.projector.scale_factor``.
- images are tiled: llama.cpp (like transformers' Idefics3/SmolVLM image processors) resizes
  the longer side to the preprocessor's ``size.longest_edge``, rounds both sides up to tiles
  of ``image_size`` and sends each tile, then a downscaled overview.  ``longest_edge`` is
  written as ``clip.vision.preproc_image_size``; with ``do_image_splitting`` off the tile size
  is written instead, so an image is not split.
- SmolVLM2's config.json omits some vision keys; they take transformers' defaults.

Layouts: transformers 4.x (the hub's Idefics3/SmolVLM checkpoints) and 5.x both save
``model.vision_model.*`` / ``model.connector.*``, which are TensorNameMap's names.

Verification: llama.cpp's idefics3 template puts the tiles first and the overview last, so
its first image chunk is the top-left tile.  An image of ``longest_edge`` square (a multiple
of ``image_size`` in every released model) passes both resizes unchanged (a same-size resize
is a copy), so that tile is exactly the image's top-left ``image_size`` square, which is what
transformers is given.  (No image reaches the overview unresized unless ``longest_edge`` equals
``image_size``.)
"""
from __future__ import annotations

import gguf

from ggraft.errors import InputError, UnsupportedModelError
from ggraft.hf.config_values import SIDE_MAX
from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention

from ._image_norms import GELU_ACTS, SIGLIP_MEAN, SIGLIP_STD

TOWER = "model.vision_model."
CONNECTOR = "model.connector."


@register
class Idefics3(Converter):
    architectures = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    projector_type = gguf.VisionProjectorType.IDEFICS3
    family = "Idefics3 / SmolVLM"
    image_tokens = ("<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<image>")
    convention = Convention("Idefics3 / SmolVLM", ("<fake_token_around_image>", "<global-img>", "<image>"),
                            (r"<row_\d+_col_\d+>",))
    vision_prefixes = (TOWER, CONNECTOR)

    @classmethod
    def refuses(cls, config):
        act = (config.get("vision_config") or {}).get("hidden_act", "gelu_pytorch_tanh")
        if act not in GELU_ACTS:
            return f"vision activation {act!r} has no llama.cpp equivalent"
        return None

    @property
    def tile_size(self) -> int:
        return self.vision_config.get("image_size", 224)

    def longest_edge(self) -> int:
        """The side llama.cpp resizes an image's longer edge to before tiling."""
        pre = self.ckpt.preprocessor_config
        if not pre.get("do_image_splitting", True):
            return self.tile_size
        side = int((pre.get("size") or {}).get("longest_edge", self.tile_size))
        if side > SIDE_MAX:
            raise InputError(f"preprocessor_config.json: size.longest_edge {side} is not an image side (at most {SIDE_MAX})")
        return side

    def scale_factor(self) -> int:
        scale = self.config.get("scale_factor", 2)
        per_side = self.tile_size // self.vision_config.get("patch_size", 32)
        if scale < 2 or per_side % scale:
            raise UnsupportedModelError(
                f"{self.ckpt.path}: scale_factor={scale} cannot pixel-shuffle a {per_side}x{per_side} patch grid")
        return scale

    def params(self) -> VisionParams:
        v = self.vision_config  # missing keys take Idefics3VisionConfig's defaults, as transformers does
        mean, std = preprocessing(self.ckpt, SIGLIP_MEAN, SIGLIP_STD)
        fc = CONNECTOR + "modality_projection.proj.weight"
        out_dim = self.text_config.get("hidden_size") or (self.ckpt.shape(fc)[0] if self.ckpt.has(fc) else 4096)
        return VisionParams(
            image_size=self.tile_size, patch_size=v.get("patch_size", 32),
            embedding_length=v.get("hidden_size", 1152), feed_forward_length=v.get("intermediate_size", 3072),
            block_count=v.get("num_hidden_layers", 12), head_count=v.get("num_attention_heads", 16),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6), projection_dim=out_dim,
            image_mean=mean, image_std=std, use_gelu=True,
            extra={gguf.Keys.ClipVision.Projector.SCALE_FACTOR: self.scale_factor(),
                   gguf.Keys.ClipVision.PREPROC_IMAGE_SIZE: self.longest_edge()},
        )

    def test_image_size(self):
        side = self.longest_edge()
        return side, side

    def model_inputs(self, pixel_values):
        tile = pixel_values[..., : self.tile_size, : self.tile_size]  # llama.cpp's first chunk
        return {"pixel_values": tile[:, None]}  # (batch, images, 3, H, W)
