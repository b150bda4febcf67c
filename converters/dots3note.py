"""dots3-note (``Dots3NoteForConditionalGeneration``) vision tower -> projector ``dots3note_v``.

llama.cpp runs dots.ocr's graph (``tools/mtmd/models/dotsocr.cpp``): patch conv + bias, RMSNorm
(``v.pre_ln``), blocks of fused qkv with per-head q/k RMSNorms, 2D rope, SiLU-gated FFN; RMSNorm
(``mm.post_norm``), merger LayerNorm, 2x2 merge, Linear, exact GELU, Linear.  What is special here:
- "pyramid" MoE blocks: sigmoid router (``ffn_gate_inp``), selection-only bias (``exp_probs_b``),
  top-k experts weighted by their normalized scores, stacked ``ffn_{gate,up,down}_exps``
  (``build_moe_ffn``, clip.cpp 706-757).  clip.cpp applies no ``router_scaling_factor``: it is folded
  into the experts' down projections.  Names: gguf-py's text MoE rows with clip-impl.h's ``v.``
  prefix (124-128; gguf-py 0.19 has no vision MoE rows).
- clip.cpp requires ``spatial_merge_size``, ``image_min/max_pixels``, ``expert_used_count`` and fixes
  the rope base at 10000 and the experts' SiLU (clip.cpp 1564-1573, 712); other configs are refused.
Layouts: transformers 5's ``save_pretrained`` = the hub's names (``vision_encoder.*``, one tensor per
expert ``experts.<e>.fc1/fc3/fc2`` = gate/up/down, ``gate_weight``, ``router_bias``, ``adapter``,
``post_trunk_norm``), and transformers' module names (``model.vision_tower.*``, experts stacked with
gate|up fused; ``save_original_format=False``).  The released config (``Dots3NoteForCausalLM``) names
the tower width ``embed_dim`` (``hidden_size`` is the adapter's output), ``num_heads``,
``capacity_factor``, ``router_scale``, read as transformers' config class reads them.

llama.cpp's runtime departs in its preprocessing, which no file can change: an image whose sides are
not multiples of patch x merge (or outside the pixel limits) is letterboxed to transformers' size
(aspect-preserving resize, centred black bars: mtmd-image.cpp:787 passes ``image_resize_pad``, PAD_CEIL
unless clip.cpp sets it, clip-model.h:67), where the processor stretches it.  Aligned images match.
"""
from __future__ import annotations

import re

import gguf
import numpy as np

from ggraft.errors import InputError
from ggraft.mmproj.converter import Converter, Lazy, VisionParams, register
from ggraft.mmproj.facts import Convention, RuntimeDefect
from ._image_norms import CLIP_MEAN, CLIP_STD

T, NAMES = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
CV = gguf.Keys.ClipVision
EXPERT_USED_KEY = "clip.vision.expert_used_count"  # clip-impl.h:79 KEY_VISION_N_EXPERT_USED (not in gguf-py 0.19)
LLAMA_ROPE_THETA = 10000.0  # clip.cpp:1566
WARMUP_SIDE = 46  # merged tokens per side clip.cpp warms up with (clip.cpp:1572)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280  # Qwen2VLImageProcessor's size defaults (dots3-note's processor)
#: transformers' Dots3NoteVisionConfig defaults
DEFAULTS = dict(hidden_size=1536, intermediate_size=4224, num_hidden_layers=42, num_attention_heads=24, patch_size=14,
                hidden_act="silu", spatial_merge_size=2, rms_norm_eps=1e-5, adapter_out_dim=5120)
