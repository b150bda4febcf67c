"""Qwen3-VL and Qwen3.5, dense and MoE -> projector ``qwen3vl_merger``.

The four architectures share one vision tower (the MoE variants differ in the language model
only); Qwen3.5's tower is Qwen3-VL's without DeepStack.  What is special here:
- the Conv3d patch embedding is split into one Conv2d kernel per frame (as for Qwen2-VL), and
  it has a bias; ``attn.qkv`` stays fused (llama.cpp's qwen3vl graph views q, k, v out of it).
- learned position embeddings on a square grid (``num_position_embeddings``), which both sides
  resample bilinearly with aligned corners to the image's grid; ``clip.vision.image_size`` is
  that grid's side in pixels, as llama.cpp's converter writes it.
- the merger is ``norm`` per patch (``v.post_ln``) then an MLP over 2x2 patches (``mm.0``, GELU,
  ``mm.2``).  DeepStack: after each block listed in ``deepstack_visual_indexes`` a merger of its
  own (norm over the 2x2 concatenation, fc1, GELU, fc2) makes one more feature per image token;
  llama.cpp names it after the *block* (``v.deepstack.<block>.*``) and appends the features in
  block order to each token's embedding (width ``out_hidden_size * (1 + n_deepstack)``), which
  is how ``reference_features`` lays transformers' separate features out.
- norms use eps 1e-6, fixed in transformers' vision blocks and mergers (llama.cpp's converter
  writes the text model's rms_norm_eps instead, the same number in released checkpoints).
- llama.cpp's graph fixes the vision rope base at 10000 and the merge at 2x2; anything else is
  refused.  The mergers' GELU is exact in transformers and tanh-approximated in llama.cpp.
Saved layouts: ``model.visual.*`` (transformers 4.57+ and 5, the released checkpoints) and
``visual.*`` (the Qwen2-VL-era names some tools still write).
"""
from __future__ import annotations

import math
import re

import gguf

from ggraft.mmproj.converter import VisionParams, preprocessing, register
from ._image_norms import ACTIVATIONS, CLIP_MEAN, CLIP_STD
from .qwen2vl import LLAMA_MERGE, LLAMA_ROPE_THETA, PATCH, VISION_EPS, Qwen2VL

T = gguf.MODEL_TENSOR
DEEPSTACK = re.compile(r"visual\.deepstack_merger_list\.(?P<i>\d+)\.(?P<part>norm|linear_fc1|linear_fc2)"
                       r"\.(?P<kind>weight|bias)")
DEEPSTACK_TENSORS = {"norm": T.V_DS_NORM, "linear_fc1": T.V_DS_FC1, "linear_fc2": T.V_DS_FC2}
MERGER = re.compile(r"visual\.merger\.(?P<part>norm|linear_fc1|linear_fc2)\.(?P<kind>weight|bias)")
MERGER_TENSORS = {"norm": gguf.TENSOR_NAMES[T.V_POST_NORM],
                  "linear_fc1": gguf.TENSOR_NAMES[T.V_MMPROJ].format(bid=0),
                  "linear_fc2": gguf.TENSOR_NAMES[T.V_MMPROJ].format(bid=2)}
#: what llama.cpp's graph computes for transformers' vision hidden_act (clip.cpp: use_gelu / use_silu)
#: transformers' Qwen3VLVisionConfig defaults
DEFAULTS = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                out_hidden_size=3584, num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh")


