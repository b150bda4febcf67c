"""LFM2-VL (SigLIP2 NaFlex vision tower + pixel-unshuffle projector) -> projector ``lfm2``.

What is special here:
- SigLIP2 embeds patches with a Linear over (row, column, channel) pixels; llama.cpp runs a
  Conv2d, so the weight becomes (out, channel, row, column) at the checkpoint's patch size.
- the position embedding is a square grid that both sides resize (bilinear, antialiased) to
  the image's patch grid; ``image_size`` is that grid's native size.
- transformers feeds the projector the last hidden state after ``post_layernorm`` (it does not
  read ``vision_feature_layer``), so every block and the post norm are written; the pooling
  head is unused and left out.
- the projector is pixel-unshuffle by ``downsample_factor`` (``clip.vision.projector.scale_factor``),
  an optional LayerNorm (``mm.input_norm``), ``linear_1`` (``mm.1``), GELU, ``linear_2`` (``mm.2``).
Layouts: ``model.vision_tower.*`` (transformers 5) and ``model.vision_tower.vision_model.*``
(transformers 4.x, the hub), both onto TensorNameMap's ``vision_tower.vision_model.*``.
"""
from __future__ import annotations

import math

import gguf

from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention
from ggraft.errors import UnsupportedModelError

from ._image_norms import SIGLIP_MEAN, SIGLIP_STD

PATCH = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH] + ".weight"
HEAD = "vision_tower.vision_model.head."
OUTPUT_LAYER = "multi_modal_projector.linear_2.weight"
ACTIVATIONS = {"gelu_pytorch_tanh": {"use_gelu": True}, "quick_gelu": {}}  # what llama.cpp computes
PROJECTOR_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh")  # llama.cpp's lfm2 projector runs GELU


@register
class Lfm2Vl(Converter):
    architectures = ("Lfm2VlForConditionalGeneration",)
    projector_type = gguf.VisionProjectorType.LFM2
    family = "LFM2-VL"
    image_tokens = ("<|image_start|>", "<image>", "<|image_end|>", "<|img_thumbnail|>")
    convention = Convention("LFM2-VL", ("<|image_start|>", "<|image_end|>", "<image>", "<|img_thumbnail|>"),
                            (r"<\|img_row_\d+_col_\d+\|>",))
    layout_aliases = (
        ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
        ("model.vision_tower.", "vision_tower.vision_model."),  # transformers 5 drops `vision_model.`
        ("vision_tower.vision_model.", "vision_tower.vision_model."),
        ("vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    )

    @classmethod
    def refuses(cls, config):
        v = config.get("vision_config") or {}
        act = v.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ACTIVATIONS:
            return f"vision activation {act!r} has no llama.cpp equivalent"
        if config.get("projector_hidden_act", "gelu") not in PROJECTOR_ACTIVATIONS:
            return f"projector activation {config.get('projector_hidden_act')!r} (llama.cpp's lfm2 projector runs GELU)"
        if not config.get("projector_bias", True):
            return "projector_bias false: llama.cpp's lfm2 projector needs mm.1.bias and mm.2.bias"
        if math.isqrt(v.get("num_patches", 256)) ** 2 != v.get("num_patches", 256):
            return "num_patches is not a square grid (llama.cpp resizes a square position grid)"
        return None

    def params(self) -> VisionParams:
        v = self.vision_config
        mean, std = preprocessing(self.ckpt, SIGLIP_MEAN, SIGLIP_STD)
        patch = v.get("patch_size", 16)
        return VisionParams(
            image_size=math.isqrt(v.get("num_patches", 256)) * patch, patch_size=patch,
            embedding_length=v.get("hidden_size", 768), feed_forward_length=v.get("intermediate_size", 3072),
            block_count=v.get("num_hidden_layers", 12), head_count=v.get("num_attention_heads", 12),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6),
            projection_dim=self.projection_dim(),
            image_mean=mean, image_std=std, **ACTIVATIONS[v.get("hidden_act", "gelu_pytorch_tanh")],
            extra={gguf.Keys.ClipVision.Projector.SCALE_FACTOR: self.config.get("downsample_factor", 2)},
        )

    def projection_dim(self) -> int:
        """The text model's embedding width: the rows of ``linear_2``."""
        for name in self.ckpt.names():
            if self.canonical(name) == OUTPUT_LAYER:
                return self.ckpt.shape(name)[0]
        raise UnsupportedModelError(f"{self.ckpt.path}: no {OUTPUT_LAYER} (LFM2-VL projector output layer)")

    def skip(self, canonical):
        return canonical.startswith(HEAD)

    def modify(self, gguf_name, tensor):
        if gguf_name == PATCH:  # Linear over (row, column, channel) -> Conv2d (out, channel, row, column)
            p = self.params().patch_size
            tensor = tensor.reshape(tensor.shape[0], p, p, -1).transpose(0, 3, 1, 2)
        yield gguf_name, tensor

    def model_inputs(self, pixel_values):
        """The processor's NaFlex input for one unpadded image: (row, column, channel) patches,
        the patch grid, and a mask of ones."""
        import torch

        p = self.params().patch_size
        _, c, h, w = pixel_values.shape
        patches = pixel_values.reshape(1, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        patches = patches.reshape(1, (h // p) * (w // p), p * p * c)
        return {"pixel_values": patches, "spatial_shapes": torch.tensor([[h // p, w // p]]),
                "pixel_attention_mask": torch.ones(1, patches.shape[1], dtype=torch.int32)}
