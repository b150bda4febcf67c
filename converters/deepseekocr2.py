"""DeepSeek-OCR 2 -> ``deepseekocr2``: the SAM tower and tiling of ``_sam_ocr.SamOcr``, then a Qwen2 encoder
over the SAM grid and learned queries (see the class)."""
from __future__ import annotations

import re

import gguf

from ggraft.mmproj.converter import VisionParams, register

from ._sam_ocr import SAM_PREFIX, T, SamOcr, tile_defect

ENCODER2 = re.compile(r"model\.qwen2_model\.model\.model\.layers\.(?P<bid>\d+)\.(?P<part>.+)\.(?P<kind>weight|bias)")
#: the Qwen2 encoder's block parts (gguf-py 0.19 has no ``qwen2_model`` rows)
ENCODER2_PARTS = {"self_attn.q_proj": T.V_ENC_ATTN_Q, "self_attn.k_proj": T.V_ENC_ATTN_K,
                  "self_attn.v_proj": T.V_ENC_ATTN_V, "self_attn.o_proj": T.V_ENC_ATTN_O,
                  "input_layernorm": T.V_ENC_INPUT_NORM, "post_attention_layernorm": T.V_ENC_POST_ATTN_NORM,
                  "mlp.gate_proj": T.V_ENC_FFN_GATE, "mlp.up_proj": T.V_ENC_FFN_UP, "mlp.down_proj": T.V_ENC_FFN_DOWN}
QUERY = re.compile(r"model\.qwen2_model\.query_(?P<side>768|1024)\.weight")
RESAMPLE_QUERY = "v.resample_query_{side}.weight"  # clip-impl.h TN_RESMPL_QUERY
#: transformers' DeepseekOcr2VisionEncoderConfig defaults
ENCODER2_DEFAULTS = dict(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, hidden_act="silu", rms_norm_eps=1e-6, use_sliding_window=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


@register
class DeepseekOcr2(SamOcr):
    """The Qwen2 encoder (``v.blk.*``, ``v.post_ln``) reads the SAM grid and then 256 learned queries (a
    1024-pixel view) or 144 (a 768-pixel tile), bidirectional over the grid, causal over the queries;
    only the queries reach ``mm.model.fc``, and ``v.view_seperator`` ends the global view.  llama.cpp
    runs its rope at base 1e6 (models/deepseekocr2.cpp)."""

    architectures = ("DeepseekOcr2ForConditionalGeneration",)
    projector_type = "deepseekocr2"  # clip-impl.h PROJECTOR_TYPE_DEEPSEEKOCR2; not in gguf-py 0.19
    family = "DeepSeek-OCR 2"
    runtime_defects = (tile_defect("deepseekocr2", 768, "DeepseekOcr2"),)
    vision_prefixes = (SAM_PREFIX, "model.qwen2_model.", "model.projector.", "model.view_seperator")
    modules = tuple((re.compile(a), b) for a, b in (
        (r"model\.vision_tower\.vision_encoder\.", "model.qwen2_model.model.model."),
        (r"model\.vision_tower\.query_(768|1024)_resolution\.", r"model.qwen2_model.query_\1."),
        (r"model\.multi_modal_projector\.", "model.projector.layers."),
        (r"model\.view_separator$", "model.view_seperator")))

    @classmethod
    def encoder(cls, config) -> dict:
        enc = {**ENCODER2_DEFAULTS, **((config.get("vision_config") or {}).get("encoder_config") or {})}
        return {**enc, "num_key_value_heads": enc["num_key_value_heads"] or enc["num_attention_heads"]}

    @classmethod
    def refuses(cls, config):
        enc = cls.encoder(config)
        rope = enc.get("rope_parameters") or {}
        if reason := cls.sam_refuses(config):
            return reason
        if enc["hidden_act"] != "silu" or enc["use_sliding_window"]:
            return "an encoder without SiLU or with sliding windows (llama.cpp runs SiLU over the whole sequence)"
        if rope.get("rope_type", "default") != "default" or rope.get("rope_theta") != 1e6:
            return f"encoder rope {rope} (llama.cpp's deepseekocr2 graph runs default rope at base 1e6)"
        return None

    def params(self) -> VisionParams:
        enc = self.encoder(self.config)
        return self.vision_params(
            embedding_length=enc["hidden_size"], feed_forward_length=enc["intermediate_size"],
            block_count=enc["num_hidden_layers"], head_count=enc["num_attention_heads"],
            layer_norm_eps=enc["rms_norm_eps"], use_gelu=True,  # SAM's
            extra={gguf.Keys.Attention.HEAD_COUNT_KV.format(arch="clip.vision"): enc["num_key_value_heads"]})

    def rename(self, canonical):
        if m := ENCODER2.fullmatch(canonical):
            part = ENCODER2_PARTS.get(m["part"])
            return part and f"{gguf.TENSOR_NAMES[part].format(bid=m['bid'])}.{m['kind']}"
        if m := QUERY.fullmatch(canonical):
            return RESAMPLE_QUERY.format(side=m["side"])
        if canonical == "model.qwen2_model.model.model.norm.weight":
            return gguf.TENSOR_NAMES[T.V_POST_NORM] + ".weight"
        return super().rename(canonical)
