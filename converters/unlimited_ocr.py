"""Unlimited-OCR -> ``deepseekocr``: the SAM tower and tiling of ``_sam_ocr.SamOcr``, then a CLIP encoder
that takes the SAM grid as its patch embeddings (see the class)."""
from __future__ import annotations

import re

import gguf

from ggraft.mmproj.converter import VisionParams, register
from ggraft.mmproj.facts import RuntimeDefect

from ._sam_ocr import SAM_PREFIX, T, SamOcr, tile_defect

QKV = re.compile(gguf.TENSOR_NAMES[T.V_ENC_ATTN_QKV].replace(".", r"\.").format(bid=r"(?P<bid>\d+)")
                 + r"\.(?P<kind>weight|bias)")
#: transformers' UnlimitedOcrVisionEncoderConfig defaults
CLIP_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@register
class UnlimitedOcr(SamOcr):
    """A CLIP encoder (``v.blk.*``, CLS, learned positions, ``v.pre_ln``; quick GELU and eps 1e-5 fixed in
    llama.cpp) takes the SAM grid as its patch embeddings; each token's CLIP and SAM features, side by
    side, go through ``mm.model.fc``; ``v.image_newline`` ends every row of tokens and
    ``v.view_seperator`` the global view.  A fused ``qkv_proj`` (the saved layout) is split into q, k, v
    (transformers' module layout), so both layouts write the same file."""

    architectures = ("UnlimitedOcrForConditionalGeneration",)
    projector_type = gguf.VisionProjectorType.DEEPSEEKOCR
    family = "Unlimited-OCR"
    runtime_defects = (tile_defect("deepseekocr", 640, "UnlimitedOcr"), RuntimeDefect(
        "deepseekocr", "llama.cpp resizes the CLIP position table for a 640-pixel tile's grid wrongly: it interpolates "
        "the 2-D table as an image of (width, rows) and reads CLS's row at a byte offset meant as a row index, so "
        "every tile token gets scrambled positions (the global view keeps the table's own size)",
        "tools/mtmd/models/deepseekocr.cpp:328-338", seen_up_to="0.3.36"))
    vision_prefixes = (SAM_PREFIX, "model.vision_model.", "model.projector.", "model.view_seperator",
                       "model.image_newline")
    modules = tuple((re.compile(a), b) for a, b in (
        (r"model\.vision_tower\.vision_encoder\.encoder\.", "model.vision_model.transformer."),
        (r"model\.vision_tower\.vision_encoder\.", "model.vision_model."),
        (r"model\.multi_modal_projector\.", "model.projector.layers."),
        (r"model\.view_separator$", "model.view_seperator")))
    tile, max_tiles, tile_grid = 640, 32, True

    @classmethod
    def clip(cls, config) -> dict:
        return {**CLIP_DEFAULTS, **((config.get("vision_config") or {}).get("encoder_config") or {})}

    @classmethod
    def refuses(cls, config):
        clip = cls.clip(config)
        if reason := cls.sam_refuses(config):
            return reason
        if clip["hidden_act"] != "quick_gelu" or clip["layer_norm_eps"] != 1e-5:
            return (f"a CLIP encoder with {clip['hidden_act']!r} at eps {clip['layer_norm_eps']} (llama.cpp's "
                    "deepseekocr graph runs quick GELU at eps 1e-5)")
        return None

    def params(self) -> VisionParams:
        clip = self.clip(self.config)
        return self.vision_params(
            embedding_length=clip["hidden_size"], feed_forward_length=clip["intermediate_size"],
            block_count=clip["num_hidden_layers"], head_count=clip["num_attention_heads"],
            layer_norm_eps=clip["layer_norm_eps"], use_gelu=True, extra={})  # use_gelu: SAM's

    def runtime_resamplers(self, model) -> dict:
        """SAM's grid, and CLIP's table as models/deepseekocr.cpp:328-338 resizes it for a tile: rows 0..n-1
        (CLS's row first) taken as the grid, ggml_interpolate run over the (width, rows) plane of the 2-D
        table and the result read back as rows, then the "CLS" row viewed at a byte offset of n (the
        float32 values from n / 4 on) appended, all added to [CLS, patches] in that order."""
        import torch
        import torch.nn.functional as F

        emb = next(m for m in model.modules() if type(m).__name__ == "UnlimitedOcrVisionEmbeddings")
        own = emb.interpolate_pos_encoding

        def as_llama(embeddings, height, width):
            table, side = emb.position_embedding.weight, height // emb.patch_size
            n = table.shape[0] - 1
            if side * side == n:
                return own(embeddings, height, width)
            plane = F.interpolate(table[None, None, :n], size=(side, side), mode="bicubic", align_corners=False)
            rows = plane.reshape(-1).repeat(table.shape[1]).reshape(side * side, table.shape[1])
            return torch.cat([rows, table.reshape(-1)[n // 4:n // 4 + table.shape[1]][None]], 0)[None]

        return {**super().runtime_resamplers(model), emb: as_llama}

    def modify(self, gguf_name, tensor):
        if m := QKV.fullmatch(gguf_name):
            n = tensor.shape[0] // 3
            for i, part in enumerate((T.V_ENC_ATTN_Q, T.V_ENC_ATTN_K, T.V_ENC_ATTN_V)):
                yield f"{gguf.TENSOR_NAMES[part].format(bid=m['bid'])}.{m['kind']}", tensor[i * n:(i + 1) * n]
        else:
            yield gguf_name, tensor
