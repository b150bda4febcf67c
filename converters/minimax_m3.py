"""MiniMax-M3 (MiniMaxM3SparseForConditionalGeneration) -> projector ``minimax_m3``.

What is special here (llama.cpp: tools/mtmd/models/minimax-m3.cpp, clip.cpp PROJECTOR_TYPE_MINIMAX_M3):
- a CLIP-like tower (pre LayerNorm, no post norm, no class token, q/k/v/out with biases, exact
  GELU MLP) over a bias-free Conv3d patch embedding of 2 frames, which llama.cpp runs as one
  Conv2d per frame (``v.patch_embd.weight`` and ``.weight.1``), a still image being both frames.
- a partial 3D rope on each head: transformers rotates the first ``3 * A`` channels as one
  rotate-half block laid out ``[T H W | T H W]`` (``A = 2 * ((head_dim // 3) // 2)`` channels per
  axis) and passes the rest; llama.cpp ropes ``[T T | H H | W W]`` axis by axis (NEOX, T left
  unrotated: its position is 0).  q and k rows are permuted per head into llama.cpp's layout.
- the projector runs per patch (``linear_1``, GELU, ``linear_2`` -> ``mm.1``/``mm.2``), then
  concatenates each 2x2 merge unit and runs ``patch_merge_mlp`` (``mm.merger.fc1``/``fc2``,
  names of clip-impl.h:154 that gguf-py 0.19 lacks).
- llama.cpp fixes the vision rope base at 10000 (clip.cpp, load_hparams) and counts output tokens
  as 2x2 merges (clip.cpp clip_n_output_tokens, ``patch_size * 2``), its ViT GELU is erf: other
  rope bases, merge sizes, temporal patch sizes and activations are refused.
Saved layouts: the released names (``vision_tower.vision_model.*``, ``multi_modal_projector.*``,
``patch_merge_mlp.*``, what transformers 5 ``save_pretrained`` writes back) and transformers'
module names (``model.vision_tower.layers.*``, ``model.multi_modal_projector.merge_linear_*``).
"""
from __future__ import annotations

import re

import gguf

from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention
from ._image_norms import CLIP_MEAN, CLIP_STD

T = gguf.MODEL_TENSOR
TOWER, PROJECTOR, MERGER = "vision_tower.vision_model.", "multi_modal_projector.", "patch_merge_mlp."
PATCH = gguf.TENSOR_NAMES[T.V_ENC_EMBD_PATCH] + ".weight"
ROPE_THETA = 10000.0  # clip.cpp load_hparams, PROJECTOR_TYPE_MINIMAX_M3: hparams.rope_theta
MERGE = 2  # clip.cpp clip_n_output_tokens counts (nx / (patch_size * 2)) * (ny / (patch_size * 2)) tokens
QK = re.compile(r"v\.blk\.\d+\.attn_[qk]\.(weight|bias)")
_NAMED = {
    PROJECTOR + "linear_1": gguf.TENSOR_NAMES[T.V_MMPROJ].format(bid=1),
    PROJECTOR + "linear_2": gguf.TENSOR_NAMES[T.V_MMPROJ].format(bid=2),
    MERGER + "linear_1": "mm.merger.fc1",  # clip-impl.h:154 TN_MM_MERGER_FC1 (not in gguf-py 0.19)
    MERGER + "linear_2": "mm.merger.fc2",
}
#: transformers' MiniMaxM3VLVisionConfig defaults
DEFAULTS = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                image_size=2016, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, hidden_act="gelu",
                layer_norm_eps=1e-5)