@register
class Qwen3VL(Qwen2VL):
    architectures = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    projector_type = gguf.VisionProjectorType.QWEN3VL
    family = "Qwen3-VL"
    #: transformers' default deepstack_visual_indexes (Qwen3VLVisionConfig); None: no DeepStack at all
    default_deepstack: tuple[int, ...] | None = (8, 16, 24)

    @classmethod
    def deepstack_indexes(cls, v: dict) -> list[int]:
        """The blocks DeepStack features come from, in the order of the checkpoint's merger list."""
        if cls.default_deepstack is None:
            return []
        return [int(i) for i in v.get("deepstack_visual_indexes", cls.default_deepstack)]

    @classmethod
    def refuses(cls, config):
        v = {**DEFAULTS, **(config.get("vision_config") or {})}
        theta = (v.get("rope_parameters") or {}).get("rope_theta", LLAMA_ROPE_THETA)
        grid = math.isqrt(v["num_position_embeddings"])
        indexes = cls.deepstack_indexes(v)
        if v.get("temporal_patch_size", 2) != 2:
            return "llama.cpp's qwen3vl graph needs temporal_patch_size 2"
        if v.get("spatial_merge_size", 2) != LLAMA_MERGE:
            return f"llama.cpp's qwen3vl graph merges {LLAMA_MERGE}x{LLAMA_MERGE} patches only"
        if v["hidden_act"] not in ACTIVATIONS:
            return f"vision activation {v['hidden_act']!r} has no llama.cpp equivalent"
        if theta != LLAMA_ROPE_THETA:
            return f"vision rope_theta {theta} (llama.cpp's qwen3vl graph uses {LLAMA_ROPE_THETA:g})"
        if grid * grid != v["num_position_embeddings"]:
            return f"num_position_embeddings {v['num_position_embeddings']} is not a square grid"
        if len(set(indexes)) != len(indexes) or any(not 0 <= i < v["depth"] for i in indexes):
            return (f"deepstack_visual_indexes {indexes}: llama.cpp keeps one DeepStack merger per vision block "
                    f"0..{v['depth'] - 1}")
        return None

    def params(self) -> VisionParams:
        v = {**DEFAULTS, **self.vision_config}
        mean, std = preprocessing(self.ckpt, CLIP_MEAN, CLIP_STD)  # Qwen2VLImageProcessor's defaults
        deepstack = set(self.deepstack_indexes(v))
        extra = self.extra()
        if deepstack:
            extra[gguf.Keys.ClipVision.IS_DEEPSTACK_LAYERS] = [i in deepstack for i in range(v["depth"])]
        return VisionParams(
            image_size=math.isqrt(v["num_position_embeddings"]) * v["patch_size"], patch_size=v["patch_size"],
            embedding_length=v["hidden_size"], feed_forward_length=v["intermediate_size"], block_count=v["depth"],
            head_count=v["num_heads"], layer_norm_eps=VISION_EPS, projection_dim=v["out_hidden_size"],
            image_mean=mean, image_std=std, **ACTIVATIONS[v["hidden_act"]], extra=extra,
        )

    def rename(self, canonical):
        if m := MERGER.fullmatch(canonical):
            return f"{MERGER_TENSORS[m['part']]}.{m['kind']}"
        if m := DEEPSTACK.fullmatch(canonical):
            indexes = self.deepstack_indexes({**DEFAULTS, **self.vision_config})
            if int(m["i"]) >= len(indexes):
                return None
            block = indexes[int(m["i"])]  # llama.cpp numbers DeepStack tensors by vision block
            return f"{gguf.TENSOR_NAMES[DEEPSTACK_TENSORS[m['part']]].format(bid=block)}.{m['kind']}"
        return super().rename(canonical)

    def modify(self, gguf_name, tensor):
        if gguf_name == PATCH:  # one Conv2d kernel per frame; q, k and v stay fused
            yield from super().modify(gguf_name, tensor)
        else:
            yield gguf_name, tensor

    def reference_features(self, model, pixel_values):
        """transformers' merger output with each DeepStack feature appended in block order, as
        llama.cpp lays the features out in one embedding per image token."""
        import torch

        out = model.get_image_features(**self.model_inputs(pixel_values))
        deepstack = [torch.cat(f, 0) for f in (getattr(out, "deepstack_features", None) or [])]
        return torch.cat([torch.cat(out.pooler_output, 0), *deepstack], dim=-1)


@register
class Qwen35(Qwen3VL):
    """Qwen3.5's vision tower: Qwen3-VL's without DeepStack (transformers builds no DeepStack
    mergers for it, whatever its config says)."""

    architectures = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
    family = "Qwen3.5"
    default_deepstack = None
