"""Kimi-K2.5 (MoonViT3d tower, patch-merger MLP) -> projector ``kimik25``.

transformers builds it as ``Kimi_K25ForConditionalGeneration``; the hub's remote-code configs (and
llama.cpp's converter) spell it ``KimiK25ForConditionalGeneration``.  What is special here:
- three saved layouts: save_pretrained (transformers 5 reverses its conversion mapping into the hub's
  MoonViT names: ``encoder.blocks.N.wqkv``, ``norm0``/``norm1``, ``mlp.fc0``/``fc1``, ``wo``,
  ``mm_projector.proj.0``/``.2``, but ``model.mm_projector.pre_norm`` and
  ``vision_tower.encoder.patch_embed``), the hub's own names, and transformers' module names
  (``model.vision_tower.layers.N.attn.q_proj`` ..., where norm1/norm2 and fc1/fc2 are the hub's
  norm0/norm1 and fc0/fc1).  Module names are mapped onto the hub's, then TensorNameMap names them.
- 2D rope: the hub's q/k rows are interleaved complex pairs per head, (freq j, axis a, re/im b);
  transformers' module q/k are rotate-half, (b, j, a).  llama.cpp's ``build_rope_2d``
  (tools/mtmd/clip.cpp:824) rotates adjacent pairs, the first half of each head by column (w, a=0),
  the second by row (h, a=1): (a, j, b).  q and k are permuted to that, ``wqkv`` split apart.
- the learned (H, W, C) position grid is written as it is (ggml (C, W, H)); both sides resample it
  bicubically (align_corners False) to the image's patch grid (models/kimik25.cpp:8-32).  The time
  embedding (hub ``pos_emb.time_weight``) adds nothing to a still image and is left out.
- the merger takes 2x2 patches row by row into one token (transformers' ``temporal_merge``, llama.cpp's
  ``build_patch_merge_permute``); the projector LayerNorm runs per patch before the merge.
- llama.cpp has one eps for the tower and the projector norm; transformers' tower norms are fixed at
  1e-5 and the projector's is ``projection_layer_norm_eps`` (1e-5): the file writes 1e-5.
- preprocessing: ``clip.vision.image_min_pixels`` is one merged token and ``image_max_pixels`` the
  processor's ``max_patches`` budget, so an image aligned to patch x merge is not resized by llama.cpp
  (tools/mtmd/mtmd-image.cpp:122-157, 772-793), as transformers' processor does not.  An unaligned
  image is *padded* by transformers' processor and *resized* to the nearest multiple by llama.cpp.
"""
from __future__ import annotations

import re

import gguf

from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention
from ._image_norms import ACTIVATIONS, SIGLIP_MEAN, SIGLIP_STD

T = gguf.MODEL_TENSOR
EPS = 1e-5  # transformers' MoonViT norms (fixed) and the projector's default projection_layer_norm_eps
ROPE_THETA = 10000.0  # clip.cpp:1595 fixes it for kimik25
#: Kimi_K25VisionConfig's defaults, and DeepseekV3Config's hidden_size
DEFAULTS = dict(patch_size=14, pos_emb_height=64, pos_emb_width=64, num_attention_heads=16, num_hidden_layers=27,
                hidden_size=1152, intermediate_size=4304, hidden_act="gelu_pytorch_tanh", merge_kernel_size=[2, 2])
