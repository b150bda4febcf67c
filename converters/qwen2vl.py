"""Qwen2-VL -> projector ``qwen2vl_merger``; Qwen2.5-VL -> ``qwen2.5vl_merger``.

What is special here:
- the patch embedding is a Conv3d over 2 frames; llama.cpp runs one Conv2d per frame and adds
  them, so the kernel is split into ``v.patch_embd.weight`` (frame 0) and ``.weight.1`` (frame 1).
  A still image is both frames, exactly as transformers' processor repeats it.
- ``attn.qkv`` is fused in the checkpoint; llama.cpp's qwen2vl graph loads q, k and v apart.
- the merger is ``ln_q`` (``v.post_ln``) then an MLP (``mm.0``, GELU, ``mm.2``) over 2x2 patches.
- Qwen2.5-VL attends within windows except in ``fullatt_block_indexes``; llama.cpp expresses
  that as ``n_wa_pattern`` (block i is full iff (i + 1) % n_wa_pattern == 0), so only periodic
  patterns ending each period convert (no full block at all is ``depth + 1``).  The window is
  written as ``clip.vision.window_size``, but llama.cpp's qwen2.5vl runtime (this version) does
  not read that key and always uses 112-pixel windows; ``runtime_reference`` emulates that.
- norms use eps 1e-6 (fixed in transformers' vision blocks, whatever the text config says).
Both saved layouts are taken: ``visual.*`` (save_pretrained, 4.x and 5.x alike) and the module
names ``model.visual.*`` (state dicts saved as-is by training tools).
"""
from __future__ import annotations

import re

import gguf

from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention, RuntimeDefect
from ._image_norms import CLIP_MEAN, CLIP_STD

VISION_EPS = 1e-6  # transformers' Qwen2-VL / 2.5-VL vision norms
LLAMA_MERGE = 2  # llama.cpp's qwen2vl graph merges 2x2 patches, whatever spatial_merge_size says
LLAMA_WINDOW = 112  # clip.cpp's qwen2.5vl window in pixels (it reads no key for it)
LLAMA_ROPE_THETA = 10000.0
DYNAMIC_IMAGE_SIZE = 560  # clip.vision.image_size for dynamic-resolution Qwen (llama.cpp's own value)
T = gguf.MODEL_TENSOR
PATCH = gguf.TENSOR_NAMES[T.V_ENC_EMBD_PATCH] + ".weight"
QKV = re.compile(gguf.TENSOR_NAMES[T.V_ENC_ATTN_QKV].replace(".", r"\.").format(bid=r"(?P<bid>\d+)")
                 + r"\.(?P<kind>weight|bias)")
ACTIVATIONS = {"quick_gelu": {}, "silu": {"use_silu": True}}  # what llama.cpp's graph computes


@register
class Qwen2VL(Converter):
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")  # the bare model holds the same tower
    projector_type = gguf.VisionProjectorType.QWEN2VL
    family = "Qwen2-VL"
    image_tokens = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
    convention = Convention("Qwen-VL", ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
                                        "<|vision_pad|>"))
    vision_prefixes = ("visual.",)
    layout_aliases = (("model.visual.", "visual."),)

    default_act = "quick_gelu"

    @classmethod
    def refuses(cls, config):
        v = config.get("vision_config") or {}
        theta = (v.get("rope_parameters") or {}).get("rope_theta", LLAMA_ROPE_THETA)
        if v.get("temporal_patch_size", 2) != 2:
            return "llama.cpp's qwen2vl graph needs temporal_patch_size 2"
        if v.get("spatial_merge_size", 2) != LLAMA_MERGE:
            return f"llama.cpp's qwen2vl graph merges {LLAMA_MERGE}x{LLAMA_MERGE} patches only"
        if v.get("hidden_act", cls.default_act) not in ACTIVATIONS:
            return f"vision activation {v.get('hidden_act')!r} has no llama.cpp equivalent"
        if theta != LLAMA_ROPE_THETA:
            return f"vision rope_theta {theta} (llama.cpp's qwen2vl graph uses {LLAMA_ROPE_THETA:g})"
        return None

    def widths(self) -> tuple[int, int, int]:
        """(embedding, feed-forward, projection) widths of the vision tower."""
        v = self.vision_config
        embd = v.get("embed_dim", 1280)
        return embd, embd * v.get("mlp_ratio", 4), v.get("hidden_size", 3584)

    def extra(self) -> dict:
        return {gguf.Keys.ClipVision.SPATIAL_MERGE_SIZE: LLAMA_MERGE}

    def params(self) -> VisionParams:
        v = self.vision_config
        embd, ffn, proj = self.widths()
        mean, std = preprocessing(self.ckpt, CLIP_MEAN, CLIP_STD)
        return VisionParams(
            image_size=v.get("image_size", DYNAMIC_IMAGE_SIZE), patch_size=v.get("patch_size", 14),
            embedding_length=embd, feed_forward_length=ffn, block_count=v.get("depth", 32),
            head_count=v.get("num_heads", 16), layer_norm_eps=VISION_EPS, projection_dim=proj,
            image_mean=mean, image_std=std, **ACTIVATIONS[v.get("hidden_act", self.default_act)],
            extra=self.extra(),
        )

    def modify(self, gguf_name, tensor):
        if gguf_name == PATCH:  # Conv3d (out, 3, frames, p, p) -> one Conv2d kernel per frame
            yield PATCH, tensor[:, :, 0]
            yield PATCH + ".1", tensor[:, :, 1]
        elif m := QKV.fullmatch(gguf_name):
            n = tensor.shape[0] // 3
            for i, part in enumerate((T.V_ENC_ATTN_Q, T.V_ENC_ATTN_K, T.V_ENC_ATTN_V)):
                yield f"{gguf.TENSOR_NAMES[part].format(bid=m['bid'])}.{m['kind']}", tensor[i * n:(i + 1) * n]
        else:
            yield gguf_name, tensor

    def test_image_size(self):
        side = self.params().patch_size * LLAMA_MERGE  # llama.cpp resizes to multiples of this
        return 4 * side, 3 * side  # 12 tokens: above llama.cpp's minimum of 8, no resize

    def patches(self, pixel_values):
        """transformers' processor layout of one still image: (patches, 3 * 2 * p * p) and its grid,
        patches ordered by 2x2 merge unit (as Qwen2VLImageProcessor.patchify does)."""
        import torch

        p, m = self.params().patch_size, LLAMA_MERGE
        gh, gw = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        x = pixel_values[0].reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, 2, -1, -1).reshape(gh * gw, 3 * 2 * p * p)
        return x.contiguous(), torch.tensor([[1, gh, gw]])

    def model_inputs(self, pixel_values):
        flat, grid_thw = self.patches(pixel_values)
        return {"pixel_values": flat, "image_grid_thw": grid_thw}


