"""Gemma 3 (SigLIP vision tower, average pooling, soft-embedding norm, input projection)
-> projector ``gemma3``.

What is special here:
- the projector pools the ``image_size/patch_size`` patch grid down to ``mm_tokens_per_image``
  tokens with a square average pool; its kernel is written as
  ``clip.vision.projector.scale_factor`` (llama.cpp assumes 4, the released models' value,
  when the key is absent; it is written always so any grid is expressed exactly).
- ``mm_soft_emb_norm`` is a Gemma RMSNorm, which scales by ``1 + weight``; llama.cpp
  multiplies by the stored weight, so 1 is added here.  It uses the vision tower's
  ``layer_norm_eps``, as llama.cpp does.
- ``mm_input_projection_weight`` is a bare parameter (vision x text, applied as ``x @ W``);
  llama.cpp takes exactly that layout (its graph transposes it), so it is stored as saved.
  That in-graph transposed copy corrupts block-quantized data, so the shared dtype policy
  must keep it f16 in a q8_0 file (as llama.cpp's converter does).
- SigLIP's attention-pooling ``head`` is not used by Gemma 3 and is left out.

Layouts: the hub's checkpoints (transformers 4.x) use ``vision_tower.vision_model.*`` and
``multi_modal_projector.*``; transformers 5 ``save_pretrained`` writes ``vision_tower.*``
(no ``vision_model.``), and saves of transformers' in-memory names (made outside
``save_pretrained``, e.g. by converters from other frameworks) put both under ``model.``.

llama.cpp resizes every image to ``image_size`` (bilinear) and a same-size resize is a copy,
so an ``image_size`` square image reaches both sides as the same pixels.
"""
from __future__ import annotations

import math

import gguf

from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention
from ggraft.errors import UnsupportedModelError

from ._image_norms import GELU_ACTS, SIGLIP_MEAN, SIGLIP_STD

TOWER = "vision_tower.vision_model."
PROJECTOR = "multi_modal_projector."


@register
class Gemma3(Converter):
    architectures = ("Gemma3ForConditionalGeneration",)
    projector_type = gguf.VisionProjectorType.GEMMA3
    family = "Gemma 3"
    image_tokens = ("<start_of_image>", "<image_soft_token>", "<end_of_image>")
    convention = Convention("Gemma 3", ("<start_of_image>", "<end_of_image>", "<image_soft_token>"))
    vision_prefixes = (TOWER, PROJECTOR)
    layout_aliases = (
        ("model.vision_tower.vision_model.", TOWER),
        ("model.vision_tower.", TOWER),
        ("vision_tower.vision_model.", TOWER),
        ("vision_tower.", TOWER),  # transformers 5 drops `vision_model.`
        ("model.multi_modal_projector.", PROJECTOR),
    )

    @classmethod
    def refuses(cls, config):
        vision = config.get("vision_config") or {}
        kind = vision.get("model_type", "siglip_vision_model")
        if kind != "siglip_vision_model":
            return f"vision tower {kind!r} is not SigLIP (llama.cpp's gemma3 projector runs SigLIP)"
        act = vision.get("hidden_act", "gelu_pytorch_tanh")
        if act not in GELU_ACTS:
            return f"vision activation {act!r} has no llama.cpp equivalent"
        return None

    def pool_kernel(self) -> int:
        """Side of the average-pool window that turns the patch grid into mm_tokens_per_image."""
        v = self.vision_config
        patches_per_side = v.get("image_size", 224) // v.get("patch_size", 16)
        tokens = self.config.get("mm_tokens_per_image", 256)
        tokens_per_side = math.isqrt(tokens)
        if tokens_per_side ** 2 != tokens or patches_per_side % tokens_per_side:
            raise UnsupportedModelError(
                f"{self.ckpt.path}: mm_tokens_per_image={tokens} does not pool a {patches_per_side}x"
                f"{patches_per_side} patch grid into a square grid")
        return patches_per_side // tokens_per_side

    def params(self) -> VisionParams:
        v = self.vision_config  # missing keys take SiglipVisionConfig's defaults, as transformers does
        mean, std = preprocessing(self.ckpt, SIGLIP_MEAN, SIGLIP_STD)
        return VisionParams(
            image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 16),
            embedding_length=v.get("hidden_size", 768), feed_forward_length=v.get("intermediate_size", 3072),
            block_count=v.get("num_hidden_layers", 12), head_count=v.get("num_attention_heads", 12),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6),
            projection_dim=self.text_config.get("hidden_size", 2304),
            image_mean=mean, image_std=std, use_gelu=True,
            extra={gguf.Keys.ClipVision.Projector.SCALE_FACTOR: self.pool_kernel()},
        )

    def skip(self, canonical):
        return canonical.startswith(TOWER + "head.")  # SigLIP's pooling head: unused by Gemma 3

    def rename(self, canonical):
        # the projection is a bare parameter: `mm_input_projection_weight` is TensorNameMap's
        # `multi_modal_projector.mm_input_projection` + `.weight`
        if canonical == PROJECTOR + "mm_input_projection_weight":
            canonical = PROJECTOR + "mm_input_projection.weight"
        return super().rename(canonical)

    def modify(self, gguf_name, tensor):
        if gguf_name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MM_SOFT_EMB_NORM] + "."):
            tensor = tensor + 1  # Gemma RMSNorm scales by (1 + weight)
        yield gguf_name, tensor