TEXT_HIDDEN = 7168
MAX_PATCHES = 16384  # Kimi_K25ImageProcessor.max_patches
#: transformers' module names -> the hub's (transformers' conversion_mapping for kimi_k25, reversed)
MODULES = (
    (r"model\.vision_tower\.layers\.(\d+)\.norm1\.", r"vision_tower.encoder.blocks.\1.norm0."),
    (r"model\.vision_tower\.layers\.(\d+)\.norm2\.", r"vision_tower.encoder.blocks.\1.norm1."),
    (r"model\.vision_tower\.layers\.(\d+)\.mlp\.fc1\.", r"vision_tower.encoder.blocks.\1.mlp.fc0."),
    (r"model\.vision_tower\.layers\.(\d+)\.mlp\.fc2\.", r"vision_tower.encoder.blocks.\1.mlp.fc1."),
    (r"model\.vision_tower\.layers\.(\d+)\.attn\.proj\.", r"vision_tower.encoder.blocks.\1.wo."),
    (r"model\.vision_tower\.layers\.(\d+)\.attn\.([qkv])_proj\.", r"vision_tower.encoder.blocks.\1.w\2."),
    (r"model\.vision_tower\.final_layernorm\.", "vision_tower.encoder.final_layernorm."),
    (r"model\.vision_tower\.patch_embed\.pos_emb\.position_embeddings", "vision_tower.patch_embed.pos_emb.weight"),
    (r"model\.vision_tower\.patch_embed\.", "vision_tower.patch_embed."),
    (r"model\.mm_projector\.in_proj\.", "mm_projector.proj.0."),
    (r"model\.mm_projector\.out_proj\.", "mm_projector.proj.2."),
    (r"model\.mm_projector\.pre_norm\.", "mm_projector.pre_norm."),
)
PROJ = {"0": gguf.TENSOR_NAMES[T.V_MMPROJ].format(bid=1), "2": gguf.TENSOR_NAMES[T.V_MMPROJ].format(bid=2)}
ATTN = re.compile(r"v\.blk\.(?P<bid>\d+)\.attn_(?P<part>qkv|q|k)\.(?P<kind>weight|bias)")
#: per-head row order (as an axis permutation of the head viewed in three axes) to llama.cpp's (a, j, b)
HUB_ORDER = ((-1, 2, 2), (1, 0, 2))  # hub (j, a, b)
MODULE_ORDER = ((2, -1, 2), (2, 1, 0))  # transformers' modules (b, j, a)