def rope_axis(head_dim: int) -> tuple[int, int]:
    """(transformers', llama.cpp's) rotated channels per axis for a head width."""
    return 2 * ((head_dim // 3) // 2), 2 * ((2 * (head_dim // 2) // 3) // 2)


def llama_rope_order(head_dim: int) -> list[int]:
    """For each of llama.cpp's channels of a head, transformers' channel: [T H W | T H W | pass]
    (two halves of one rotate-half block) -> [T T | H H | W W | pass]."""
    half = rope_axis(head_dim)[0] // 2
    order = []
    for axis in range(3):
        order += [*range(axis * half, (axis + 1) * half), *range(3 * half + axis * half, 3 * half + (axis + 1) * half)]
    return order + list(range(6 * half, head_dim))


@register
class MiniMaxM3(Converter):
    architectures = ("MiniMaxM3SparseForConditionalGeneration",)
    projector_type = "minimax_m3"  # clip-impl.h PROJECTOR_TYPE_MINIMAX_M3; not in gguf-py 0.19
    family = "MiniMax-M3"
    image_tokens = ("]<]start of image[>[", "]<]image[>[", "]<]end of image[>[")
    convention = Convention("MiniMax-M3", ("]<]start of image[>[", "]<]end of image[>[", "]<]image[>[",
                                           "]<]video[>["))
    vision_prefixes = (TOWER, PROJECTOR, MERGER)
    layout_aliases = (  # transformers' module names (a state dict saved as-is)
        ("model.vision_tower.embeddings.proj.", TOWER + "embeddings.patch_embedding."),
        ("model.vision_tower.layers.", TOWER + "encoder.layers."),
        ("model.vision_tower.", TOWER),
        ("model.multi_modal_projector.merge_linear_", MERGER + "linear_"),
        ("model.multi_modal_projector.", PROJECTOR),
    )

    @classmethod
    def refuses(cls, config):
        v = {**DEFAULTS, **(config.get("vision_config") or {})}
        theta = float((v.get("rope_parameters") or {}).get("rope_theta", ROPE_THETA))
        heads = v["num_attention_heads"]
        if v["temporal_patch_size"] != 2:
            return "llama.cpp's minimax_m3 graph needs temporal_patch_size 2 (two Conv2d frames)"
        if v["spatial_merge_size"] != MERGE:
            return (f"spatial_merge_size {v['spatial_merge_size']}: llama.cpp counts minimax_m3 image tokens "
                    f"as {MERGE}x{MERGE} merges")
        if v["hidden_act"] != "gelu":
            return f"vision activation {v['hidden_act']!r}: llama.cpp's minimax_m3 ViT runs exact GELU"
        if theta != ROPE_THETA:
            return f"vision rope_theta {theta:g}: llama.cpp's minimax_m3 graph fixes it at {ROPE_THETA:g}"
        if v["hidden_size"] % heads:
            return f"vision hidden_size {v['hidden_size']} is not a multiple of {heads} heads"
        hf, llama = rope_axis(v["hidden_size"] // heads)
        if hf != llama or hf == 0:
            return (f"vision head width {v['hidden_size'] // heads}: transformers rotates {hf} channels per axis, "
                    f"llama.cpp {llama}")
        return None

    @property
    def vision(self) -> dict:
        return {**DEFAULTS, **self.vision_config}

    def params(self) -> VisionParams:
        v = self.vision
        mean, std = preprocessing(self.ckpt, CLIP_MEAN, CLIP_STD)  # MiniMaxM3VLImageProcessor's defaults
        return VisionParams(
            image_size=v["image_size"], patch_size=v["patch_size"], embedding_length=v["hidden_size"],
            feed_forward_length=v["intermediate_size"], block_count=v["num_hidden_layers"],
            head_count=v["num_attention_heads"], layer_norm_eps=v["layer_norm_eps"],
            projection_dim=self.text_config.get("hidden_size", 6144), image_mean=mean, image_std=std,
            use_gelu=True, extra={gguf.Keys.ClipVision.SPATIAL_MERGE_SIZE: MERGE},
        )

    def rename(self, canonical):
        stem, _, kind = canonical.rpartition(".")
        if stem in _NAMED:
            return f"{_NAMED[stem]}.{kind}"
        return super().rename(canonical)

    def modify(self, gguf_name, tensor):
        if gguf_name == PATCH:  # Conv3d (out, 3, 2, p, p) -> one Conv2d kernel per frame
            yield PATCH, tensor[:, :, 0]
            yield PATCH + ".1", tensor[:, :, 1]
        elif QK.fullmatch(gguf_name):
            heads = self.params().head_count
            dh = tensor.shape[0] // heads
            rows = tensor.reshape(heads, dh, *tensor.shape[1:])[:, llama_rope_order(dh)]
            yield gguf_name, rows.reshape(tensor.shape)
        else:
            yield gguf_name, tensor

    def test_image_size(self):
        side = self.params().patch_size * MERGE  # llama.cpp resizes to multiples of this
        return 3 * side, 4 * side  # 12 tokens: within llama.cpp's 8..576, so neither side resizes

    def model_inputs(self, pixel_values):
        """MiniMaxM3VLImageProcessor's layout of one still image: patches by 2x2 merge unit, each
        (channel, frame, row, column) with the image as both frames, and its (1, rows, columns) grid."""
        import torch

        p, m = self.params().patch_size, MERGE
        gh, gw = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        x = pixel_values[0].reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, 2, -1, -1).reshape(gh * gw, 3 * 2 * p * p)
        return {"pixel_values": x.contiguous(), "image_grid_thw": torch.tensor([[1, gh, gw]])}
