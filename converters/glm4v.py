"""GLM-4.1V, GLM-4.5V, GLM-4.6V and GLM-OCR -> projector ``glm4v``.

GLM-4.1V (``Glm4vForConditionalGeneration``), GLM-4.5V (``Glm4vMoe...``) and GLM-4.6V
(``Glm46V...``) share one vision tower under the same names (the MoE variants differ in the
language model only); GLM-OCR's tower is that one without position embeddings and post-conv
norm, with per-head q/k RMS norms, biased attention output and MLP, and an MLP of its own
``intermediate_size`` (GLM-4V's blocks use ``out_hidden_size``).  What is special here:
- the Conv3d patch embedding is split into one Conv2d kernel per frame (as for Qwen2-VL); the
  fused ``attn.qkv`` stays fused (llama.cpp's build_vit views q, k and v out of it).
- learned positions on a square grid, resampled bicubically to the image's grid by both sides
  (``clip.vision.image_size`` is the grid's side in pixels, the config's ``image_size``).
- after ``post_layernorm`` a 2x2 Conv2d ``downsample`` (``mm.patch_merger``), then the merger:
  ``proj`` (``mm.model.fc``), LayerNorm (eps 1e-5 in both) + exact GELU, and a gated MLP
  (``mm.gate``/``mm.up``/``mm.down``) with the tower's activation.  Every name is gguf-py's.
- norms are RMS with the vision config's ``rms_norm_eps`` (llama.cpp's converter writes the same).
- llama.cpp's graph fixes the 2x2 merge, two frames, the vision rope base at 10000 and splits
  each head in four rope sections; anything else is refused.
Saved layouts: ``model.visual.*`` (transformers' save_pretrained and the released checkpoints)
and ``visual.*`` (the names llama.cpp's converter reduces them to).  Both, the per-frame split and
transformers' patch order (by 2x2 merge unit) are Qwen2-VL's, whose converter this one extends.
The runtime matches transformers (no known deviation); llama.cpp's own converter agrees except that
it does not register ``Glm46VForConditionalGeneration``.
"""
from __future__ import annotations

import gguf

from ggraft.mmproj.converter import VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention
from ._image_norms import ACTIVATIONS, CLIP_MEAN, CLIP_STD
from .qwen2vl import LLAMA_MERGE, LLAMA_ROPE_THETA, PATCH, Qwen2VL

#: what llama.cpp's graph computes for the vision hidden_act (clip.cpp: use_gelu / use_silu)
#: transformers' Glm4vVisionConfig defaults (Glm4vMoeVisionConfig's are the same)
DEFAULTS = dict(depth=24, hidden_size=1536, hidden_act="silu", num_heads=12, in_channels=3, image_size=336,
                patch_size=14, rms_norm_eps=1e-5, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
                intermediate_size=13696)
#: HF config names transformers maps onto the vision config's own (its attribute_map)
ALIASES = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth"}


@register
class Glm4V(Qwen2VL):
    architectures = ("Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration",
                     "Glm46VForConditionalGeneration")
    projector_type = gguf.VisionProjectorType.GLM4V
    family = "GLM-4V"
    image_tokens = ("<|begin_of_image|>", "<|image|>", "<|end_of_image|>")
    convention = Convention("GLM-4V", ("<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>",
                                       "<|end_of_video|>", "<|video|>"), projectors=("glm5v",))
    defaults = DEFAULTS

    @classmethod
    def vision(cls, config: dict) -> dict:
        """The vision config with transformers' defaults for the keys it leaves out."""
        v = {ALIASES.get(k, k): val for k, val in (config.get("vision_config") or {}).items()}
        return {**cls.defaults, **v}

    @classmethod
    def refuses(cls, config):
        v = cls.vision(config)
        theta = (v.get("rope_parameters") or {}).get("rope_theta", LLAMA_ROPE_THETA)
        if v["temporal_patch_size"] != 2 or v["in_channels"] != 3:
            return "llama.cpp's glm4v graph needs temporal_patch_size 2 and 3 input channels"
        if v["spatial_merge_size"] != LLAMA_MERGE:
            return f"llama.cpp's glm4v graph merges {LLAMA_MERGE}x{LLAMA_MERGE} patches only"
        if v["hidden_act"] not in ACTIVATIONS:
            return f"vision activation {v['hidden_act']!r} has no llama.cpp equivalent"
        if float(theta) != LLAMA_ROPE_THETA:
            return f"vision rope_theta {theta} (llama.cpp's glm4v graph uses {LLAMA_ROPE_THETA:g})"
        if (v["hidden_size"] // v["num_heads"]) % 4:
            return f"vision head size {v['hidden_size'] // v['num_heads']}: llama.cpp's 2D rope needs a multiple of 4"
        return None

    def block_ffn(self, v: dict) -> int:
        """The vision blocks' MLP width: GLM-4V's Glm4VisionMlp is out_hidden_size wide."""
        return v["out_hidden_size"]

    def params(self) -> VisionParams:
        v = self.vision(self.config)
        mean, std = preprocessing(self.ckpt, CLIP_MEAN, CLIP_STD)  # Glm4vImageProcessor's defaults
        return VisionParams(
            image_size=v["image_size"], patch_size=v["patch_size"], embedding_length=v["hidden_size"],
            feed_forward_length=self.block_ffn(v), block_count=v["depth"], head_count=v["num_heads"],
            layer_norm_eps=v["rms_norm_eps"], projection_dim=v["out_hidden_size"], image_mean=mean, image_std=std,
            **ACTIVATIONS[v["hidden_act"]], extra={gguf.Keys.ClipVision.SPATIAL_MERGE_SIZE: LLAMA_MERGE},
        )

    def modify(self, gguf_name, tensor):
        if gguf_name == PATCH:  # one Conv2d kernel per frame; q, k and v stay fused
            yield from super().modify(gguf_name, tensor)
        else:
            yield gguf_name, tensor


@register
class GlmOcr(Glm4V):
    """GLM-OCR's tower: no learned positions or post-conv norm, q/k norms per head, biased MLP."""

    architectures = ("GlmOcrForConditionalGeneration",)
    family = "GLM-OCR"
    #: transformers' GlmOcrVisionConfig defaults
    defaults = {**DEFAULTS, "hidden_size": 1024, "num_heads": 16, "out_hidden_size": 1536, "intermediate_size": 4096}

    def block_ffn(self, v):
        return v["intermediate_size"]