#: the hub's names -> transformers' module names (transformers' conversion_mapping.py, dots3_note_vision_encoder)
HUB = ((r"^vision_encoder\.", "vision_tower."), (r"^model\.vision_tower\.", "vision_tower."),
       (r"^vision_tower\.post_trunk_norm\.", "vision_tower.norm."),
       (r"^vision_tower\.adapter\.", "vision_tower.merger."),
       (r"(blocks\.\d+)\.norm_([12])\.", r"\1.norm\2."), (r"(blocks\.\d+\.mlp)\.fc1\.", r"\1.gate_proj."),
       (r"(blocks\.\d+\.mlp)\.fc2\.", r"\1.down_proj."), (r"(blocks\.\d+\.mlp)\.fc3\.", r"\1.up_proj."),
       (r"\.mlp\.gate_weight$", ".mlp.gate.weight"), (r"\.mlp\.router_bias$", ".mlp.e_score_correction_bias"))
HUB = tuple((re.compile(a), b) for a, b in HUB)
EXPS = {fc: f"v.{NAMES[t]}.weight"  # the hub's per-expert fc1 / fc3 / fc2 = gate / up / down
        for fc, t in (("fc1", T.FFN_GATE_EXP), ("fc3", T.FFN_UP_EXP), ("fc2", T.FFN_DOWN_EXP))}
TOP = {"patch_embed.proj": NAMES[T.V_ENC_EMBD_PATCH], "patch_embed.norm": NAMES[T.V_PRE_NORM],
       "norm": NAMES[T.V_MM_POST_NORM], "merger.ln_q": NAMES[T.V_MM_INP_NORM],
       "merger.mlp.0": NAMES[T.V_MMPROJ].format(bid=0), "merger.mlp.2": NAMES[T.V_MMPROJ].format(bid=2)}
BLOCK = {"norm1": T.V_ENC_INPUT_NORM, "norm2": T.V_ENC_POST_ATTN_NORM, "attn.qkv": T.V_ENC_ATTN_QKV,
         "attn.proj": T.V_ENC_ATTN_O, "attn.q_norm": T.V_ENC_ATTN_Q_NORM, "attn.k_norm": T.V_ENC_ATTN_K_NORM,
         "mlp.gate_proj": T.V_ENC_FFN_GATE, "mlp.up_proj": T.V_ENC_FFN_UP, "mlp.down_proj": T.V_ENC_FFN_DOWN,
         "mlp.gate": T.FFN_GATE_INP, "mlp.e_score_correction_bias": T.FFN_EXP_PROBS_B,
         "mlp.experts.gate_up_proj": T.FFN_GATE_EXP, "mlp.experts.down_proj": T.FFN_DOWN_EXP}
NAME = re.compile(r"vision_tower\.(?:blocks\.(?P<bid>\d+)\.)?(?P<module>.+?)(?:\.(?P<kind>weight|bias))?")
EXPERT = re.compile(r"vision_tower\.blocks\.(?P<bid>\d+)\.mlp\.experts\.(?P<e>\d+)\.(?P<fc>fc[123])\.weight")


def vision(config) -> dict:
    """The vision config as transformers' Dots3NoteVisionConfig reads it (the hub's names win)."""
    section = config.get("vision_config") or {}
    v = {k: section.get(k, d) for k, d in DEFAULTS.items()}
    v["hidden_size"] = section.get("embed_dim", v["hidden_size"])
    v["num_attention_heads"] = section.get("num_heads", v["num_attention_heads"])
    n_used, scale = section.get("num_experts_per_tok"), section.get("router_scaling_factor")
    v["num_experts_per_tok"] = section.get("capacity_factor", 2) if n_used is None else n_used
    v["router_scaling_factor"] = section.get("router_scale", 1.0) if scale is None else scale
    v["rope_theta"] = (section.get("rope_parameters") or {}).get("rope_theta", LLAMA_ROPE_THETA)
    return v