@register
class KimiK25(Converter):
    architectures = ("Kimi_K25ForConditionalGeneration", "KimiK25ForConditionalGeneration")
    reference_classes = {"KimiK25ForConditionalGeneration": "Kimi_K25ForConditionalGeneration"}
    projector_type = gguf.VisionProjectorType.KIMIK25
    family = "Kimi-K2.5"
    #: mtmd wraps each image in <|media_begin|> ... <|media_end|> (tools/mtmd/mtmd.cpp:808-821); the chat
    #: template writes <|media_begin|>image<|media_content|><|media_pad|><|media_end|>
    image_tokens = ("<|media_begin|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>")
    convention = Convention("Kimi-VL", ("<|media_start|>", "<|media_end|>", "<|media_pad|>", "<|media_begin|>"),
                            projectors=("kimivl",))
    vision_prefixes = ("vision_tower.", "mm_projector.")
    layout_aliases = (("vision_tower.encoder.patch_embed.", "vision_tower.patch_embed."),  # save_pretrained
                      ("model.mm_projector.pre_norm.", "mm_projector.pre_norm."))

    def __init__(self, ckpt, recipient=None):
        super().__init__(ckpt, recipient)
        self.vision_config = {**DEFAULTS, **self.vision_config}

    @classmethod
    def refuses(cls, config):
        v = {**DEFAULTS, **(config.get("vision_config") or {})}
        theta = (v.get("rope_parameters") or {}).get("rope_theta", ROPE_THETA)
        kh, kw = v["merge_kernel_size"]
        if float(theta) != ROPE_THETA:
            return f"vision rope_theta {theta}: llama.cpp's kimik25 graph fixes it at {ROPE_THETA:g}"
        if kh != kw or kh < 2:
            return f"merge_kernel_size {[kh, kw]}: llama.cpp's kimik25 graph merges square blocks of 2x2 or more"
        if v["hidden_act"] not in ACTIVATIONS:
            return f"vision activation {v['hidden_act']!r} has no llama.cpp equivalent"
        if (v["hidden_size"] // v["num_attention_heads"]) % 4:
            return f"vision head size {v['hidden_size'] // v['num_attention_heads']}: the 2D rope needs a multiple of 4"
        if v["pos_emb_height"] != v["pos_emb_width"]:
            return "a non-square position grid: transformers resamples it as a square one"
        return None

    def params(self) -> VisionParams:
        v = self.vision_config
        mean, std = preprocessing(self.ckpt, SIGLIP_MEAN, SIGLIP_STD)  # IMAGENET_STANDARD_MEAN/STD (0.5)
        p, merge = v["patch_size"], v["merge_kernel_size"][0]
        pre = self.ckpt.preprocessor_config
        max_patches = int(pre.get("max_patches", pre.get("in_patch_limit", MAX_PATCHES)))
        return VisionParams(
            image_size=v["pos_emb_height"] * p, patch_size=p, embedding_length=v["hidden_size"],
            feed_forward_length=v["intermediate_size"], block_count=v["num_hidden_layers"],
            head_count=v["num_attention_heads"], layer_norm_eps=EPS,
            projection_dim=self.text_config.get("hidden_size", TEXT_HIDDEN), image_mean=mean, image_std=std,
            **ACTIVATIONS[v["hidden_act"]],
            extra={gguf.Keys.ClipVision.Projector.SCALE_FACTOR: merge,
                   gguf.Keys.ClipVision.IMAGE_MIN_PIXELS: (p * merge) ** 2,
                   gguf.Keys.ClipVision.IMAGE_MAX_PIXELS: max(max_patches, merge * merge) * p * p},
        )

    def canonical(self, name):
        for pattern, hub in MODULES:
            if m := re.match(pattern, name):
                return m.expand(hub) + name[m.end():]
        return super().canonical(name)

    def skip(self, canonical):
        return canonical.startswith("vision_tower.patch_embed.pos_emb.time_weight")  # still images add none

    def rename(self, canonical):
        if m := re.fullmatch(r"mm_projector\.proj\.([02])\.(weight|bias)", canonical):
            return f"{PROJ[m[1]]}.{m[2]}"
        return super().rename(canonical)

    def to_llama_rope(self, tensor, order):
        """q or k rows (out, ...) reordered per head from ``order`` to llama.cpp's (axis, freq, re/im)."""
        heads = self.params().head_count
        shape, axes = order
        head = tensor.shape[0] // heads
        view = tuple(head // 4 if s == -1 else s for s in shape)
        t = tensor.reshape(heads, *view, *tensor.shape[1:])
        return t.transpose(0, *(a + 1 for a in axes), *range(4, t.ndim)).reshape(tensor.shape)

    def modify(self, gguf_name, tensor):
        if not (m := ATTN.fullmatch(gguf_name)):
            yield gguf_name, tensor
        elif m["part"] == "qkv":  # the hub's fused wqkv, rope-interleaved
            n = tensor.shape[0] // 3
            for i, part in enumerate((T.V_ENC_ATTN_Q, T.V_ENC_ATTN_K, T.V_ENC_ATTN_V)):
                rows = tensor[i * n:(i + 1) * n]
                yield (f"{gguf.TENSOR_NAMES[part].format(bid=m['bid'])}.{m['kind']}",
                       rows if i == 2 else self.to_llama_rope(rows, HUB_ORDER))
        else:  # transformers' separate rotate-half q / k
            yield gguf_name, self.to_llama_rope(tensor, MODULE_ORDER)

    def test_image_size(self):
        side = self.params().patch_size * self.vision_config["merge_kernel_size"][0]
        return 5 * side, 7 * side  # 35 tokens; a grid other than the position grid's (resampled on both sides)

    def model_inputs(self, pixel_values):
        """Kimi_K25ImageProcessor's layout of one image: patches (N, 3, p, p) row-major, and its grid."""
        import torch

        p = self.params().patch_size
        gh, gw = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        x = pixel_values[0].reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, p, p)
        return {"pixel_values": x.contiguous(), "image_grid_thw": torch.tensor([[1, gh, gw]])}