@register
class Qwen25VL(Qwen2VL):
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    projector_type = gguf.VisionProjectorType.QWEN25VL
    family = "Qwen2.5-VL"
    default_act = "silu"
    runtime_defects = (RuntimeDefect(
        "qwen2.5vl_merger", f"llama.cpp's qwen2.5vl runtime ignores clip.vision.window_size and always attends "
        f"within {LLAMA_WINDOW}-pixel windows: the file matches transformers run with {LLAMA_WINDOW}-pixel windows, "
        "the runtime does not match this checkpoint's window_size", "ggraft README, Known llama.cpp deviations",
        seen_up_to="0.3.36", unless_key=(gguf.Keys.ClipVision.WINDOW_SIZE, LLAMA_WINDOW)),)

    @classmethod
    def refuses(cls, config):
        v = config.get("vision_config") or {}
        if cls.wa_pattern(v) is None:
            return (f"fullatt_block_indexes {list(v.get('fullatt_block_indexes', []))} is not periodic "
                    "(llama.cpp runs block i in full attention iff (i + 1) % n_wa_pattern == 0)")
        return super().refuses(config)

    @staticmethod
    def wa_pattern(v: dict) -> int | None:
        """llama.cpp's n_wa_pattern for transformers' fullatt_block_indexes (None: none fits)."""
        depth = v.get("depth", 32)
        full = sorted(i for i in v.get("fullatt_block_indexes", (7, 15, 23, 31)) if i < depth)
        period = full[0] + 1 if full else depth + 1
        return period if full == [i for i in range(depth) if (i + 1) % period == 0] else None

    def widths(self):
        v = self.vision_config
        return v.get("hidden_size", 3584), v.get("intermediate_size", 3420), v.get("out_hidden_size", 3584)

    def window(self) -> int:
        return self.vision_config.get("window_size", LLAMA_WINDOW)

    def extra(self):
        return {**super().extra(), gguf.Keys.ClipVision.N_WA_PATTERN: self.wa_pattern(self.vision_config),
                gguf.Keys.ClipVision.WINDOW_SIZE: self.window()}

    def test_image_size(self):
        side = self.params().patch_size * LLAMA_MERGE
        return 6 * side, 8 * side  # 168 x 224 at patch 14: four 112-px windows, two of them partial


    def runtime_reference(self, model, pixel_values):
        if self.window() == LLAMA_WINDOW:
            return None
        from transformers.vision_utils import get_vision_window_index

        flat, grid_thw = self.patches(pixel_values)
        index, cu_seqlens = get_vision_window_index(grid_thw, LLAMA_MERGE, LLAMA_WINDOW, self.params().patch_size)
        return model.get_image_features(pixel_values=flat, image_grid_thw=grid_thw,
                                        window_index=index, cu_window_seqlens=cu_seqlens)