@register
class Dots3Note(Converter):
    architectures = ("Dots3NoteForConditionalGeneration", "Dots3NoteForCausalLM")
    reference_classes = {"Dots3NoteForCausalLM": "Dots3NoteForConditionalGeneration"}  # the hub's config
    projector_type = "dots3note_v"  # clip-impl.h PROJECTOR_TYPE_DOTS3NOTE_V; not in gguf-py 0.19
    family = "dots3-note"
    image_tokens = ("<|img|>", "<|imgpad|>", "<|endofimg|>")
    convention = Convention("dots3-note", ("<|img|>", "<|endofimg|>", "<|imgpad|>", "<|video_pad|>"))
    vision_prefixes = ("vision_tower.",)
    runtime_defects = (RuntimeDefect(
        "dots3note_v", "llama.cpp letterboxes an image whose sides are not multiples of patch x merge (aspect-"
        "preserving resize, centred black bars) where transformers' processor stretches it to the same size",
        "tools/mtmd/mtmd-image.cpp:787, image_resize_pad left at PAD_CEIL (clip-model.h:67; clip.cpp:1564-1573)",
        seen_up_to="0.3.36"),)

    @classmethod
    def refuses(cls, config):
        if not config.get("vision_config"):
            return "the checkpoint has no vision_config (a text-only dots3-note)"
        v = vision(config)
        for key in ("num_experts_per_tok", "adapter_out_dim"):
            if not isinstance(v[key], int) or isinstance(v[key], bool) or v[key] < 1:
                return f"vision {key} {v[key]!r}: expected a positive integer"
        if not isinstance(v["router_scaling_factor"], (int, float)) or isinstance(v["router_scaling_factor"], bool):
            return f"vision router_scaling_factor {v['router_scaling_factor']!r}: expected a number"
        if v["hidden_act"] != "silu":
            return f"vision activation {v['hidden_act']!r}: llama.cpp's dots3note_v experts run SiLU only"
        if v["rope_theta"] != LLAMA_ROPE_THETA:
            return f"vision rope_theta {v['rope_theta']} (llama.cpp's dots3note_v graph uses {LLAMA_ROPE_THETA:g})"
        if v["hidden_size"] % v["num_attention_heads"] or (v["hidden_size"] // v["num_attention_heads"]) % 4:
            return (f"vision width {v['hidden_size']} over {v['num_attention_heads']} heads: llama.cpp's 2D rope "
                    "needs a head width that is a multiple of 4")
        if v["spatial_merge_size"] < 2:
            return "spatial_merge_size 1: llama.cpp's patch merger needs 2 or more"
        return None

    def canonical(self, name):
        for pattern, repl in HUB:
            name = pattern.sub(repl, name)
        return name

    def processor(self, key: str, default=None):
        """A preprocessor setting: the hub nests the image processor's under ``vision_config`` (llama.cpp's
        conversion/dots3.py:211), transformers saves them at the top (min/max pixels as 5.x's ``size``)."""
        pre = self.ckpt.preprocessor_config
        size = {"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}
        for section in (pre.get("vision_config") or {}, pre):
            value = section.get(key) or (section.get("size") or {}).get(size.get(key, ""))
            if value is not None:
                if key in size and (not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31):
                    raise InputError(f"{self.ckpt.path}: preprocessor {key} is {value!r}; expected a positive integer")
                return value
        return default

    def params(self) -> VisionParams:
        v = vision(self.config)
        low, high = self.processor("min_pixels", MIN_PIXELS), self.processor("max_pixels", MAX_PIXELS)
        return VisionParams(
            image_size=WARMUP_SIDE * v["patch_size"] * v["spatial_merge_size"],  # unused by the dyn-size preprocessor
            patch_size=v["patch_size"], embedding_length=v["hidden_size"], feed_forward_length=v["intermediate_size"],
            block_count=v["num_hidden_layers"], head_count=v["num_attention_heads"], layer_norm_eps=v["rms_norm_eps"],
            projection_dim=v["adapter_out_dim"], use_silu=True, image_mean=[float(x) for x in self.processor(
                "image_mean", CLIP_MEAN)], image_std=[float(x) for x in self.processor("image_std", CLIP_STD)],
            extra={CV.SPATIAL_MERGE_SIZE: v["spatial_merge_size"], CV.IMAGE_MIN_PIXELS: low, CV.IMAGE_MAX_PIXELS: high,
                   EXPERT_USED_KEY: v["num_experts_per_tok"]})

    def skip(self, canonical):
        return EXPERT.fullmatch(canonical) is not None  # stacked per block in extra_tensors

    def rename(self, canonical):
        m = NAME.fullmatch(canonical)
        if m is None:
            return None
        if m["bid"] is None:
            base = TOP.get(m["module"])
            return f"{base}.{m['kind']}" if base and m["kind"] else None
        tensor = BLOCK.get(m["module"])
        if tensor is None or m["kind"] == "bias" and tensor in (T.FFN_GATE_INP, T.FFN_EXP_PROBS_B):
            return None
        name = NAMES[tensor].format(bid=m["bid"])
        return f"{name if name.startswith('v.') else 'v.' + name}.{m['kind'] or 'weight'}"  # MoE rows: "v." prefix

    def router_scale(self) -> float:
        return float(vision(self.config)["router_scaling_factor"])

    def modify(self, gguf_name, tensor):
        if gguf_name.endswith(".ffn_gate_exps.weight"):  # only transformers' layout: the hub's are stacked below
            half = tensor.shape[1] // 2  # gate_up_proj (experts, 2 * ffn, width): gate rows, then up rows
            yield gguf_name, tensor[:, :half]
            yield gguf_name.replace(".ffn_gate_exps.", ".ffn_up_exps."), tensor[:, half:]
        elif gguf_name.endswith(".ffn_down_exps.weight") and self.router_scale() != 1.0:
            yield gguf_name, tensor * self.router_scale()  # clip.cpp weighs experts by normalized scores only
        else:
            yield gguf_name, tensor

    def extra_tensors(self):
        """The hub's one-tensor-per-expert weights, stacked per block as llama.cpp reads them."""
        experts: dict[tuple[int, str], dict[int, str]] = {}
        for name in self.ckpt.names():
            if m := EXPERT.fullmatch(self.canonical(name)):
                experts.setdefault((int(m["bid"]), m["fc"]), {})[int(m["e"])] = name
        for (bid, fc), by_index in sorted(experts.items()):
            names = tuple(by_index[i] for i in range(len(by_index)) if i in by_index)
            if len(names) < len(by_index) or len({self.ckpt.shape(n) for n in names}) > 1:
                raise InputError(f"{self.ckpt.path}: block {bid}'s experts are not numbered 0..n-1 or differ in shape")
            scale = self.router_scale() if fc == "fc2" else 1.0

            def load(names, scale=scale):
                data = np.stack([self.ckpt.load(n) for n in names])
                return data * np.asarray(scale, data.dtype) if scale != 1.0 else data

            meta = Lazy.meta_with_dtype_and_shape(self.ckpt.entries[names[0]].numpy_dtype,
                                                  (len(names), *self.ckpt.shape(names[0])))
            yield EXPS[fc].format(bid=bid), Lazy(meta=meta, args=(names,), func=load)

    def test_image_size(self):
        p = self.params()
        side, low = p.patch_size * p.extra[CV.SPATIAL_MERGE_SIZE], p.extra[CV.IMAGE_MIN_PIXELS]
        n = 1
        while n * n * 5 * 7 * side * side < low:  # 5 x 7 merged tokens, scaled up until llama.cpp does not resize
            n += 1
        return 5 * n * side, 7 * n * side

    def model_inputs(self, pixel_values):
        """Dots3-note's processor layout of one image (Qwen2VLImageProcessor, one frame): (patches, 3 * p * p),
        patches ordered by merge unit, and its grid."""
        import torch

        p, m = self.params().patch_size, self.params().extra[CV.SPATIAL_MERGE_SIZE]
        gh, gw = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        x = pixel_values[0].reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        return {"pixel_values": x.reshape(gh * gw, 3 * p * p).contiguous(),
                "image_grid_thw": torch.tensor([[1, gh, gw]])}

    def reference_features(self, model, pixel_values):
        """transformers' merger output; ``Dots3NoteForConditionalGeneration`` keeps ``get_image_features``
        on its inner ``Dots3NoteModel``."""
        return model.model.get_image_features(**self.model_inputs(pixel_values))
